#!/usr/bin/env bash
# Produces docs/results/paper-induction-heads/ and docs/results/paper-selective-copy/: the Mamba
# paper's synthetic comparisons (layouts/paper/) on one GPU, in about 7 minutes.
#
#   bash docs/results/paper-synthetic.sh OUT_DIR
#   PARALLEL=1 IH_LIMIT=400 SC_LIMIT=400 STEPS_IH=3000 STEPS_SC=3000 bash ... OUT_DIR  # 2 GPUs
#
# then copy OUT_DIR/<comparison>/{report.md,report.json,*.png} to docs/results/paper-<comparison>/.
# Each comparison runs under a time limit (seconds, env IH_LIMIT / SC_LIMIT); when it is reached,
# compare stops like Ctrl-C: finished runs are kept and the report covers them (rerun to finish).
# The settings are far smaller than the paper's (steps, and for selective copying the length):
# see the reports' headers for what ran.
set -u
OUT=${1:?usage: paper-synthetic.sh OUT_DIR}
IH_LIMIT=${IH_LIMIT:-260}
SC_LIMIT=${SC_LIMIT:-140}
STEPS_IH=${STEPS_IH:-2000}
STEPS_SC=${STEPS_SC:-2000}
export MPLCONFIGDIR=${MPLCONFIGDIR:-/tmp/mpl-$$}
mkdir -p "$OUT"
# no extra key=value when the kind of block is fine; if the Mamba block's default backend fails
# on this machine, fall back to the chunked PyTorch scan (said in the log and in the reports).
EXTRA=()
python3 - <<'PY' || EXTRA=(blocks.M.impl=torch)
import torch, hybridseq as hs
cfg = hs.load_config("layouts/paper/induction_heads/mamba.yaml")
dev = "cuda" if torch.cuda.is_available() else "cpu"
m = hs.build_model(cfg).to(dev)
x = torch.randint(0, 16, (2, 64), device=dev)
with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
    m(x).logits.float().sum().backward()
print("preflight ok on", torch.cuda.get_device_name(0) if dev == "cuda" else "cpu")
PY
[ ${#EXTRA[@]} -gt 0 ] && echo "preflight failed: Mamba runs with ${EXTRA[*]}"

ih_lengths=64,128,256,512,1024,2048,4096,8192,16384,32768,65536,131072,262144,524288,1048576
induction() {
  timeout -s TERM "$IH_LIMIT" python3 -m hybridseq compare \
    layouts/paper/induction_heads/mamba.yaml layouts/paper/induction_heads/attention.yaml \
    layouts/paper/induction_heads/hybrid-nope.yaml \
    --out "$OUT/induction_heads" --eval-lengths "$ih_lengths" --eval-seqs 32 --eval-budget 30 \
    --sweep-lengths 256,1024,4096,16384 --decode-tokens 64 --decode-batch 8 --no-progress \
    train.steps="$STEPS_IH" train.batch_size=64 train.eval_every=500 train.log_every=50 "${EXTRA[@]}"
  echo "induction_heads: exit $?"
}
selective_copy() {
  timeout -s TERM "$SC_LIMIT" python3 -m hybridseq compare \
    layouts/paper/selective_copy/mamba.yaml layouts/paper/selective_copy/attention.yaml \
    layouts/paper/selective_copy/hybrid.yaml \
    --out "$OUT/selective_copy" --eval-lengths 1x,2x,4x --eval-budget 15 \
    --sweep-lengths 272,1024,4096,16384 --decode-tokens 64 --decode-batch 8 --no-progress \
    train.steps="$STEPS_SC" train.batch_size=64 train.task.seq_len=256 train.eval_every=500 \
    train.log_every=50 "${EXTRA[@]}"
  echo "selective_copy: exit $?"
}
if [ "${PARALLEL:-0}" = 1 ]; then   # two GPUs: one comparison on each
  CUDA_VISIBLE_DEVICES=0 induction > "$OUT/induction_heads.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 selective_copy > "$OUT/selective_copy.log" 2>&1 &
  wait
  tail -n 3 "$OUT"/*.log
else
  induction
  selective_copy
fi

# checkpoints are not part of the results
find "$OUT" -type d -name checkpoints -prune -exec rm -rf {} +
for f in "$OUT"/*/report.md; do echo "== $f"; sed -n '/## Summary/,/## Plots/p' "$f"; done
