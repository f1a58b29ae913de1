"""Causal conv1d and decode-step timings: Triton vs the PyTorch references and anchors.

Rows (bf16 by default, CUDA events through ``common.time_fn``, median):
- ``conv``: causal depthwise conv1d + bias + SiLU over (batch, seqlen, dim), forward and
  forward+backward, for ``triton`` (hybridseq), ``ref`` (causal_conv1d_ref), ``F.conv1d`` (torch's
  depthwise conv, groups=dim, on the (b, d, l) transpose made outside the timed region; with and
  without the SiLU) and mamba's ``causal_conv1d`` package when importable (same layout).
- ``conv_update``: one decoding token of the conv with a conv state, Triton vs ref.
- ``state_update``: one decoding token of the selective scan (selective_state_update), Triton vs
  ref, with z, D, dt_bias and softplus, B/C (b, n).

``fwd_ms``/``fwdbwd_ms``/``bwd_ms``: ``common.time_fn`` medians, one call per timed region after a
cache flush, so they include the Python launch overhead that the GPU waits for at small sizes.
Gradients are taken with ``torch.autograd.grad`` (nothing accumulates into ``.grad``);
``bwd_ms`` is the backward alone (``retain_graph`` on one forward's graph).
``graph_ms`` replays the forward 10 times in a CUDA graph (no launch gaps): the kernel's own time.
``--sweep`` forces each forward tile in turn through the shipped launch path (the module's tuned
cache), so its ``graph_ms`` is what ``HYBRIDSEQ_CONV_FWD=BL,BD,WARPS`` would ship.
``*_GBps`` is the bandwidth of the fewest bytes (inputs read once, outputs written once); the
``copy (ceiling)`` row is a device copy of the same bytes, the in-run bandwidth ceiling.
``--check`` first compares every Triton output (and, for the conv, every gradient) with the
reference at the benchmarked shape, with outputs poisoned (NaN) before the call. ``--sweep``
times and checks every forward tile of ``SWEEP_FWD_CONFIGS`` (a superset of the autotuner's list)
or of ``--fwd-configs``.
"""
from __future__ import annotations

import argparse
import importlib

import torch
import torch.nn.functional as F

from ..errors import HybridSeqError

DEFAULT_CONV = ["8x4096x2048x4"]  # batch x dim x seqlen x width (the anchor shape of BENCHMARKS.md)
DEFAULT_DECODE = ["64x4096x16"]  # batch x dim x dstate
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--conv-shapes", nargs="+", default=DEFAULT_CONV,
                        help="BxDxLxW (batch x dim x seqlen x width)")
    parser.add_argument("--decode-shapes", nargs="+", default=DEFAULT_DECODE,
                        help="BxDxN (batch x dim x dstate) for the decode steps")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--no-backward", action="store_true", help="conv forward only")
    parser.add_argument("--check", action="store_true",
                        help="compare Triton with the reference at each shape (poisoned outputs)")
    parser.add_argument("--sweep", action="store_true",
                        help="also time (and check) forward tiles one by one (--fwd-configs)")
    parser.add_argument("--fwd-configs", default=None,
                        help="tiles for --sweep, 'BLxBDxWARPS,...' (default: the kernel "
                             "module's SWEEP_FWD_CONFIGS); the env var "
                             "HYBRIDSEQ_CONV_FWD=BL,BD,WARPS pins the shipped forward to one")
    parser.add_argument("--device", default="cuda",
                        help="cuda (default); cpu only for smoke tests under TRITON_INTERPRET=1")


