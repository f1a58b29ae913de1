#!/usr/bin/env bash
# Attention document masks on the GPU (the final combined call; budget about 60 s of wall time).
#   bash scripts/final_attention.sh          from the repository root; log: $OUT/attention.log
# 1. correctness on CUDA: the document-mask GPU tests (compiled flex fwd+grads with and without
#    a window, auto, SDPA with the mask, flash_attn varlen when installed, isolation between
#    documents) and four existing backend tests (cuDNN SDPA; compiled flex with window + GQA);
# 2. speed: flex with documents of 512 tokens at B4 H16 L4096 D128 causal, bf16 (TFLOP/s count
#    only the work inside documents; `auto` runs the same path) against the same work run
#    unmasked by our SDPA path (sdpa[split]: 32 causal sequences of 512, cuDNN first: the in-run
#    anchor, the best a document mask can hope for) and SDPA with the dense mask (efficient
#    kernel: what auto would run without flex).
# Each step has its own timeout (34 + 26 s) so the whole stays near 60 s; a cut step says
# "timeout" and the table still prints.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_steps.sh"  # start_log, say, step
start_log attention

step pytest 34 python -m pytest -v -p no:cacheprovider -m gpu \
  tests/test_attention_docmask.py \
  "tests/test_attention_backends.py::test_cuda_backends_match_torch[8-None-sdpa]" \
  "tests/test_attention_backends.py::test_cuda_backends_match_torch[2-None-sdpa]" \
  "tests/test_attention_backends.py::test_cuda_backends_match_torch[2-64-sdpa]" \
  "tests/test_attention_backends.py::test_cuda_backends_match_torch[2-64-flex]"
test_rc=$?
test_summary=$(grep -E "[0-9]+ (passed|failed|skipped|errors?|deselected).* in [0-9.]+s" "$log" | tail -1 | tr -d '=' | xargs)

step bench 26 bash -c 'python -m hybridseq bench attention --batch 4 --heads 16 --seqlen 4096 \
  --head-dim 128 --doc-len 512 --iters 10 --backends "auto,flex,sdpa[split],sdpa[efficient]" \
  --json > "$1"' _ "$tmp/docs.json"

# the short table, last: every row of both benches (skips and errors included)
python - "$tmp" "$test_rc" "$test_summary" <<'PYEOF' | tee -a "$log"
import json, os, sys
tmp, rc, summary = sys.argv[1:4]
rows = []
for name in ("docs.json",):
    try:
        rows += json.load(open(os.path.join(tmp, name)))
    except (OSError, ValueError) as e:
        rows.append({"backend": name, "shape": "", "status": f"no rows ({type(e).__name__})"})
anchor = next((r.get("fwd_bwd_TFLOPs", 0) for r in rows if r["backend"] == "sdpa[split]"), 0)
print(f"== summary: pytest exit {rc}: {summary or 'no summary line (timeout?)'}")
print("| backend | shape | runs | fwd TFLOP/s | fwd+bwd TFLOP/s | % of anchor fwd+bwd | mask ms | status |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    ok = "fwd_bwd_TFLOPs" in r
    f = lambda k: f"{r[k]:.0f}" if ok else "-"  # noqa: E731
    pct = f"{100 * r['fwd_bwd_TFLOPs'] / anchor:.0f}%" if ok and anchor else "-"
    m = f"{r['mask_ms']:.2f}" if "mask_ms" in r else "-"
    print(f"| {r['backend']} | {r.get('shape', '')} | {r.get('runs', '')} | {f('fwd_TFLOPs')} | "
          f"{f('fwd_bwd_TFLOPs')} | {pct} | {m} | {str(r.get('status', ''))[:60]} |")
print("anchor = sdpa[split]: the documents as a batch of 32 unmasked causal sequences of 512 "
      "(cuDNN first), the same work as the document mask")
PYEOF
rm -rf "$tmp"
