#!/usr/bin/env bash
# Real text end to end on a CPU in a few minutes: prepare -> train -> generate.
#   bash scripts/text_example.sh          (from anywhere; hybridseq installed, or run in the checkout)
# 1. scripts/make_pydoc_corpus.py writes runs/pydoc/pydoc.jsonl: the docstrings of this Python's
#    standard library, one document per module (about 1.7 MB from CPython 3.11; the text is
#    under the PSF License Agreement, generated on this machine and not shipped);
# 2. hybridseq prepare trains a byte-level BPE of 4096 tokens on the training documents and
#    writes runs/pydoc/prepared (10% of the documents held out for validation);
# 3. hybridseq train layouts/text-hybrid.yaml: Mamba + attention, 1.2M parameters, 400 steps of
#    8 x 256 tokens, documents packed with their doc_ids;
# 4. hybridseq generate from the run's last checkpoint, text in and out through its tokenizer.json;
# 5. prints the final eval loss, perplexity and bits per byte, and the wall time.
# Environment: STEPS (default 400), OUT (default runs/text-hybrid-<time>), PYTHON (default
# python), OMP_NUM_THREADS (default 1: a model this small trains faster on one thread).
# A second run reuses the corpus and the prepared folder (prepare --resume verifies it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DATA=runs/pydoc
OUT=${OUT:-runs/text-hybrid-$(date +%Y%m%d-%H%M%S)}
STEPS=${STEPS:-400}
start=$(date +%s)

[ -f "$DATA/pydoc.jsonl" ] || "$PY" scripts/make_pydoc_corpus.py "$DATA/pydoc.jsonl"
"$PY" -m hybridseq prepare "$DATA/pydoc.jsonl" --out "$DATA/prepared" --train-tokenizer 4096 \
    --val-fraction 0.1 --workers 2 --resume
"$PY" -m hybridseq train layouts/text-hybrid.yaml "train.task.path=$DATA/prepared" "train.steps=$STEPS" \
    --out "$OUT"
seed=0
for prompt in "Return the" "Create a new"; do
    echo "--- generate --prompt \"$prompt\" (sampled: temperature 0.7, top-k 40, seed $seed)"
    "$PY" -m hybridseq generate "$OUT" --prompt "$prompt" --max-new-tokens 60 --temperature 0.7 --top-k 40 \
        --seed $seed
    seed=$((seed + 1))
done
"$PY" - "$OUT" "$start" <<'PY'
import json, sys, time
out, start = sys.argv[1], int(sys.argv[2])
evals = [r for r in map(json.loads, open(f"{out}/metrics.jsonl")) if "eval_loss" in r]
r = evals[-1]
print(f"--- reached at step {r['step']}: eval loss {r['eval_loss']:.3f} nats/token, perplexity "
      f"{r['eval_ppl']:.1f}, {r['eval_bpb']:.3f} bits per byte (first eval at step {evals[0]['step']}: "
      f"bits per byte {evals[0]['eval_bpb']:.3f}); wall time {time.time() - start:.0f} s; run folder {out}")
PY
