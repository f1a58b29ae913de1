# Shared by the time-boxed GPU scripts (scripts/final_*.sh): source it after setting $log.
#   say TEXT...                  print and append to $log
#   step NAME SECONDS CMD...     run CMD under a timeout, output to $log, print its exit status
#                                and time (124/137: timed out); returns CMD's status
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
