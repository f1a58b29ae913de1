"""Decoding speed: tokens/s and cache bytes per sequence, per layout, at prompt length P, batch B.

For each layout: build the model (random weights, ``--dtype``), prefill B prompts of P tokens
through the inference cache (in chunks of ``--prefill-chunk`` tokens, only the last position's
logits computed), then time ``--new-tokens`` greedy one-token steps. ``tokens_per_s`` = B x steps
/ decode time; ``cache_MB_per_seq`` is the whole cache's bytes / B (Mamba layers: constant;
attention: KV of P + steps tokens, or of the window). ``speedup`` is relative to the first row.

    hybridseq bench decode layouts/transformer.yaml layouts/jamba.yaml --prompt 8192 --batch 64
    hybridseq bench decode --suite 350m      # the issue's comparison: ~350M transformer vs Jamba
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# ~350M-parameter presets (vocab 50304): GPT-3 "350M" transformer and two Jamba-style hybrids
# (same total parameters with 2 experts top-1; same active parameters with 4 experts top-2).
_JAMBA_350M = ["model.d_model=1024", "blocks.A.n_heads=16", "blocks.A.n_kv_heads=4",
               "blocks.F.d_ff=2816", "blocks.E.d_ff=2816",
               'layout="(M F M E M F M E A F M E M F M E)*2"']
SUITES = {
    "350m": [
        ("transformer-354M", "layouts/transformer.yaml",
         ["model.d_model=1024", "blocks.A.n_heads=16", 'layout="(A F)*24"']),
        ("jamba-358M-total", "layouts/jamba.yaml",
         _JAMBA_350M + ["blocks.E.n_experts=2", "blocks.E.top_k=1"]),
        ("jamba-358M-active", "layouts/jamba.yaml",
         _JAMBA_350M + ["blocks.E.n_experts=4", "blocks.E.top_k=2"]),
    ],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("layouts", nargs="*", help="layout YAML files")
    parser.add_argument("--suite", choices=sorted(SUITES), default=None,
                        help="a built-in list of layouts with overrides (run from the repository root)")
    parser.add_argument("--overrides", nargs="*", default=[], help="key=value, applied to every layout")
    parser.add_argument("--prompt", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=4, help="untimed decode steps first")
    parser.add_argument("--prefill-chunk", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=50304, help="vocab for layouts whose vocab_size is auto")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    parser.add_argument("--device", default=None)
    parser.add_argument("--progress", action="store_true", help="print each row to stderr when done")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _find_layout(path: str) -> str:
    """``path`` as given, else relative to the source checkout (suites name ``layouts/...``)."""
    if os.path.exists(path):
        return path
    alt = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", path)
    return alt if os.path.exists(alt) else path


@torch.no_grad()
def bench_layout(name, path, overrides, args, device, dtype) -> dict:
    from ..api import build_model
    from ..config import load_config

    cfg = load_config(_find_layout(path), overrides=list(overrides))
    model = build_model(cfg, vocab_size=args.vocab).to(device=device, dtype=dtype).eval()
    B, P, n = args.batch, args.prompt, args.new_tokens
    row = {"layout": name, "params_M": model.num_params() / 1e6,
           "active_M": model.num_params(active=True) / 1e6, "batch": B, "prompt": P}
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, model.vocab_size_unpadded, (B, P), device=device, generator=gen)
    cache = model.new_cache(B, P + args.warmup + n, device=device, dtype=dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    for s in range(0, P, args.prefill_chunk):
        logits = model(ids[:, s:s + args.prefill_chunk], cache=cache, logits_to_keep=1).logits
    _sync(device)
    row["prefill_s"] = time.perf_counter() - t0
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(args.warmup):
        nxt = model(nxt, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        nxt = model(nxt, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    dt = time.perf_counter() - t0
    row.update({"ms_per_step": 1e3 * dt / n, "tokens_per_s": B * n / dt,
                "cache_MB_per_seq": cache.nbytes() / B / 1e6,
                "cache_MB_per_seq_closed_form": model.state_bytes(cache.max_seq_len,
                                                                  torch.tensor([], dtype=dtype).element_size()) / 1e6})
    if device.type == "cuda":
        row["peak_GB"] = torch.cuda.max_memory_allocated(device) / 1e9
    del cache, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def run(args) -> list[dict]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _DTYPES[args.dtype]
    jobs = [(p, p, args.overrides) for p in args.layouts]
    if args.suite:
        jobs += [(name, path, [*ov, *args.overrides]) for name, path, ov in SUITES[args.suite]]
    if not jobs:
        raise SystemExit("bench decode: give layout files or --suite")
    rows = []
    for name, path, ov in jobs:
        try:
            rows.append(bench_layout(name, path, ov, args, device, dtype))
            if args.progress:
                print(rows[-1], file=sys.stderr, flush=True)
        except torch.cuda.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            rows.append({"layout": name, "status": f"OOM: {str(e).splitlines()[0][:80]}"})
    base = next((r["tokens_per_s"] for r in rows if "tokens_per_s" in r), None)
    for r in rows:
        if base and "tokens_per_s" in r:
            r["speedup"] = r["tokens_per_s"] / base
    return rows


if __name__ == "__main__":  # python -m hybridseq.bench.decode: the same as `hybridseq bench decode`
    from .common import script_main

    script_main(add_arguments, run, __doc__)
