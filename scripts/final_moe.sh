#!/usr/bin/env bash
# MoE: GPU correctness + the throughput sweep, in one call (H100, <= 160 s wall: pytest <= 60 s,
# bench <= 90 s including its default 30 s preheat, the rest a few seconds).
#   bash scripts/final_moe.sh          (from the repository root; logs to $OUT/moe.log)
# 1. pytest tests/test_moe_backends.py tests/test_moe_block.py (+ the two Triton router-logits
#    tests of tests/test_moe_router.py) on the GPU (compiled Triton: fused SwiGLU, (un)permutation,
#    router logits; torch._grouped_mm in every operand layout; no host syncs).
# 2. `hybridseq bench moe`: dense SwiGLU anchors timed before AND after the MoE rows (torch: one
#    gate|up GEMM + F.silu*u; fused: + Triton SwiGLU; block: the real MLPBlock; block_fused:
#    MLPBlock's projections + Triton silu_mul = the proposed mlp.py change), ratios against the
#    mean of each anchor's timings; 8x2 and 64x8 x balanced/skewed/learned router with the shipped
#    defaults; the variant sweep on 8x2 balanced (old autograd path; fused op in each operand
#    layout; fused op with one cuBLAS mm per expert, also 8x2 skewed and 64x8; Triton router
#    logits, also 64x8); each expert GEMM alone per layout; matmul anchors. Rows are streamed to a JSON-lines file, so a run cut short
#    keeps what it measured. A short table is printed last.
set -uo pipefail
out=${OUT:-/tmp/final_moe}
mkdir -p "$out"
log="$out/moe.log"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
rows=$(mktemp /tmp/moe_rows.XXXXXX.jsonl)
summary=$(mktemp /tmp/moe_summary.XXXXXX.py)
cat > "$summary" <<'PY'
import json, sys
import torch, triton
from hybridseq.bench.common import format_table
print("torch", torch.__version__, "triton", triton.__version__)
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
if not rows:
    print("no bench rows"); sys.exit(0)
# ratios against the mean of each dense anchor's timings present (first and last; first only if cut short)
dense = {}
for r in rows:
    if r.get("dense_act") and r.get("fwd_bwd_ms"):
        dense.setdefault(r["dense_act"], []).append(r["fwd_bwd_ms"])
mean = {a: sum(t) / len(t) for a, t in dense.items()}
for a, t in dense.items():
    print(f"dense anchor {a}: " + " / ".join(f"{v:.3f}" for v in t) + f" ms (mean {mean[a]:.3f})")
table = []
for r in rows:
    if r["what"].startswith("dense anchor"):
        continue  # the bench's own mean rows
    row = {"what": r["what"][:84], "ms": r.get("fwd_bwd_ms") or r.get("fwd_ms"), "fwd_ms": r.get("fwd_ms"),
           "TFLOP/s": r.get("tflops")}
    if r.get("fwd_bwd_ms") and not r.get("dense_act"):
        row.update({f"vs {a}": m / r["fwd_bwd_ms"] for a, m in mean.items()})
    row.update({"syncs": r.get("host_syncs"), "error": (r.get("error") or "")[:60]})
    table.append(row)
vs = [f"vs {a}" for a in mean]
print(format_table(table, ["what", "ms", "fwd_ms", "TFLOP/s"] + vs + ["syncs", "error"]))
print("\n== short table (ms = fwd+bwd; vs X = mean of dense anchor X in this run / MoE fwd+bwd ms)")
print(format_table([t for t in table if t["what"].startswith(("moe", "dense"))],
                   ["what", "ms", "TFLOP/s"] + vs + ["syncs", "error"]))
PY
t0=$(date +%s)
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  date -u +%Y-%m-%dT%H:%M:%SZ
  echo "== pytest (GPU)"
  timeout 60 python -m pytest -q -p no:cacheprovider tests/test_moe_backends.py tests/test_moe_block.py \
    tests/test_moe_router.py::test_router_logits_triton_matches_ref \
    tests/test_moe_router.py::test_router_with_triton_logits_matches_torch 2>&1 | tail -15
  echo "pytest exit: ${PIPESTATUS[0]}  ($(( $(date +%s) - t0 )) s so far)"
  echo "== bench moe"
  variants="mlp=autograd;mlp=fused,act=triton,layout=n.k"
  variants+=";mlp=fused,act=triton,layout=k.k;mlp=fused,act=triton,layout=n.n;mlp=fused,act=triton,layout=k.n"
  variants+=";mlp=fused,act=triton,layout=n.k,gemm=loop@8x2:balanced,8x2:skewed,64x8:balanced"
  variants+=";mlp=fused,act=triton,layout=n.k,router=triton@8x2:balanced,64x8:balanced"
  timeout 90 python -m hybridseq.bench.moe --impls grouped --configs 8x2,64x8 \
    --routings balanced,skewed,router --variants "$variants" --variant-rows 8x2:balanced \
    --dense-acts torch,fused,block,block_fused --gemm-layouts --warmup 4 --iters 15 \
    --jsonl "$rows" 2>&1 >/dev/null | tail -20
  echo "bench exit: ${PIPESTATUS[0]}  ($(( $(date +%s) - t0 )) s so far)"
  python "$summary" "$rows"
} 2>&1 | tee "$log"
rm -f "$rows" "$summary"
