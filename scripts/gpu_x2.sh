#!/usr/bin/env bash
# Two-GPU session checks (nvidia-h200-x2), run from the repository root after installing .whl/:
#   1. the Mamba paper's synthetic comparisons, one per GPU (docs/results/paper-synthetic.sh);
#   2. DeepSpeed on 2 GPUs, ~1.5B-parameter BlackMamba-style layout (344M active):
#      ZeRO-2 with expert parallelism EP=2 against EP=1 in the same run, then ZeRO-3 with the
#      optimizer offloaded to the CPU (launch/zero3-offload.json).
# Logs and results go to $OUT (or /tmp/gpu_x2); a short table is printed last.
set -uo pipefail
out=${OUT:-/tmp/gpu_x2}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python -c "import torch, triton, deepspeed; print('torch', torch.__version__, 'triton', triton.__version__, 'deepspeed', deepspeed.__version__)"
  date -u +%Y-%m-%dT%H:%MZ; } | tee "$out/device.txt"

if [ "${SKIP_PAPER:-0}" != 1 ]; then
  PARALLEL=1 IH_LIMIT=${IH_LIMIT:-270} SC_LIMIT=${SC_LIMIT:-270} STEPS_IH=${STEPS_IH:-6000} \
    STEPS_SC=${STEPS_SC:-6000} bash docs/results/paper-synthetic.sh /tmp/paper > "$out/paper.log" 2>&1
  (cd /tmp/paper && tar czf "$out/paper.tgz" */report.md */report.json */*.png *.log)
  date -u +%H:%M:%SZ
fi

model=(layouts/blackmamba.yaml --micro-batch 8 --seq-len 2048 --peak-tflops 989
       model.d_model=1152 model.vocab_size=50304 'layout=(M E)*15' blocks.E.n_experts=8
       blocks.E.d_ff=4608)
{
  echo "== ZeRO-2, 2 GPUs, EP=2"
  python launch/bench_scaling.py "${model[@]}" --gpus 2 --zero 2 --steps 12 --warmup 4 --timeout 120 \
    --out /tmp/bs-ep2 blocks.E.ep_size=2
  echo "== ZeRO-2, 2 GPUs, EP=1 (same run)"
  python launch/bench_scaling.py "${model[@]}" --gpus 2 --zero 2 --steps 12 --warmup 4 --timeout 90 \
    --out /tmp/bs-ep1
  echo "== ZeRO-3 + optimizer offload, 2 GPUs"
  python launch/bench_scaling.py "${model[@]}" --gpus 2 --zero 3 --config-suffix=-offload --steps 8 \
    --warmup 3 --timeout 170 --out /tmp/bs-off
} > "$out/deepspeed.log" 2>&1
grep -E "failed|error" "$out/deepspeed.log" | head -5
echo "== summary"
grep -A3 "^ZeRO GPUs" "$out/deepspeed.log"
for f in /tmp/paper/*/report.md; do echo "== $f"; sed -n '/## Summary/,/## Accuracy vs/p' "$f" | grep "^|"; done
