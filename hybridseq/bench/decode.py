"""Decoding speed: tokens/s and cache bytes per sequence, per layout, at prompt length P, batch B.

For each layout: build the model (random weights, ``--dtype``), prefill B prompts of P tokens
through the inference cache under ``torch.inference_mode`` (in chunks of ``--prefill-chunk``
tokens, only the last position's logits computed, the cache in ``--dtype``), then, for each
decode mode, run ``--warmup`` untimed and ``--new-tokens`` timed greedy one-token steps (argmax
outside the graph, in every mode). The modes continue the same cache one after the other, so
one prefill serves them all (the cache holds P + modes x (warmup + new tokens) positions).
``prefill`` and ``time_decode`` also time ``hybridseq compare``'s decode columns
(``hybridseq.compare.measure.decode_speed``: mode off, one warm-up step, short prompt).

Modes (``--cuda-graph``): ``off`` = the ordinary ``model(next_ids, cache=cache)``; ``on`` = the
same one-token forward captured in a CUDA graph (``hybridseq.decode_graph.GraphedDecodeStep``);
``both`` = off then on; ``static`` = the graph's step object without capture (any device);
``auto`` (default) = ``on`` on CUDA, ``off`` elsewhere.

Columns: ``tokens_per_s`` = B x steps / time of the timed steps; ``ms_per_step``;
``capture_s`` (warm-up + capture); ``cache_MB_per_seq`` = the cache's bytes / B (Mamba layers
constant; attention: K and V of every position, or of the window) and its closed form;
``est_GB`` (the estimate printed before running, ``estimate_memory``) and ``peak_GB`` (measured);
``speedup`` = tokens/s over the first layout's in the same mode, ``vs_best_first`` = over the
first layout's best mode.

Memory: before anything runs, ``estimate_memory`` is printed per layout; when the estimate at
``--batch`` exceeds ``--memory-gb`` (default: 92% of the GPU's memory; no limit on CPU), the
bench says so and measures every layout at the largest batch (a multiple of 8, or below 8 any)
that fits all of them (``--no-fit-batch``: run anyway).

    hybridseq bench decode layouts/transformer.yaml layouts/jamba.yaml --prompt 8192 --batch 64
    hybridseq bench decode --suite 350m      # ~350M transformer vs Jamba-style hybrid
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
_TRANSFORMER_350M = ("transformer-354M", "layouts/transformer.yaml",
                     ["model.d_model=1024", "blocks.A.n_heads=16", 'layout="(A F)*24"'])
_JAMBA_TOTAL = ("jamba-358M-total", "layouts/jamba.yaml",
                _JAMBA_350M + ["blocks.E.n_experts=2", "blocks.E.top_k=1"])
_JAMBA_ACTIVE = ("jamba-358M-active", "layouts/jamba.yaml",
                 _JAMBA_350M + ["blocks.E.n_experts=4", "blocks.E.top_k=2"])
SUITES = {
    # a pair with the same total parameter count (354M vs 358M)
    "350m": [_TRANSFORMER_350M, _JAMBA_TOTAL],
    # plus a hybrid with the same *active* parameters (496M total)
    "350m-all": [_TRANSFORMER_350M, _JAMBA_TOTAL, _JAMBA_ACTIVE],
}
MODES = ("auto", "on", "off", "both", "static")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("layouts", nargs="*", help="layout YAML files")
    parser.add_argument("--suite", choices=sorted(SUITES), default=None,
                        help="a built-in list of layouts with overrides (run from the repository root)")
    parser.add_argument("--overrides", nargs="*", default=[], help="key=value, applied to every layout")
    parser.add_argument("--prompt", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32, help="timed decode steps per mode")
    parser.add_argument("--warmup", type=int, default=4, help="untimed decode steps first, per mode")
    parser.add_argument("--prefill-chunk", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=50304, help="vocab for layouts whose vocab_size is auto")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    parser.add_argument("--device", default=None)
    parser.add_argument("--cuda-graph", choices=MODES, default="auto",
                        help="decode modes: on (CUDA graph), off (ordinary), both, static (graph "
                             "step without capture), auto (on with CUDA, else off)")
    parser.add_argument("--memory-gb", type=float, default=None,
                        help="memory budget for the batch check (default 92%% of the GPU)")
    parser.add_argument("--no-fit-batch", action="store_true",
                        help="do not lower the batch when the estimate exceeds the budget")
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


def _modes(args, device) -> list[str]:
    """The modes to time: "off", "graph", "static"."""
    mode = args.cuda_graph
    if mode == "auto":
        mode = "on" if device.type == "cuda" else "off"
    if mode in ("on", "both") and device.type != "cuda":
        raise SystemExit(f"bench decode: --cuda-graph {mode} needs CUDA (use static on {device})")
    return {"off": ["off"], "on": ["graph"], "both": ["off", "graph"], "static": ["static"]}[mode]


def _config(path, overrides):
    from ..config import load_config

    return load_config(_find_layout(path), overrides=list(overrides))


def estimate_memory(cfg, vocab: int, batch: int, prompt: int, cap: int, chunk: int,
                    dtype_bytes: int) -> dict:
    """Peak memory estimate (bytes) of the bench for one layout, from the config alone:

    - ``weights``: total parameters x dtype bytes;
    - ``cache``: batch x ``state_bytes(cap)`` (KV caches in the dtype, SSM states fp32);
    - ``prefill``: the working set of one chunk of T = batch x min(chunk, prompt) tokens, the
      largest layer's temporaries, in dtype bytes: residual stream and norms 4 d, plus the widest
      block's intermediates per token (its spec's ``activation_elements``), and the last
      position's logits (batch x V, fp32);
    - ``total`` = weights + cache + 1.25 x prefill (allocator slack)."""
    from ..model import padded_vocab_size, param_counts, state_bytes

    c = cfg
    d = c.model.d_model
    total_params, _ = param_counts(c, vocab)
    V = padded_vocab_size(c, vocab)
    T = batch * min(chunk, prompt)
    width = max(spec.activation_elements(d) for _, spec in c.layers())
    prefill = T * (4 * d + width) * dtype_bytes + batch * V * 4
    weights = total_params * dtype_bytes
    cache = batch * state_bytes(c, cap, dtype_bytes)
    return {"weights": weights, "cache": cache, "prefill": prefill,
            "total": int(weights + cache + 1.25 * prefill)}


def _cap(args, n_modes: int) -> int:
    return args.prompt + n_modes * (args.warmup + args.new_tokens)


def fit_batch(estimates, budget: float, batch: int) -> int:
    """The largest batch <= ``batch`` (a multiple of 8 when >= 8) whose estimate fits ``budget``
    for every layout; ``estimates``: callables batch -> total bytes. 0 when even 1 does not."""
    cands = sorted({*range(8, batch + 1, 8), *range(1, min(batch, 8) + 1), batch}, reverse=True)
    for b in cands:
        if all(est(b) <= budget for est in estimates):
            return b
    return 0


def prefill(model, ids, cache, chunk: int):
    """Feed ``ids`` (B, P) into ``cache`` in chunks of ``chunk`` tokens, computing only the last
    position's logits; returns them (B, V). The caller sets the grad mode (``bench_layout``:
    inference mode; ``hybridseq.compare.measure.decode_speed``: no_grad)."""
    for s in range(0, ids.shape[1], chunk):
        logits = model(ids[:, s:s + chunk], cache=cache, logits_to_keep=1).logits
    return logits[:, -1]


def time_decode(model, cache, nxt, device, stats: dict, *, new_tokens: int, warmup: int,
                mode: str = "off"):
    """``warmup`` untimed, then ``new_tokens`` timed greedy one-token steps that continue
    ``cache`` from the tokens ``nxt`` (B,); argmax outside the step in every mode. ``mode``:
    "off" (the model's ordinary forward), "graph" (captured CUDA graph) or "static" (the graph's
    step without capture). Fills ``stats``
    (``ms_per_step``, ``tokens_per_s``; ``capture_s`` first, so a mode that fails later still
    reports it); returns the last tokens."""
    from ..decode_graph import GraphedDecodeStep

    B, n = nxt.shape[0], new_tokens
    if mode == "off":
        def step(x):
            return model(x[:, None], cache=cache).logits[:, -1]
    else:
        t0 = time.perf_counter()
        step = GraphedDecodeStep(model, cache, capture=mode == "graph")
        _sync(device)
        stats["capture_s"] = time.perf_counter() - t0
    for _ in range(warmup):
        nxt = step(nxt).argmax(-1)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        nxt = step(nxt).argmax(-1)
    _sync(device)
    dt = time.perf_counter() - t0
    stats.update({"ms_per_step": 1e3 * dt / max(n, 1),
                  "tokens_per_s": B * n / dt if dt > 0 else 0.0})
    return nxt


@torch.inference_mode()
def bench_layout(name, cfg, args, device, dtype, modes, batch, est) -> list[dict]:
    from ..api import build_model

    model = build_model(cfg, vocab_size=args.vocab).to(device=device, dtype=dtype).eval()
    B, P, n = batch, args.prompt, args.new_tokens
    base = {"layout": name, "params_M": model.num_params() / 1e6,
            "active_M": model.num_params(active=True) / 1e6, "batch": B, "prompt": P}
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, model.vocab_size_unpadded, (B, P), device=device, generator=gen)
    cache = model.new_cache(B, _cap(args, len(modes)), device=device, dtype=dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    logits = prefill(model, ids, cache, args.prefill_chunk)
    _sync(device)
    base["prefill_s"] = time.perf_counter() - t0
    nxt = logits.argmax(-1)
    del logits, ids
    cache_mb = cache.nbytes() / B / 1e6
    closed = model.state_bytes(cache.max_seq_len, torch.tensor([], dtype=dtype).element_size()) / 1e6
    rows = []
    for mode in modes:
        row = {"layout": name, "mode": mode, **base}
        try:
            nxt = time_decode(model, cache, nxt, device, row, new_tokens=n, warmup=args.warmup,
                              mode=mode)
        except Exception as e:  # a mode that cannot run (capture refused, OOM): say so, go on
            row["status"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
            nxt = torch.zeros(B, dtype=torch.long, device=device)
        row.update({"cache_MB_per_seq": cache_mb, "cache_MB_per_seq_closed_form": closed,
                    "est_GB": est / 1e9})
        if device.type == "cuda":
            row["peak_GB"] = torch.cuda.max_memory_allocated(device) / 1e9
        rows.append(row)
    del cache, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def run(args) -> list[dict]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _DTYPES[args.dtype]
    jobs = [(p, p, args.overrides) for p in args.layouts]
    if args.suite:
        jobs += [(name, path, [*ov, *args.overrides]) for name, path, ov in SUITES[args.suite]]
    if not jobs:
        raise SystemExit("bench decode: give layout files or --suite")
    modes = _modes(args, device)
    cfgs = [(name, _config(path, ov)) for name, path, ov in jobs]
    dbytes = torch.tensor([], dtype=dtype).element_size()
    cap = _cap(args, len(modes))

    def est_fn(cfg):
        return lambda b: estimate_memory(cfg, args.vocab, b, args.prompt, cap, args.prefill_chunk,
                                         dbytes)["total"]

    budget = args.memory_gb * 1e9 if args.memory_gb else None
    if budget is None and device.type == "cuda":
        budget = 0.92 * torch.cuda.get_device_properties(device).total_memory
    batch = args.batch
    print(f"bench decode: prompt {args.prompt}, batch {batch}, {args.new_tokens} timed steps per "
          f"mode after {args.warmup}, modes {', '.join(modes)}, "
          f"cache capacity {cap}, {args.dtype}, {device}", file=sys.stderr, flush=True)
    for name, cfg in cfgs:
        e = estimate_memory(cfg, args.vocab, batch, args.prompt, cap, args.prefill_chunk, dbytes)
        print(f"  memory estimate {name} at batch {batch}: weights {e['weights'] / 1e9:.3g} GB + cache "
              f"{e['cache'] / 1e9:.3g} GB + prefill working set {e['prefill'] / 1e9:.3g} GB -> "
              f"{e['total'] / 1e9:.3g} GB" + (f" (budget {budget / 1e9:.3g} GB)" if budget else ""),
              file=sys.stderr, flush=True)
    if budget is not None and not args.no_fit_batch:
        over = [name for name, cfg in cfgs if est_fn(cfg)(batch) > budget]
        if over:
            fit = fit_batch([est_fn(cfg) for _, cfg in cfgs], budget, batch)
            print(f"  batch {batch} does not fit {', '.join(over)} (estimate above the budget); "
                  + (f"measuring every layout at batch {fit}, the largest that fits all"
                     if fit else "not even batch 1 fits: nothing measured"), file=sys.stderr, flush=True)
            if not fit:
                return [{"layout": name, "status": "does not fit at batch 1"} for name, _ in cfgs]
            batch = fit
    rows = []
    for name, cfg in cfgs:
        est = est_fn(cfg)(batch)
        try:
            new = bench_layout(name, cfg, args, device, dtype, modes, batch, est)
            rows += new
            if args.progress:
                for r in new:
                    print(r, file=sys.stderr, flush=True)
        except torch.cuda.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            rows.append({"layout": name, "batch": batch,
                         "status": f"OOM: {str(e).splitlines()[0][:80]}", "est_GB": est / 1e9})
    first = rows[0]["layout"] if rows else None
    ref = {r["mode"]: r["tokens_per_s"] for r in rows if r["layout"] == first and "tokens_per_s" in r}
    best = max(ref.values(), default=None)
    for r in rows:
        if "tokens_per_s" in r and r.get("mode") in ref and ref[r["mode"]] > 0:
            r["speedup"] = r["tokens_per_s"] / ref[r["mode"]]
        if "tokens_per_s" in r and best:
            r["vs_best_first"] = r["tokens_per_s"] / best
    return rows


if __name__ == "__main__":  # python -m hybridseq.bench.decode: the same as `hybridseq bench decode`
    from .common import script_main

    script_main(add_arguments, run, __doc__)
