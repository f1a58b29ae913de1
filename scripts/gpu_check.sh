#!/usr/bin/env bash
# One-shot GPU validation and benchmarks (run on a CUDA machine from the repository root).
#   bash scripts/gpu_check.sh [BENCH ...]      default benches: scan conv block moe attention decode
# Runs the kernel/backends tests on the GPU (compiled Triton, not the interpreter), then each
# `hybridseq bench WHAT --json`, and prints one summary at the end. Logs go to $OUT (or /tmp/gpu_check).
set -uo pipefail
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
benches=("$@")
[ ${#benches[@]} -gt 0 ] || benches=(scan conv block moe attention decode)

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u +%Y-%m-%dT%H:%MZ; } | tee "$out/device.txt"

timeout 420 python -m pytest -q -p no:cacheprovider \
  tests/kernels/test_scan_triton.py tests/kernels/test_conv1d.py tests/kernels/test_scan_step.py \
  tests/kernels/test_kernels_api.py tests/test_mamba_block.py \
  tests/test_moe_backends.py tests/test_moe_block.py tests/test_attention_backends.py \
  tests/test_attention_docmask.py tests/test_decode_graph.py \
  2>&1 | tee "$out/pytest_gpu.log" | tail -25
test_rc=${PIPESTATUS[0]}

for what in "${benches[@]}"; do
  echo "== bench $what"
  timeout 240 python -m hybridseq bench "$what" 2>&1 | tee "$out/bench_$what.txt" | tail -30
done

echo "== summary"
echo "pytest exit: $test_rc ($(tail -1 "$out/pytest_gpu.log"))"
cat "$out/device.txt"
