#!/usr/bin/env bash
# Mamba block + causal conv1d: GPU correctness and timings in one time-boxed call (<= 90 s).
#   bash scripts/final_block.sh        (repository root; log: $OUT/block.log)
# 1. `bench block`: the Mamba row exactly as in BENCHMARKS.md (impl triton, B8 L2048 d1024 bf16,
#    fwd+bwd = autograd.grad to x and every parameter), plus the in-run "before" row
#    (triton-unfused = plain autograd around the same kernels) and the mlp row, and a kernel
#    profile of one fwd+bwd of each;
# 2. `bench conv --sweep --no-backward`: B8 D4096 L2048 W4 + SiLU; each forward tile runs
#    through the shipped launch path with its output (poisoned first)
#    compared with float64 (max_rel_err), HYBRIDSEQ_CONV_FWD=... pins the winner; the autotuned
#    default ("triton" row), F.conv1d and the copy ceiling in the same run;
# 3. compiled-Triton tests: tests/test_mamba_block.py and the block test
#    tests/test_blocks.py::test_mamba_triton_impl_matches_torch_impl (fused path vs torch path),
#    then tests/kernels/test_conv1d.py (autotuning over one tile per variant there: fewer compiles).
# Measurements first: each phase is time-boxed (timeout) so the whole stays under 90 s; a test
# phase cut by its timeout shows its progress dots in the log.
# A short table is printed last.
set -uo pipefail
out=${OUT:-/tmp/final_block}
mkdir -p "$out"
log=$out/block.log
tmp=$(mktemp -d)  # bench JSON (only block.log goes to $OUT)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
: > "$log"
{ nvidia-smi --query-gpu=name --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u +%H:%M:%SZ; } 2>&1 | tee -a "$log"

t0=$SECONDS
t2=$SECONDS  # t0: the total
echo "== bench block" | tee -a "$log"
timeout 26 python -m hybridseq bench block --kinds mamba,mlp --mamba-impls triton,triton-unfused \
  --iters 10 --profile --json > "$tmp/block.json" 2>> "$log"
echo "bench block exit $? ($((SECONDS - t2)) s)" | tee -a "$log"
sed -n '/^== profile/,/^\[/p' "$tmp/block.json" >> "$log"  # the profiles print before the JSON

t3=$SECONDS
echo "== bench conv" | tee -a "$log"
timeout 20 python -m hybridseq bench conv --sweep --no-backward --iters 20 \
  --fwd-configs 32x128x4,64x128x8,128x128x8,16x256x4,32x256x4 \
  --json > "$tmp/conv.json" 2>> "$log"
echo "bench conv exit $? ($((SECONDS - t3)) s)" | tee -a "$log"

t4=$SECONDS
echo "== pytest (compiled Triton): Mamba block" | tee -a "$log"
timeout 20 python -m pytest -q -p no:cacheprovider --durations=3 tests/test_mamba_block.py \
  "tests/test_blocks.py::test_mamba_triton_impl_matches_torch_impl" > "$tmp/p1.txt" 2>&1
rc=$?; cat "$tmp/p1.txt" >> "$log"
echo "pytest mamba exit $rc ($((SECONDS - t4)) s): $(tail -1 "$tmp/p1.txt")" | tee -a "$log"

t1=$SECONDS
echo "== pytest (compiled Triton): conv" | tee -a "$log"
timeout 20 python -m pytest -q -p no:cacheprovider --durations=3 tests/kernels/test_conv1d.py \
  > "$tmp/p2.txt" 2>&1
rc=$?; cat "$tmp/p2.txt" >> "$log"
echo "pytest conv exit $rc ($((SECONDS - t1)) s): $(tail -1 "$tmp/p2.txt")" | tee -a "$log"

python - "$tmp" <<'EOF' 2>&1 | tee -a "$log"
import json, sys
out = sys.argv[1]


def rows(name):
    try:
        text = open(f"{out}/{name}").read()
        return json.loads(text[text.index("\n[") + 1:] if not text.startswith("[") else text)
    except Exception as e:
        print(f"{name}: no rows ({type(e).__name__})")
        return []


def f(v, nd=4):
    return f"{v:.{nd}g}" if isinstance(v, float) else ("" if v is None else str(v))


print("\n| bench | what | fwd ms | fwd+bwd ms | graph ms | max rel err | note |")
print("|---|---|---|---|---|---|---|")
for r in rows("block.json"):
    print(f"| block | {r['block']} {r['impl']} {r['shape']} | {f(r.get('fwd_ms'))} | "
          f"{f(r.get('fwd_bwd_ms'))} | | | {r.get('status')}"
          + (" (BENCHMARKS.md 14:29: 0.939 / 5.02)" if r["impl"] == "triton" else "") + " |")
for r in rows("conv.json"):
    if r["op"] in ("conv", "copy (ceiling)", "conv_fwd_sweep"):
        note = r.get("pin") or r.get("config") or r.get("note") or ""
        print(f"| conv | {r['op']} {r['impl']} | {f(r.get('fwd_ms'))} | {f(r.get('fwdbwd_ms'))} | "
              f"{f(r.get('graph_ms'))} | {f(r.get('max_rel_err'), 3)} | {note} |")
EOF
cat "$tmp/conv.json" >> "$log" 2>/dev/null
echo "total $((SECONDS - t0)) s" | tee -a "$log"
