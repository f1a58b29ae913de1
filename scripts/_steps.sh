# Shared by the time-boxed GPU scripts (scripts/final_*.sh): source it, then call start_log.
#   start_log NAME               $out (${OUT:-/tmp/NAME_out}), a fresh $out/NAME.log as $log, a
#                                temporary folder $tmp, PYTHONPATH with the repository; logs the
#                                torch version and the GPU
#   say TEXT...                  print and append to $log
#   step NAME SECONDS CMD...     run CMD under a timeout, output to $log, print its exit status
#                                and time (124/137: timed out); returns CMD's status
start_log() {
  out=${OUT:-/tmp/$1_out}
  mkdir -p "$out"
  log=$out/$1.log
  tmp=$(mktemp -d)
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
  : > "$log"
  python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" \
    >> "$log" 2>&1
}
say() { echo "$@" | tee -a "$log"; }
step() {
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  say "== $name (timeout ${secs}s)"
  timeout -k 3 "$secs" "$@" >> "$log" 2>&1
  local rc=$?
  say "== $name: exit $rc$([ $rc -ge 124 ] && echo ' (timeout)') in $((SECONDS - t0)) s"
  return $rc
}
