#!/usr/bin/env bash
# Decode on the GPU: CUDA-graph decoding and `bench decode` (the final combined call; budget
# 120 s of wall time). From the repository root; log: $OUT/decode.log.
#   bash scripts/final_decode.sh
# 1. correctness on CUDA (the -m gpu tests first, the others after the bench):
#    tests/test_decode_graph.py (captured graph vs ordinary decode, fp32
#    and bf16 with MoE, Triton one-token kernels; generate(cuda_graph=True) greedy tokens ==
#    cuda_graph=False), tests/test_generate.py, tests/test_cache.py (its bench tests run the
#    graph mode on CUDA);
# 2. speed: `bench decode --suite 350m` (transformer-354M vs jamba-358M-total) at prompt 8192,
#    batch 64, bf16: one prefill per layout (chunks of 1024, inference_mode, last logits only),
#    then 4 + 32 greedy steps per mode: off (eager one-token forward) and graph (the same
#    forward captured in a CUDA graph). The bench prints its memory
#    estimate first and lowers the batch for both layouts if 64 would not fit.
# Timeouts 28 (GPU tests) + 62 (bench) + 22 (other tests) s; a cut step says "timeout" and
# the table still prints (rows that finished are read back from the bench's --progress lines).
# CPU dry run of the plumbing: DECODE_SKIP_PYTEST=1 DECODE_BENCH_ARGS="layouts/transformer.yaml
#   layouts/jamba.yaml --prompt 16 --batch 2 --new-tokens 2 --vocab 64 --cuda-graph static
# " bash scripts/final_decode.sh
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_steps.sh"  # start_log, say, step
start_log decode

bench_args=${DECODE_BENCH_ARGS:---suite 350m --prompt 8192 --batch 64 --new-tokens 32 --warmup 4 --cuda-graph both}
test_rc=skipped
gpu_rc=skipped
if [ -z "${DECODE_SKIP_PYTEST:-}" ]; then
  # the CUDA tests first: captured graph vs ordinary decode (fp32, bf16 + MoE), Triton kernels
  step pytest_gpu 28 python -m pytest -q -p no:cacheprovider -m gpu \
    tests/test_decode_graph.py tests/test_generate.py tests/test_cache.py tests/test_mamba2_block.py
  gpu_rc=$?
fi

say "bench decode $bench_args"
step bench_decode 62 bash -c 'python -m hybridseq bench decode $3 --progress --json > "$1" \
  2> >(tee "$2" >&2)' _ "$tmp/rows.json" "$tmp/progress.txt" "$bench_args"

if [ -z "${DECODE_SKIP_PYTEST:-}" ]; then
  # then the rest (on this machine its bench tests run the graph mode on CUDA); last, so that a
  # slow compile here cannot cost the bench its time
  step pytest_rest 22 python -m pytest -q -p no:cacheprovider -m "not gpu" \
    tests/test_decode_graph.py tests/test_generate.py tests/test_cache.py tests/test_mamba2_block.py
  test_rc="gpu $gpu_rc, rest $?"
fi
test_summary=$(grep -E "[0-9]+ (passed|failed|skipped|error|errors|deselected).* in [0-9.]+s" "$log" \
  | tail -2 | tr '\n' ';')

# the short table, last
python - "$tmp" "$test_rc" "$test_summary" <<'PYEOF' | tee -a "$log"
import ast, json, os, sys
tmp, rc, summary = sys.argv[1:4]
try:
    rows = json.load(open(os.path.join(tmp, "rows.json")))
    src = "bench JSON"
except (OSError, ValueError):
    rows = []
    for line in open(os.path.join(tmp, "progress.txt"), errors="replace"):
        if line.startswith("{'layout'"):
            try:
                rows.append(ast.literal_eval(line.strip()))
            except (ValueError, SyntaxError):
                pass
    src = "progress lines (the bench did not finish)"
print(f"== summary: pytest exit {rc}: {summary or 'no summary line (timeout?)'}")
print(f"== decode rows from {src}")
cols = ["layout", "mode", "batch", "tokens_per_s", "ms_per_step", "speedup", "vs_best_first",
        "cache_MB_per_seq", "peak_GB", "est_GB", "prefill_s", "capture_s", "status"]
def fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
print("| " + " | ".join(cols) + " |")
print("|" + "---|" * len(cols))
for r in rows:
    print("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
tps = {}
for r in rows:
    if "tokens_per_s" in r:
        tps.setdefault(r["layout"], {})[r["mode"]] = r["tokens_per_s"]
names = list(tps)
if len(names) >= 2:
    t, h = tps[names[0]], tps[names[1]]
    for mode in t:
        if mode in h:
            print(f"ratio {names[1]} / {names[0]} [{mode}]: {h[mode] / t[mode]:.2f}x")
    bt, bh = max(t, key=t.get), max(h, key=h.get)
    print(f"ratio best vs best: {names[1]} {bh} {h[bh]:.0f} tok/s / {names[0]} {bt} {t[bt]:.0f} "
          f"tok/s = {h[bh] / t[bt]:.2f}x (issue target >= 5x)")
    for m in ("graph[sdpa]", "graph[matmul]"):
        for n in names:
            if m in tps[n] and "off" in tps[n]:
                print(f"cuda graph gain {n} {m} / off: {tps[n][m] / tps[n]['off']:.2f}x")
else:
    print("fewer than two layouts measured: no ratio")
PYEOF
rm -rf "$tmp"