def _parse(text: str, n: int, what: str) -> tuple[int, ...]:
    parts = text.lower().replace("b", "").split("x")
    if len(parts) != n or not all(p.isdigit() for p in parts):
        raise HybridSeqError(f"hybridseq bench conv: {what}: expected {n} sizes joined by 'x', "
                             f"got {text!r}")
    return tuple(int(p) for p in parts)


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _graph_ms(fn, reps: int = 10):
    """Time of one fn() from a CUDA graph of ``reps`` calls (None when capture fails)."""
    if not torch.cuda.is_available():
        return None
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                fn()
        g.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / reps)
        del g
        return sorted(times)[len(times) // 2]
    except Exception:
        return None


class _Poisoned:
    """Make a Triton module's output allocations start as NaN (unwritten elements show)."""

    def __init__(self, module: str):
        self.mod = importlib.import_module(f"hybridseq.kernels.{module}")

    def __enter__(self):
        self.saved = self.mod._alloc
        self.mod._alloc = lambda shape, dtype, device: torch.full(shape, float("nan"),
                                                                  dtype=dtype, device=device)

    def __exit__(self, *exc):
        self.mod._alloc = self.saved


def _best_configs() -> str | None:
    """The block shapes the Triton conv autotuner picked (fwd; bwd), for the record."""
    mod = importlib.import_module("hybridseq.kernels.conv1d.triton_conv")
    out = []
    if getattr(mod, "FWD_PIN", None):
        bl, bd, nw = mod.FWD_PIN
        out.append(f"fwd BL{bl} BD{bd} w{nw} (pinned by {mod.FWD_PIN_ENV})")
    for kind, tuner in (("fwd", getattr(mod, "_conv_fwd_tuned", None)),
                        ("bwd", getattr(mod, "_conv_bwd_tuned", None))):
        cfg = getattr(tuner, "best_config", None)
        if cfg is not None:
            extra = f" GATHER{cfg.kwargs['GATHER']}" if "GATHER" in cfg.kwargs else ""
            out.append(f"{kind} BL{cfg.kwargs['BL']} BD{cfg.kwargs['BD']} w{cfg.num_warps}{extra}")
    return "; ".join(out) or None


def _check_conv(x, weight, bias, dy) -> dict:
    """Relative errors of the Triton conv (fwd, dx, dweight, dbias, dinit, final state) against
    the reference in float64, with an initial state and SiLU."""
    from hybridseq.kernels import causal_conv1d, causal_conv1d_ref

    b, _, d = x.shape
    w = weight.shape[1]
    st = torch.randn(b, w - 1, d, device=x.device, dtype=x.dtype)
    ins = [t.detach().clone().requires_grad_() for t in (x, weight, bias, st)]
    with _Poisoned("conv1d.triton_conv"):
        y, fs = causal_conv1d(ins[0], ins[1], ins[2], "silu", ins[3], True, impl="triton")
        grads = torch.autograd.grad((y * dy).sum() + fs.float().sum(), ins)
    up = [t.detach().double().requires_grad_() for t in ins]
    yr, fsr = causal_conv1d_ref(up[0], up[1], up[2], "silu", up[3], True)
    gr = torch.autograd.grad((yr * dy.double()).sum() + fsr.sum(), up)
    errs = {"y": _rel(y, yr), "final_state": _rel(fs, fsr)}
    for name, a, r in zip(("dx", "dweight", "dbias", "dinit"), grads, gr):
        errs[name] = _rel(a, r)
    worst = max(errs, key=lambda k: errs[k] if errs[k] == errs[k] else float("inf"))
    return {"max_rel_err": errs[worst], "worst": worst}


def _sweep_rows(x, weight, bias, label, fwd_bytes, args) -> list[dict]:
    """Kernel time (CUDA graph) and error of every forward config, forced one at a time."""
    from hybridseq.kernels import causal_conv1d_ref

    mod = importlib.import_module("hybridseq.kernels.conv1d.triton_conv")
    ref = causal_conv1d_ref(x.double(), weight.double(), bias.double(), "silu")
    key = mod.fwd_key(x, weight, None, True)
    saved = mod._TUNED.get(key)
    rows, working = [], []
    if args.fwd_configs:
        tiles = [mod.parse_fwd_pin(t) for t in args.fwd_configs.split(",") if t]
    else:
        tiles = list(mod.SWEEP_FWD_CONFIGS)
    try:
        for bl, bd, nw in tiles:
            row = {"op": "conv_fwd_sweep", "shape": label, "dtype": args.dtype,
                   "impl": f"BL{bl} BD{bd} w{nw}", "pin": f"{mod.FWD_PIN_ENV}={bl},{bd},{nw}"}
            mod._TUNED[key] = ({"BL": bl, "BD": bd}, nw)
            try:
                with torch.no_grad():
                    with _Poisoned("conv1d.triton_conv"):
                        y = mod.causal_conv1d_triton(x, weight, bias, "silu")
                    row["max_rel_err"] = _rel(y, ref)
                    del y
                    ms = _graph_ms(lambda: mod.causal_conv1d_triton(x, weight, bias, "silu"))
                row["graph_ms"] = ms
                row["fwd_GBps"] = fwd_bytes / ms / 1e6 if ms else None
                working.append((bl, bd, nw))
            except Exception as e:  # a config that fails to compile: say so, go on
                row["note"] = f"{type(e).__name__}: {e}"[:80]
            rows.append(row)
    finally:
        if saved is None:
            mod._TUNED.pop(key, None)
        else:
            mod._TUNED[key] = saved
    ident = lambda c: (c.kwargs["BL"], c.kwargs["BD"], c.num_warps)  # noqa: E731
    bad = ({ident(c) for c in mod.FWD_CONFIGS} - set(working)) & set(tiles)
    if bad and len(bad) < len(mod.FWD_CONFIGS):  # drop tiles that fail here from the autotuner
        mod._conv_fwd_tuned.configs = [c for c in mod.FWD_CONFIGS if ident(c) not in bad]
    del ref
    return rows


def _conv_rows(shape, args) -> list[dict]:
    from hybridseq.kernels import causal_conv1d, causal_conv1d_ref

    from .common import time_fn

    b, d, l, w = shape
    dtype = _DTYPES[args.dtype]
    e = torch.tensor([], dtype=dtype).element_size()
    fwd_bytes = 2 * b * l * d * e
    fwdbwd_bytes = 5 * b * l * d * e  # fwd: x, y; bwd: x, dy, dx
    bwd_bytes = 3 * b * l * d * e  # bwd alone: x, dy read, dx written
    dev = args.device
    x = torch.randn(b, l, d, device=dev, dtype=dtype)
    weight = (torch.randn(d, w, device=dev) / w ** 0.5).to(dtype)
    bias = torch.randn(d, device=dev).to(dtype)
    dy = torch.randn(b, l, d, device=dev, dtype=dtype)
    xt = x.transpose(1, 2).contiguous()  # (b, d, l) for the channel-first libraries
    dyt = dy.transpose(1, 2).contiguous()
    w3 = weight[:, None, :].contiguous()
    label = f"B{b} D{d} L{l} W{w}"
    rows = []
    if args.sweep:  # first: it also drops configs that fail to compile from the autotuner's list
        rows += _sweep_rows(x, weight, bias, label, fwd_bytes, args)
    check = _check_conv(x, weight, bias, dy) if args.check else {}

    tri = importlib.import_module("hybridseq.kernels.conv1d.triton_conv")
    impls = {
        "triton": lambda t, wt, bi: causal_conv1d(t, wt, bi, "silu", impl="triton"),
        "triton (direct)": lambda t, wt, bi: tri.causal_conv1d_triton(t, wt, bi, "silu"),
        "ref": lambda t, wt, bi: causal_conv1d_ref(t, wt, bi, "silu"),
        "F.conv1d+silu": lambda t, wt, bi: F.silu(F.conv1d(t, wt, bi, padding=w - 1,
                                                           groups=d)[..., :l]),
        "F.conv1d": lambda t, wt, bi: F.conv1d(t, wt, bi, padding=w - 1, groups=d)[..., :l],
    }
    try:  # mamba's CUDA extension, optional
        from causal_conv1d import causal_conv1d_fn  # type: ignore

        impls["causal_conv1d (CUDA)"] = lambda t, wt, bi: causal_conv1d_fn(t, wt, bi, "silu")
    except Exception:
        pass
    anchor = None
    out = torch.empty_like(xt)
    with torch.no_grad():  # the bandwidth ceiling: a plain copy (read + write the same bytes)
        ms = _graph_ms(lambda: out.copy_(xt))
    rows.append({"op": "copy (ceiling)", "shape": label, "dtype": args.dtype, "impl": "copy_",
                 "graph_ms": ms, "fwd_GBps": fwd_bytes / ms / 1e6 if ms else None})
    del out
    for name, fn in impls.items():
        channel_first = name.startswith(("F.", "causal_conv1d"))
        xin, win, g = (xt, w3 if name.startswith("F.") else weight, dyt) if channel_first \
            else (x, weight, dy)
        row = {"op": "conv", "shape": label, "dtype": args.dtype, "impl": name}
        with torch.no_grad():
            f = lambda: fn(xin, win, bias)  # noqa: E731
            row["fwd_ms"] = time_fn(f, iters=args.iters, warmup=min(5, args.iters))["median_ms"]
            row["graph_ms"] = _graph_ms(f)
        row["fwd_GBps"] = fwd_bytes / row["fwd_ms"] / 1e6
        if not args.no_backward:
            ins = [t.detach().requires_grad_() for t in (xin, win, bias)]

            def fb():  # autograd.grad: no accumulation into .grad inside the timed region
                torch.autograd.grad(fn(*ins), ins, g)

            row["fwdbwd_ms"] = time_fn(fb, iters=args.iters, warmup=min(5, args.iters))["median_ms"]
            row["fwdbwd_GBps"] = fwdbwd_bytes / row["fwdbwd_ms"] / 1e6
            out_y = fn(*ins)
            bw = lambda: torch.autograd.grad(out_y, ins, g, retain_graph=True)  # noqa: E731
            row["bwd_ms"] = time_fn(bw, iters=args.iters, warmup=min(5, args.iters))["median_ms"]
            row["bwd_GBps"] = bwd_bytes / row["bwd_ms"] / 1e6
            del out_y
        if name == "F.conv1d+silu":
            anchor = row
        if name == "triton":
            row.update(check)
            row["config"] = _best_configs()
        rows.append(row)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    for row in rows:
        if anchor is not None and "fwd_ms" in row:
            row["fwd_vs_F.conv1d+silu"] = row["fwd_ms"] / anchor["fwd_ms"]
    return rows


def _step_rows(op: str, shape: str, triton_module: str, nbytes: int, ref, call, args) -> list[dict]:
    """Rows for a one-token decode op: ``call(impl)`` -> (output, new_state), timed for triton and
    ref; with --check, the triton outputs (poisoned first) against ``ref``."""
    from .common import time_fn

    rows = []
    for impl in ("triton", "ref"):
        f = lambda: call(impl)  # noqa: E731
        row = {"op": op, "shape": shape, "dtype": args.dtype, "impl": impl}
        if args.check and impl == "triton":
            with _Poisoned(triton_module):
                out, state = f()
            row["max_rel_err"] = max(_rel(out, ref[0]), _rel(state, ref[1]))
        with torch.no_grad():
            row["fwd_ms"] = time_fn(f, iters=args.iters, warmup=min(5, args.iters))["median_ms"]
            row["graph_ms"] = _graph_ms(f)
        row["fwd_GBps"] = nbytes / row["fwd_ms"] / 1e6
        rows.append(row)
    return rows


def _decode_rows(shape, args) -> list[dict]:
    from hybridseq.kernels import (causal_conv1d_update, causal_conv1d_update_ref,
                                   selective_state_update, selective_state_update_ref)

    b, d, n = shape
    dtype = _DTYPES[args.dtype]
    e = torch.tensor([], dtype=dtype).element_size()
    dev = args.device
    r = lambda *s: torch.randn(*s, device=dev)  # noqa: E731
    w = 4
    rows = []
    # conv update: reads x, state (w-1 rows), writes y, new state
    x, cs, wt, bi = r(b, d).to(dtype), r(b, w - 1, d).to(dtype), r(d, w).to(dtype), r(d).to(dtype)
    conv_bytes = (2 * b * d + 2 * b * (w - 1) * d) * e
    rows += _step_rows("conv_update", f"B{b} D{d} W{w}", "conv1d.triton_conv", conv_bytes,
                       causal_conv1d_update_ref(x, cs, wt, bi, "silu"),
                       lambda impl: causal_conv1d_update(x, cs, wt, bi, "silu", impl=impl), args)
    # selective state update
    t = dict(state=r(b, d, n), x=r(b, d).to(dtype), dt=(0.5 * r(b, d)).to(dtype),
             A=-torch.arange(1, n + 1, device=dev, dtype=torch.float32).repeat(d, 1),
             B=r(b, n).to(dtype), C=r(b, n).to(dtype), D=r(d), z=r(b, d).to(dtype),
             dt_bias=r(d) * 0.5 - 3.0)
    ssu_bytes = 2 * b * d * n * 4 + 4 * b * d * e + 2 * b * n * e + d * n * 4 + 2 * d * 4
    rows += _step_rows("state_update", f"B{b} D{d} N{n}", "scan.step_triton", ssu_bytes,
                       selective_state_update_ref(**t, dt_softplus=True),
                       lambda impl: selective_state_update(**t, dt_softplus=True, impl=impl), args)
    for op in ("conv_update", "state_update"):
        tri = next(r for r in rows if r["op"] == op and r["impl"] == "triton")
        for row in rows:
            if row["op"] == op:
                row["fwd_vs_triton"] = row["fwd_ms"] / tri["fwd_ms"]
    return rows


def run(args) -> list[dict]:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise HybridSeqError("hybridseq bench conv needs a CUDA device (the timings are GPU times)")
    rows = []
    for s in args.conv_shapes:
        rows += _conv_rows(_parse(s, 4, "--conv-shapes"), args)
    for s in args.decode_shapes:
        rows += _decode_rows(_parse(s, 3, "--decode-shapes"), args)
    return rows


if __name__ == "__main__":  # python -m hybridseq.bench.conv: the same as `hybridseq bench conv`
    from .common import script_main

    script_main(add_arguments, run, __doc__)
