#!/usr/bin/env bash
# Final GPU check of the Triton selective scan (sequence-split backward), one H100, <= 150 s.
#   bash scripts/final_scan.sh        (repository root; mamba_ssm on PYTHONPATH when it was built)
# In order of importance, each step under its own timeout within the budget (SCAN_BUDGET_S):
# 1. the real-shape GPU tests of tests/kernels/test_scan_triton.py (compiled Triton): the
#    split-vs-unsplit check at B2 D4096 L8192, the NaN-poisoned real shapes against the chunked
#    scan in float64 with the splits automatic and forced;
# 2. `hybridseq bench scan` (bf16, z + D + delta_bias + softplus) at B2 D4096 L8192 N16 and
#    B8 D2048 L2048 N16: Triton with the backward split S = auto (the shipped heuristic), 1, 2,
#    4, 8; the chunked PyTorch anchor (B8 only: B2 is over --torch-max-elems); mamba_ssm when
#    importable (a skip line otherwise);
# 3. backward block alternatives at S = auto: (2,16,4,1) (163 registers: 12 warps per SM),
#    (4,16,4,1) capped at 224 registers (9 warps) and (4,32,4,2) (239 registers, 2 warps per
#    program: half the gB / gC partials), against the default (4,16,4,1) (249: 8 warps);
# 4. the forward split S = 2, 4 (off by default);
# 5. if time is left: the small odd-shape cases of the test file, compiled.
# Everything goes to $OUT/scan.log (also printed); the benches log each row as it is timed
# ("row {...}"), so a step cut by its timeout still reports; the summary table comes last.
# CPU-only machines: the pytest steps run (interpreter), the benches fail at once (no CUDA).
set -uo pipefail
out=${OUT:-/tmp/final_scan}
mkdir -p "$out"
log=$out/scan.log
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
unset HYBRIDSEQ_SCAN_BWD_SPLIT HYBRIDSEQ_SCAN_FWD_SPLIT  # "auto" = the shipped heuristic
BUDGET=${SCAN_BUDGET_S:-145}
SECONDS=0
left() { echo $((BUDGET - SECONDS)); }
# cap N R: a timeout of N seconds, cut so that R seconds of the budget stay (at least 1)
cap() { local t=$(( $(left) - $2 )); [ "$t" -gt "$1" ] && t=$1; [ "$t" -lt 1 ] && t=1; echo "$t"; }
# the rows are logged one by one (--progress, to stderr) as they are timed; stdout (the JSON
# table at the end) is dropped
BENCH="python -m hybridseq.bench.scan --json --progress"
B2=2x4096x8192x16
B8=8x2048x2048x16

{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u +%Y-%m-%dT%H:%M:%SZ

  echo "== pytest -m gpu tests/kernels/test_scan_triton.py (compiled Triton, real shapes)"
  timeout "$(cap 50 90)" python -m pytest -v -p no:cacheprovider -m gpu tests/kernels/test_scan_triton.py \
    2>&1 | grep -E "PASSED|FAILED|ERROR|SKIPPED|Error|assert|passed|failed" | tail -20
  echo "pytest exit ${PIPESTATUS[0]} (124: timed out) at ${SECONDS}s"

  echo "== bench: backward split auto 1 2 4 8; anchors (left $(left)s)"
  timeout "$(cap 40 50)" $BENCH --shapes $B2 $B8 --iters 20 --warmup 5 \
    --impls triton,torch,mamba_ssm --bwd-split auto 1 2 4 8 > /dev/null
  echo "bench exit $? at ${SECONDS}s"

  echo "== bench: backward blocks, S auto (left $(left)s)"
  timeout "$(cap 35 18)" $BENCH --sweep --shapes $B2 $B8 --iters 20 --warmup 5 --fwd-configs \
    --bwd-configs 2,16,4,1 4,16,4,1,224 4,32,4,2 > /dev/null
  echo "bench exit $? at ${SECONDS}s"

  echo "== bench: forward split 2 4, backward S auto (left $(left)s)"
  timeout "$(cap 18 4)" $BENCH --shapes $B2 $B8 --iters 20 --warmup 5 --impls triton \
    --fwd-split 2 4 > /dev/null
  echo "bench exit $? at ${SECONDS}s"

  if [ "$(left)" -gt 25 ]; then
    echo "== pytest -m 'not gpu' tests/kernels/test_scan_triton.py (compiled, small odd shapes)"
    timeout "$(cap 60 3)" python -m pytest -q -p no:cacheprovider -m "not gpu" \
      tests/kernels/test_scan_triton.py 2>&1 | tail -8
    echo "pytest exit ${PIPESTATUS[0]} (124: timed out) at ${SECONDS}s"
  fi
} 2>&1 | tee "$log"

{
  echo "== summary (targets: B8 fwd+bwd <= 3.0 ms; B2 fwd <= 1.48, fwd+bwd <= 6.4 ms)"
  python - "$log" <<'EOF'
import json, sys

rows = []
for line in open(sys.argv[1]):
    if line.startswith("row {"):
        try:
            rows.append(json.loads(line[4:]))
        except ValueError:  # a line cut by a timeout
            pass

def f(v):
    return f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v))

cols = ["shape", "impl", "blocks", "asked", "fwd_split", "split", "fwd_ms", "fwdbwd_ms",
        "bwd_ms", "note"]
print("| " + " | ".join(cols) + " |")
for r in rows:
    if r.get("kind") == "bwd":  # a --sweep row: backward block shape, forward default
        r = {**r, "impl": "triton", "asked": "auto/auto", "bwd_ms": r.get("bwd_only_ms"),
             "blocks": ",".join(str(r[k]) for k in ("BLOCK_T", "BLOCK_D", "NO", "warps"))
             + (f" maxnreg {r['maxnreg']}" if r.get("maxnreg") else "")}
    print("| " + " | ".join(f(r.get(c, r.get("error") if c == "note" else None))
                            for c in cols) + " |")
EOF
  echo "total ${SECONDS}s"
} 2>&1 | tee -a "$log"
