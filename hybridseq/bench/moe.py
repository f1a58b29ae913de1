"""`hybridseq bench moe`: the MoE layer's forward+backward against a dense SwiGLU MLP with the same
active FLOPs.

For each expert configuration "E x k" (d_ff per expert scaled so that k * d_ff is the same for all
configurations: the default 8x2 at d_ff 5632 and the fine-grained 64x8 at d_ff 1408) and each
routing:
- ``balanced``: a fixed assignment, token n -> experts (n*k + j) mod E: exactly N*k/E per expert;
- ``skewed``: a fixed assignment drawn per token without replacement with P(e) ~ 1/(e+1)
  (Zipf; expert 0 gets about 3x the mean load at 8x2);
- ``router``: the layer's own (randomly initialised) router;
the rows give the fwd and fwd+bwd times of each backend (``impl``), the TFLOP/s of its active
matmul FLOPs (router + k experts; fwd+bwd = 3x fwd) and ``vs_dense``: dense fwd+bwd time / MoE
fwd+bwd time, the dense layer being x -> silu(x W_g) * (x W_u) -> W_d with d_ff_dense = k * d_ff
(gate and up fused in one GEMM). The dense layer is timed before and after all MoE rows, with
each activation of ``--dense-acts`` (``torch``: F.silu(g) * u through autograd; ``fused``: the
Triton SwiGLU of ``kernels.swiglu`` that the MoE experts use; ``block``: the shipped ``mlp``
block), and again (fwd+bwd) after every MoE row: each row's ratio is taken against the mean of
the two dense timings that frame it (``dense_ms``, first act): ``vs_dense`` (first act) and
``vs_dense_<act>``. An H100 under sustained GEMM load sits at its power cap and its SM clock
falls from about 1.9 to 1.3-1.56 GHz, so a timing depends on what ran before it; the framing
timings see the same state as the row, and ``--preheat`` seconds of dense fwd+bwd (default 30 on
CUDA: ``PREHEAT_S``) bring the GPU to its steady state before the first timing (after only a few
seconds it is still heating, and the first row reads about 2% low). ``--no-bracket``: the mean
of the first and last dense timings of the run instead. Forced routings keep
the router's cost (its logits, softmax, losses) and replace only the chosen experts (weights =
renormalised router probabilities).
``--variants`` times the grouped backend with other knobs (``mlp``/``act``/``layout``/``gemm``/
``permute``: MoEBlock attributes, see ``parse_variant``) on ``--variant-rows``. Anchors measured
in the same run: one dense bf16 matmul and one ``torch._grouped_mm`` of the expert shape
(TFLOP/s), each expert GEMM alone per operand layout (``--gemm-layouts``), and the permutation
micro-benchmark (gather-only permute/unpermute vs index/index_add) when ``--permute`` is given.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from hybridseq.bench.common import add_back_to_back_argument, preheat, time_fn
from hybridseq.blocks.moe import MoEBlock, MoEKernels, MoESpec, megablocks_available
from hybridseq.blocks.moe.router import RouterOutput

COLUMNS = ["what", "impl", "fwd_ms", "fwd_bwd_ms", "tflops", "vs_dense", "dense_ms", "host_syncs"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--d-ff", type=int, default=5632, help="expert d_ff of the first config")
    parser.add_argument("--configs", default="8x2,64x8",
                        help="comma-separated EXPERTSxTOPK; d_ff scaled to keep top_k * d_ff fixed")
    parser.add_argument("--routings", default="balanced,skewed,router")
    parser.add_argument("--impls", default="grouped,grouped:torch,megablocks",
                        help="backends to time, IMPL[:PERMUTE] with PERMUTE auto|torch|triton for "
                             "grouped (megablocks skipped when not importable; loop allowed)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--permute", action="store_true", help="also time the permutation variants")
    parser.add_argument("--profile", action="store_true",
                        help="print a torch.profiler kernel table of one fwd+bwd per configuration (first impl)")
    parser.add_argument("--variants", default="",
                        help="';'-separated grouped-backend variants timed on --variant-rows (or on "
                             "their own rows: 'VARIANT@8x2:balanced,64x8:skewed'), each "
                             "'key=value,...' with keys mlp (auto|fused|autograd), act (auto|torch|triton), "
                             "layout (kernels.grouped_mlp.LAYOUTS), permute (auto|torch|triton), "
                             "gemm (torch: torch._grouped_mm | loop: cuBLAS per expert, one host sync), "
                             "router (auto|torch|triton: the router logits kernel), "
                             "topk (auto|torch|triton: the fused softmax/top-k of kernels.router_topk)")
    parser.add_argument("--variant-rows", default="8x2:balanced",
                        help="comma-separated EXPERTSxTOPK:ROUTING rows that each variant is timed on")
    parser.add_argument("--jsonl", default="",
                        help="also append each row to this file as soon as it is measured (one JSON "
                             "object a line, ratios not filled in), so a run cut short keeps its rows")
    parser.add_argument("--gemm-layouts", action="store_true",
                        help="also time each expert GEMM of the first config alone per operand layout")
    add_back_to_back_argument(parser, "fwd+bwd (MoE and dense alike)")
    parser.add_argument("--no-bracket", dest="bracket", action="store_false",
                        help="compare each MoE row with the mean of the dense anchor's first and "
                             "last timing of the run, instead of (default) with the mean of the "
                             "dense fwd+bwd timed just before and just after that row: an H100 "
                             "under sustained GEMM load sits at its power cap, its SM clock falls "
                             "by up to a third, and a timing depends on what ran before it")
    parser.add_argument("--preheat", type=float, default=None,
                        help="seconds of dense fwd+bwd before the first timing (default 30 on CUDA, "
                             "0 elsewhere): the GPU reaches its steady power, clock and temperature "
                             "before the first dense anchor, so the first MoE row is not compared "
                             "with timings taken while it was still heating")
    parser.add_argument("--dense-acts", default="torch,fused",
                        help="dense anchors (see _dense_row): torch | fused | block | block_fused; "
                             "vs_dense uses the first, vs_dense_<act> each")


def fixed_assignment(kind: str, n: int, e: int, k: int, device) -> torch.Tensor:
    if kind == "balanced":
        s = torch.arange(n * k, device=device).view(n, k)
        return s.remainder(e)
    if kind == "skewed":
        g = torch.Generator(device="cpu").manual_seed(0)
        p = 1.0 / torch.arange(1, e + 1, dtype=torch.float64)
        return torch.multinomial(p.expand(n, e), k, replacement=False, generator=g).to(device)
    raise ValueError(kind)


def force_routing(blk: MoEBlock, indices: torch.Tensor) -> None:
    """Make ``blk.router`` (softmax) choose ``indices`` (N, k): its logits and fused softmax/top-k
    with the routing sums as usual (``kernels.router_topk.softmax_topk_stats``), its choice
    replaced by these indices, weights = their renormalised probabilities, and the slot counts
    recomputed for them (so a forced row pays what a learned router pays, plus a gather and a
    histogram)."""
    from hybridseq.kernels.moe.permute import histogram
    from hybridseq.kernels.moe.router_topk import softmax_topk_stats

    router = blk.router

    def forward(x):
        logits, x_tap = router.logits_and_input(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            probs, _, _, lse, stats = softmax_topk_stats(logits, indices.shape[1], True, router.topk_impl)
            w = probs.gather(1, indices)
        stats = stats._replace(counts=histogram(indices, router.n_experts))
        return RouterOutput(logits, probs, indices, w / w.sum(-1, keepdim=True), lse=lse, x=x_tap,
                            stats=stats)

    router.forward = forward


def _fwd_bwd(fn, inputs, grads_out):
    def step():
        outs = fn()
        torch.autograd.grad(outs, inputs, grads_out)
    return step


def _matmul_anchors(args, dtype, device, d, f_exp, e):
    rows = []
    m = args.tokens * 2 // 1
    a = torch.randn(m, d, device=device, dtype=dtype)
    b = torch.randn(d, 2 * f_exp, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, warmup=args.warmup, iters=args.iters, device=device)["median_ms"]
    fl = 2 * m * d * 2 * f_exp
    rows.append({"what": f"anchor dense matmul {m}x{d}x{2 * f_exp}", "fwd_ms": t, "tflops": fl / t / 1e9})
    if device.type == "cuda" and hasattr(torch, "_grouped_mm") and dtype == torch.bfloat16:
        bs = torch.randn(e, d, 2 * f_exp, device=device, dtype=dtype)
        offs = torch.arange(1, e + 1, device=device, dtype=torch.int32) * (m // e)
        t = time_fn(lambda: torch._grouped_mm(a, bs, offs=offs), warmup=args.warmup, iters=args.iters,
                    device=device)["median_ms"]
        rows.append({"what": f"anchor torch._grouped_mm {e} groups", "fwd_ms": t, "tflops": fl / t / 1e9})
    return rows


def _permute_rows(args, dtype, device, d):
    from hybridseq.kernels.moe.permute import (permute, permute_ref, sort_by_expert, unpermute,
                                               unpermute_ref)

    rows = []
    n, k, e = args.tokens, 2, 8
    idx = fixed_assignment("skewed", n, e, k, device)
    order, counts, inv = sort_by_expert(idx, e)
    x = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    y = torch.randn(n * k, d, device=device, dtype=dtype, requires_grad=True)
    w = torch.rand(n, k, device=device, dtype=torch.float32, requires_grad=True)
    gx = torch.randn(n * k, d, device=device, dtype=dtype)
    gy = torch.randn(n, d, device=device, dtype=dtype)
    variants = {
        "permute triton (fused bwd)": (lambda: permute(x, order, inv, k, impl="triton"), [x], gx),
        "permute torch gathers": (lambda: permute(x, order, inv, k, impl="torch"), [x], gx),
        "permute index (ref)": (lambda: permute_ref(x, order, k), [x], gx),
        "unpermute triton (fused fwd, bwd)": (lambda: unpermute(y, order, inv, w, impl="triton"), [y, w], gy),
        "unpermute torch gather+mul+sum": (lambda: unpermute(y, order, inv, w, impl="torch"), [y, w], gy),
        "unpermute index_add (ref)": (lambda: unpermute_ref(y, order, w), [y, w], gy),
    }
    if device.type != "cuda":
        variants = {k_: v for k_, v in variants.items() if "triton" not in k_}
    for name, (fn, inputs, g) in variants.items():
        t = time_fn(_fwd_bwd(fn, inputs, g), warmup=args.warmup, iters=args.iters, device=device)
        rows.append({"what": name, "fwd_bwd_ms": t["median_ms"]})
    return rows


def count_host_syncs(fn, device) -> int | None:
    """Host synchronisations during ``fn()`` (CUDA sync debug mode), None off CUDA."""
    if device.type != "cuda":
        return None
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(c.message).lower() for c in caught)


def _profile(fn, title, device) -> None:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    with profile(activities=acts) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(f"--- profile: {title} (one fwd+bwd) ---")
    print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60))


DENSE_ACTS = ("torch", "fused", "block", "block_fused")
# default --preheat on CUDA. Measured on an H100 (8x2 rows, --back-to-back 8): after
# 3 s the dense anchor still drifted from 10.55 to 10.9 ms over the first half minute and the first
# MoE row read about 2% low (0.897-0.900 against 0.911-0.925 for the same code later in the run);
# after 30 s the dense anchor stayed at 11.04-11.09 ms and every row read 0.920-0.933
PREHEAT_S = 30.0


def _dense_fn(x, active_ff, act="torch"):
    """(dense forward closure, its parameters) of the dense SwiGLU anchor. act: ``torch`` one
    fused gate|up GEMM, F.silu(g) * u (autograd); ``fused`` the same GEMM, ``kernels.swiglu``
    (Triton); ``block`` the shipped ``MLPBlock`` (the same math as ``fused``: one gate|up
    ``nn.Linear``); ``block_fused`` an MLP with two projections on the same weights:
    separate gate and up GEMMs (on the two halves of the block's weight) and
    ``kernels.swiglu.silu_mul`` (Triton)."""
    from hybridseq.blocks.mlp import MLPBlock
    from hybridseq.kernels.activations.swiglu import silu_mul, swiglu

    if act not in DENSE_ACTS:
        raise ValueError(f"--dense-acts: {act!r} is not one of {DENSE_ACTS}")
    d = x.shape[-1]
    if act.startswith("block"):
        torch.manual_seed(0)
        with torch.device(x.device):
            mlp = MLPBlock(d, {"d_ff": active_ff, "activation": "swiglu", "bias": False}).to(x.dtype)
        params = list(mlp.parameters())

        def dense():
            if act == "block":
                return mlp(x)
            w_g, w_u = mlp.gate_up_proj.weight.chunk(2, dim=0)
            return mlp.down_proj(silu_mul(F.linear(x, w_g), F.linear(x, w_u)))
    else:
        w_in = (torch.randn(d, 2 * active_ff, device=x.device, dtype=x.dtype) * 0.02).requires_grad_()
        w_out = (torch.randn(active_ff, d, device=x.device, dtype=x.dtype) * 0.02).requires_grad_()
        params = [w_in, w_out]

        def dense():
            if act == "fused":
                return swiglu(x @ w_in) @ w_out
            gate, up = (x @ w_in).chunk(2, -1)
            return (F.silu(gate) * up) @ w_out

    return dense, params


def _dense_fwd_bwd_ms(args, x, gy, fn_params) -> float:
    dense, params = fn_params
    return time_fn(_fwd_bwd(dense, [x] + params, gy), warmup=args.warmup, iters=args.iters,
                   device=x.device, back_to_back=getattr(args, "back_to_back", 1))["median_ms"]


def _dense_row(args, x, gy, active_ff, label, act, fn_params):
    """A row of the dense SwiGLU anchor ``fn_params`` (``_dense_fn(x, active_ff, act)``), forward
    and fwd+bwd."""
    t_f = time_fn(fn_params[0], warmup=args.warmup, iters=args.iters, device=x.device)["median_ms"]
    t_b = _dense_fwd_bwd_ms(args, x, gy, fn_params)
    d = x.shape[-1]
    flops = 3 * 2 * 3 * d * active_ff * x.shape[0]
    return {"what": f"dense swiglu d_ff={active_ff} act={act} ({label})", "fwd_ms": t_f, "fwd_bwd_ms": t_b,
            "tflops": flops / t_b / 1e9, "vs_dense": None, "dense_act": act}


_BLOCKS: dict = {}


def _block(d, spec, device, dtype, kernels: MoEKernels) -> MoEBlock:
    """One MoEBlock per (spec, kernels, device, dtype), built and initialised on the device with
    seed 0 (every variant of a config has the same weights)."""
    key = (d, tuple(sorted(spec.items())), kernels, str(device), dtype)
    if key not in _BLOCKS:
        torch.manual_seed(0)
        with torch.device(device):
            _BLOCKS[key] = MoEBlock(d, spec, kernels=kernels).to(dtype=dtype)
    return _BLOCKS[key]


VARIANT_KEYS = {"mlp": "mlp", "act": "act", "layout": "layout", "permute": "permute", "gemm": "gemm",
                "router": "router_logits", "topk": "router_topk"}


def parse_variant(text: str) -> dict:
    """'mlp=fused,act=triton,layout=n.k' -> {MoEKernels field: value} (see ``--variants``)."""
    out = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        key, sep, val = item.partition("=")
        if not sep or key not in VARIANT_KEYS:
            raise ValueError(f"--variants: bad item {item!r}; use key=value with keys {sorted(VARIANT_KEYS)}")
        out[VARIANT_KEYS[key]] = val
    return out


def _moe_rows(args, x, gy, e, k, f, impl, profile, routings=None, variant="", bracket=None) -> list[dict]:
    """Rows of one MoE configuration; ``vs_dense`` is filled in by ``run``. ``bracket``: called
    right after each row's fwd+bwd timing, returns the dense anchors' (before, after) times that
    frame it (kept in the row as ``_bracket``)."""
    device, dtype = x.device, x.dtype
    n, d = x.shape
    spec = {"n_experts": e, "top_k": k, "d_ff": f}
    fwd_flops = MoESpec(**spec).flops_per_token(d, n) * n
    base, _, perm = impl.partition(":")
    kernels = MoEKernels(**{"permute": perm or "auto", **parse_variant(variant)})
    blk = _block(d, {**spec, "impl": base}, device, dtype, kernels)
    params = list(blk.parameters())
    xb = x.detach().view(1, n, d).requires_grad_()
    rows = []
    routings = routings or args.routings.split(",")
    for routing in routings:
        what = f"moe {e}x{k} d_ff={f} {routing}"
        label = f" [{variant}]" if variant else ""
        try:
            blk.router.__dict__.pop("forward", None)  # undo a previous forcing
            if routing in ("balanced", "skewed"):
                force_routing(blk, fixed_assignment(routing, n, e, k, device))
            blk(xb)
            load = blk.metrics["load"]
            what += f" (max/mean load {float(load.max() / load.mean()):.2f})"

            def fwd():
                return blk(xb)

            def both():
                y = blk(xb)
                torch.autograd.grad([y, blk.aux_loss], [xb] + params,
                                    [gy.view(1, n, d), torch.ones((), device=device)])

            t_f = time_fn(fwd, warmup=args.warmup, iters=args.iters, device=device)["median_ms"]
            t_b = time_fn(both, warmup=args.warmup, iters=args.iters, device=device,
                          back_to_back=getattr(args, "back_to_back", 1))["median_ms"]
            if profile and routing == routings[0]:
                _profile(both, f"moe {e}x{k} {impl} {routing}", device)
            row = {"what": what + label, "impl": impl, "fwd_ms": t_f, "fwd_bwd_ms": t_b,
                   "tflops": 3 * fwd_flops / t_b / 1e9}
            if bracket is not None:
                row["_bracket"] = bracket()
            row["host_syncs"] = count_host_syncs(both, device)
            rows.append(row)
        except Exception as exc:  # keep the other rows: report the failure in the table
            rows.append({"what": what + label, "impl": impl, "error": f"{type(exc).__name__}: {exc}"[:160]})
    return rows


def _gemm_layout_rows(args, dtype, device, d, f, e, k) -> list[dict]:
    """Each expert GEMM of the E x k config alone (balanced groups), per B operand layout:
    n = N-contiguous (row-major), k = K-contiguous (column-major); no copies timed. The wgrads
    are timed in the layout the op uses (x^T view, dh row-major)."""
    from hybridseq.kernels.moe.grouped_mlp import as_layout

    m = args.tokens * k
    offs = torch.arange(1, e + 1, device=device, dtype=torch.int32) * (m // e)
    mk = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    x, h, a, dy = mk(m, d), mk(m, 2 * f), mk(m, f), mk(m, d)
    w_in, w_out = mk(e, d, 2 * f), mk(e, f, d)
    cases = [("fwd in", x, w_in), ("fwd out", a, w_out),
             ("dgrad out", dy, w_out.transpose(-2, -1)), ("dgrad in", h, w_in.transpose(-2, -1))]
    rows = []
    for name, lhs, w in cases:
        for code in ("n", "k"):
            b = as_layout(w, code)
            fl = 2 * m * b.shape[-2] * b.shape[-1]
            t = time_fn(lambda: torch._grouped_mm(lhs, b, offs=offs), warmup=args.warmup, iters=args.iters,
                        device=device)["median_ms"]
            rows.append({"what": f"gemm {name} {tuple(lhs.shape)}x{tuple(b.shape)} B={code}", "fwd_ms": t,
                         "tflops": fl / t / 1e9})
    for name, lhs_t, g in (("wgrad in", x.t(), h), ("wgrad in^T (K-major w_in)", h.t(), x),
                           ("wgrad out", a.t(), dy)):
        fl = 2 * m * lhs_t.shape[0] * g.shape[-1]
        t = time_fn(lambda: torch._grouped_mm(lhs_t, g, offs=offs), warmup=args.warmup, iters=args.iters,
                    device=device)["median_ms"]
        rows.append({"what": f"gemm {name} {tuple(lhs_t.shape)}x{tuple(g.shape)}", "fwd_ms": t,
                     "tflops": fl / t / 1e9})
    return rows


class _StreamRows(list):
    """A list of rows that also appends each new row to a JSON-lines file (when a path is given)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def _write(self, new) -> None:
        if self.path:
            import json

            with open(self.path, "a") as fh:
                for r in new:
                    fh.write(json.dumps(r, default=str) + "\n")

    def append(self, row) -> None:
        self._write([row])
        super().append(row)

    def __iadd__(self, new):
        new = list(new)
        self._write(new)
        return super().__iadd__(new)


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    d, n = args.d_model, args.tokens
    configs = [tuple(int(v) for v in c.lower().split("x")) for c in args.configs.split(",") if c]
    e0, k0 = configs[0]
    active_ff = k0 * args.d_ff
    impls = [i for i in args.impls.split(",") if i]
    if not megablocks_available():
        impls = [i for i in impls if not i.startswith("megablocks")]
    dense_acts = [a for a in args.dense_acts.split(",") if a]
    if device.type != "cuda":  # the fused activations are Triton kernels
        dense_acts = [a for a in dense_acts if "fused" not in a] or ["torch"]
    variants = [v.strip() for v in args.variants.split(";") if v.strip()]
    for v in variants:
        parse_variant(v.partition("@")[0])  # fail before timing anything
    torch.manual_seed(0)
    x = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    gy = torch.randn(n, d, device=device, dtype=dtype)

    # dense anchors (SwiGLU, d_ff = k * d_ff_expert), timed before and after the MoE rows and,
    # unless --no-bracket, again after each MoE row (fwd+bwd only): each row is compared with the
    # dense timings that frame it
    rows = _StreamRows(getattr(args, "jsonl", ""))
    dense_fns = {act: _dense_fn(x, active_ff, act) for act in dense_acts}
    heat = getattr(args, "preheat", None)
    heat = (PREHEAT_S if device.type == "cuda" else 0.0) if heat is None else heat
    dense0, params0 = dense_fns[dense_acts[0]]
    preheat(_fwd_bwd(dense0, [x] + params0, gy), heat, device)
    rows += [_dense_row(args, x, gy, active_ff, "anchor, first", act, dense_fns[act])
             for act in dense_acts]
    last = {act: rows[i]["fwd_bwd_ms"] for i, act in enumerate(dense_acts)}

    def bracket():
        now = {act: _dense_fwd_bwd_ms(args, x, gy, dense_fns[act]) for act in dense_acts}
        pair = {act: (last[act], now[act]) for act in dense_acts}
        last.update(now)
        return pair

    br = bracket if getattr(args, "bracket", True) else None
    for e, k in configs:
        for impl in impls:
            rows += _moe_rows(args, x, gy, e, k, active_ff // k, impl, args.profile and impl == impls[0],
                              bracket=br)
    for spec_text in variants:
        variant, _, own_rows = spec_text.partition("@")
        variant = variant.strip()
        for item in (r.strip() for r in (own_rows or args.variant_rows).split(",") if r.strip()):
            cfg, _, routing = item.partition(":")
            e, k = (int(v) for v in cfg.lower().split("x"))
            rows += _moe_rows(args, x, gy, e, k, active_ff // k, "grouped", False,
                              routings=[routing or "balanced"], variant=variant, bracket=br)
    rows += [_dense_row(args, x, gy, active_ff, "anchor, again at the end", act, dense_fns[act])
             for act in dense_acts]
    dense = {act: [r["fwd_bwd_ms"] for r in rows if r.get("dense_act") == act] for act in dense_acts}
    mean = {act: sum(ts) / len(ts) for act, ts in dense.items()}
    for r in rows:
        if r.get("fwd_bwd_ms") and "dense_act" not in r:
            pair = r.get("_bracket")
            ref = {act: (sum(pair[act]) / 2 if pair else mean[act]) for act in dense_acts}
            r["dense_ms"] = ref[dense_acts[0]]
            r["vs_dense"] = ref[dense_acts[0]] / r["fwd_bwd_ms"]
            for act in dense_acts:
                r[f"vs_dense_{act}"] = ref[act] / r["fwd_bwd_ms"]
    for act in dense_acts:
        rows.append({"what": f"dense anchor act={act}: mean of {len(dense[act])} (first, last)",
                     "fwd_bwd_ms": mean[act]})
    rows += _matmul_anchors(args, dtype, device, d, args.d_ff, e0)
    if args.gemm_layouts and device.type == "cuda" and dtype == torch.bfloat16:
        rows += _gemm_layout_rows(args, dtype, device, d, active_ff // k0, e0, k0)
    if args.permute:
        try:
            rows += _permute_rows(args, dtype, device, d)
        except Exception as exc:
            rows.append({"what": "permute micro-benchmark", "error": f"{type(exc).__name__}: {exc}"[:160]})
    cols = COLUMNS + [f"vs_dense_{a}" for a in dense_acts]
    cols += ["error"] if any("error" in r for r in rows) else []
    return [{c: r.get(c) for c in cols} for r in rows]  # one column order for every row


if __name__ == "__main__":  # python -m hybridseq.bench.moe: the same as `hybridseq bench moe`
    from .common import script_main

    script_main(add_arguments, run, __doc__)
