"""Selective scan timings: Triton vs the chunked PyTorch path (and mamba_ssm when importable).

For each shape (batch, dim, seqlen, dstate) and implementation: forward and forward+backward
median times (CUDA events through ``common.time_fn``), with z, D, delta_bias and softplus on, as
in a Mamba block. ``*_GBps`` is the effective bandwidth of the fewest bytes the pass must move
(every input read once, every output written once; see ``fewest_bytes``). mamba_ssm's
``selective_scan_fn`` takes (batch, dim, seqlen) tensors: we transpose outside the timed region.
``--sweep`` times the Triton kernels over several block shapes (tuning aid). ``--bwd-split``
times the Triton scan once per backward sequence split S (``auto``: the shipped heuristic; the
``split`` column gives the S that ran), ``--fwd-split`` the same for the forward (``fwd_split``;
``asked`` = forward/backward as asked); ``bwd_ms`` is fwd+bwd minus fwd. ``--docs 0 4`` times
each implementation without ``seq_idx`` and with it (4 equal documents per row, the state restarting
at each); ``vs_no_docs`` is the time with documents over the time without, same implementation,
same run (mamba_ssm's Mamba-1 scan takes no document boundaries: it runs only without).

The backward is ``torch.autograd.grad`` of the output with respect to every input (new gradient
tensors, as inside a model, where u, delta and z come from other ops); ``--accumulate`` times
``out.backward()`` into the leaves' ``.grad`` instead, which adds one elementwise add per (b, l, d)
gradient from the second call on (about 0.2 ms at B8 D2048 L2048 on an H100) to every
implementation alike.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys

import torch

DEFAULT_SHAPES = ["8x2048x2048x16", "2x4096x8192x16"]  # batch x dim x seqlen x dstate (BENCHMARKS.md's scan shapes)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Sweep candidates: (BLOCK_T, BLOCK_D, NO, num_warps); lanes*warps cover BLOCK_D * NO / 32
_SWEEP_FWD = [(8, 32, 2, 2), (4, 8, 4, 1), (4, 32, 2, 2), (8, 64, 2, 4), (16, 32, 4, 4),
              (8, 16, 4, 1), (4, 16, 4, 1), (8, 32, 4, 4)]
_SWEEP_BWD = [(4, 16, 4, 1), (2, 16, 4, 1), (4, 8, 4, 1), (2, 16, 2, 1), (8, 8, 4, 1),
              (4, 32, 4, 2), (2, 32, 4, 1), (4, 16, 2, 1)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES,
                        help="BxDxLxN (batch x dim x seqlen x dstate); default: BENCHMARKS.md's two scan shapes")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    parser.add_argument("--impls", default="triton,torch,mamba_ssm",
                        help="comma list of triton, torch (chunked PyTorch), mamba_ssm")
    parser.add_argument("--groups", type=int, default=0, help="B/C groups (0: (b, l, n) B/C)")
    parser.add_argument("--iters", type=int, default=20, help="timed repetitions (median)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls first")
    parser.add_argument("--no-backward", action="store_true", help="forward only")
    parser.add_argument("--torch-max-elems", type=float, default=6e8,
                        help="skip the chunked PyTorch path above this many b*l*d*n elements")
    parser.add_argument("--sweep", action="store_true",
                        help="time the Triton kernels over several block shapes instead")
    parser.add_argument("--once", action="store_true",
                        help="one untimed forward+backward of the Triton scan per shape (for "
                             "profilers such as ncu); --fwd-configs/--bwd-configs pick the blocks")
    parser.add_argument("--fwd-configs", nargs="*", default=None,
                        help="--sweep candidates for the forward, each BLOCK_T,BLOCK_D,NO,"
                             "num_warps[,maxnreg] (without --sweep: the first one is timed)")
    parser.add_argument("--bwd-configs", nargs="*", default=None,
                        help="--sweep candidates for the backward (the forward keeps its default)")
    parser.add_argument("--carry-configs", nargs="*", default=None,
                        help="block shapes of the split backward's carry pass, as --bwd-configs "
                             "(with --sweep: swept; without: the first one is used)")
    parser.add_argument("--bwd-split", nargs="+", default=["auto"],
                        help="backward sequence segments S for the Triton scan, one timed row "
                             "each: integers or 'auto' (the shipped heuristic; the environment "
                             "variable HYBRIDSEQ_SCAN_BWD_SPLIT when set). With --sweep: the first")
    parser.add_argument("--fwd-split", nargs="+", default=["auto"],
                        help="forward sequence segments, as --bwd-split "
                             "(HYBRIDSEQ_SCAN_FWD_SPLIT); one row per (forward, backward) pair")
    parser.add_argument("--accumulate", action="store_true",
                        help="backward as out.backward() into the inputs' .grad (see the docstring)")
    parser.add_argument("--progress", action="store_true",
                        help="also print each row to stderr as soon as it is timed")
    parser.add_argument("--docs", type=int, nargs="+", default=[0],
                        help="documents per row, as seq_idx (0: no seq_idx); several values are timed in turn")
    parser.add_argument("--carry-pieces", type=int, default=0,
                        help="pieces per segment of the carry pass (0: the heuristic)")


def parse_splits(values) -> list:
    """--bwd-split values: 'auto' -> None, else a positive integer."""
    out = []
    for v in values:
        if str(v).lower() == "auto":
            out.append(None)
            continue
        try:
            out.append(int(v))
        except ValueError:
            raise ValueError(f"--bwd-split: expected integers or 'auto', got {v!r}") from None
        if out[-1] < 1:
            raise ValueError(f"--bwd-split: S must be >= 1, got {v!r}")
    return out


def parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = text.lower().replace("b", "").split("x")
    if len(parts) != 4:
        raise ValueError(f"--shapes: expected BxDxLxN like 8x2048x2048x16, got {text!r}")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def make_inputs(b, d, l, n, dtype, device, groups=0, requires_grad=False, seed=0):
    """Random Mamba-like inputs: A = -(1..n) per channel (S4D-real), dt around softplus(-3)."""
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    bc = (b, l, n) if groups == 0 else (b, l, groups, n)
    t = {
        "u": r(b, l, d).to(dtype),
        "delta": (0.5 * r(b, l, d)).to(dtype),
        "A": -torch.arange(1, n + 1, device=device, dtype=torch.float32).repeat(d, 1)
             * (0.5 + torch.rand(d, 1, generator=g, device=device)),
        "B": r(*bc).to(dtype),
        "C": r(*bc).to(dtype),
        "D": r(d),
        "z": r(b, l, d).to(dtype),
        "delta_bias": r(d) * 0.5 - 3.0,
    }
    if requires_grad:
        for v in t.values():
            v.requires_grad_(True)
    return t


def fewest_bytes(b, d, l, n, dtype, groups=0, backward=False) -> int:
    """Bytes a perfect kernel moves: inputs once, outputs once. Forward reads u, delta, z, B, C,
    A, D, delta_bias and writes y; backward also reads the output gradient and writes du, ddelta,
    dz, dB, dC, dA, dD, d(delta_bias) (the forward inputs counted again: they are re-read)."""
    e = torch.tensor([], dtype=dtype).element_size()
    g = max(groups, 1)
    bld, bc = b * l * d * e, b * l * g * n * e
    params = d * n * 4 + 2 * d * 4
    fwd = 3 * bld + 2 * bc + params + bld
    if not backward:
        return fwd
    bwd = 4 * bld + 2 * bc + params + 3 * bld + 2 * bc + params
    return fwd + bwd


def _mamba_ssm_fn():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # type: ignore
        return selective_scan_fn
    except Exception:
        return None


def _mamba_ssm_missing() -> str:
    """Why mamba_ssm's selective_scan_fn cannot be imported (for the skip line)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # type: ignore # noqa
        return ""
    except Exception as e:
        return f"{type(e).__name__}: {e}"[:100]


def _bdl(x):
    """(b, l, d) -> contiguous (b, d, l) leaf, mamba_ssm's layout."""
    return x.detach().transpose(1, 2).contiguous().requires_grad_(x.requires_grad)


def _bnl(x):
    """B/C (b, l, n) -> (b, n, l), or (b, l, g, n) -> (b, g, n, l), as contiguous leaves."""
    y = x.detach().permute(0, 2, 1) if x.dim() == 3 else x.detach().permute(0, 2, 3, 1)
    return y.contiguous().requires_grad_(x.requires_grad)


def make_seq_idx(b, l, docs, device):
    """(b, l) int32 document index: ``docs`` equal documents per row (the last one takes the rest)."""
    per = -(-l // docs)
    return (torch.arange(l, device=device, dtype=torch.int32) // per).expand(b, l).contiguous()


def _callables(impl, t, backward, accumulate=False, seq_idx=None):
    """(forward closure, forward+backward closure or None) for one implementation."""
    from hybridseq.kernels import selective_scan

    if impl in ("triton", "torch"):
        inputs = list(t.values())

        def f():
            return selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], D=t["D"],
                                  z=t["z"], delta_bias=t["delta_bias"], delta_softplus=True,
                                  impl=impl, seq_idx=seq_idx)
    elif impl == "mamba_ssm":
        fn = _mamba_ssm_fn()
        u, dl, z, B, C = _bdl(t["u"]), _bdl(t["delta"]), _bdl(t["z"]), _bnl(t["B"]), _bnl(t["C"])
        inputs = [u, dl, t["A"], B, C, t["D"], z, t["delta_bias"]]

        def f():
            return fn(u, dl, t["A"], B, C, t["D"], z, t["delta_bias"], True)
    else:
        raise ValueError(f"--impls: unknown implementation {impl!r} (triton, torch, mamba_ssm)")
    if seq_idx is not None and impl == "mamba_ssm":
        raise ValueError("mamba_ssm's selective_scan_fn takes no seq_idx")
    if not backward:
        return f, None
    gy = torch.randn_like(f().detach())
    leaves = [v for v in inputs if v.requires_grad]

    def fb():
        if accumulate:
            f().backward(gy)
        else:
            torch.autograd.grad(f(), leaves, gy)

    return f, fb


def _time_shape(shape, impl, args, device, docs=0):
    from .common import time_fn

    b, d, l, n = shape
    dtype = _DTYPES[args.dtype]
    backward = not args.no_backward
    t = make_inputs(b, d, l, n, dtype, device, args.groups, requires_grad=backward)
    seq_idx = make_seq_idx(b, l, docs, device) if docs else None
    f, fb = _callables(impl, t, backward, getattr(args, "accumulate", False), seq_idx)
    slow = impl == "torch"
    iters, warmup = (max(1, args.iters // 5), min(2, args.warmup)) if slow else \
        (args.iters, args.warmup)
    row = {"shape": f"B{b} D{d} L{l} N{n}", "dtype": args.dtype, "impl": impl, "docs": docs}
    if impl == "triton":  # the segments that ran (forward: the one saving checkpoints)
        sst = importlib.import_module("hybridseq.kernels.scan.triton_scan")
        row["fwd_split"] = sst.fwd_split(t["u"], t["A"], t["B"], t["C"], for_grad=backward)
        if backward:
            row["split"] = sst.bwd_split(t["u"], t["A"], t["B"], t["C"])
    with torch.no_grad():
        ms = time_fn(f, iters=iters, warmup=warmup)["median_ms"]
    row["fwd_ms"] = ms
    row["fwd_GBps"] = fewest_bytes(b, d, l, n, dtype, args.groups) / ms / 1e6
    if fb is not None:
        ms = time_fn(fb, iters=iters, warmup=warmup)["median_ms"]
        row["fwdbwd_ms"] = ms
        row["bwd_ms"] = ms - row["fwd_ms"]
        row["fwdbwd_GBps"] = fewest_bytes(b, d, l, n, dtype, args.groups, True) / ms / 1e6
    return row


def _progress(args, row):
    if getattr(args, "progress", False):
        print("row " + json.dumps(row, default=str), file=sys.stderr, flush=True)


def _parse_configs(configs):
    return [tuple(int(v) for v in c.split(",")) for c in configs]


@contextlib.contextmanager
def _tuning(**overrides):
    """Temporarily set the Triton scan's block shapes (selective_scan_triton.TUNING)."""
    mod = importlib.import_module("hybridseq.kernels.scan.triton_scan")
    saved = dict(mod.TUNING)
    mod.TUNING.update({k: v for k, v in overrides.items() if v is not None})
    try:
        yield
    finally:
        mod.TUNING.clear()
        mod.TUNING.update(saved)


def _sweep(shape, args, device) -> list[dict]:
    fwd_c = _parse_configs(args.fwd_configs) if args.fwd_configs is not None else _SWEEP_FWD
    bwd_c = _parse_configs(args.bwd_configs) if args.bwd_configs is not None else _SWEEP_BWD
    carry_c = _parse_configs(args.carry_configs) if args.carry_configs else []
    rows = []
    for kind, cands in (("fwd", fwd_c), ("bwd", [] if args.no_backward else bwd_c),
                        ("carry", [] if args.no_backward else carry_c)):
        for cfg in cands:
            blocks = dict(kind=kind, BLOCK_T=cfg[0], BLOCK_D=cfg[1], NO=cfg[2], warps=cfg[3])
            if len(cfg) > 4:
                blocks["maxnreg"] = cfg[4]
            sub = argparse.Namespace(**{**vars(args), "no_backward": kind == "fwd"})
            try:
                with _tuning(**{kind: cfg}):
                    row = {**_time_shape(shape, "triton", sub, device), **blocks}
                if kind != "fwd":
                    row["bwd_only_ms"] = row["fwdbwd_ms"] - row["fwd_ms"]
            except Exception as e:  # a block shape that does not compile: report, go on
                row = {"shape": "x".join(map(str, shape)), **blocks,
                       "error": f"{type(e).__name__}: {e}"[:80]}
            rows.append(row)
            _progress(args, row)
            torch.cuda.empty_cache()
    return rows


def _once(shape, args, device) -> dict:
    b, d, l, n = shape
    t = make_inputs(b, d, l, n, _DTYPES[args.dtype], device, args.groups, requires_grad=True)
    _, fb = _callables("triton", t, True)
    fb()
    torch.cuda.synchronize()
    return {"shape": f"B{b} D{d} L{l} N{n}", "ran": "triton fwd+bwd once"}


def run(args) -> list[dict]:
    if not torch.cuda.is_available():
        raise RuntimeError("hybridseq bench scan needs a CUDA device (the timings are GPU times)")
    device = "cuda"
    shapes = [parse_shape(s) for s in args.shapes]
    splits = parse_splits(args.bwd_split)
    fwd_splits = parse_splits(args.fwd_split)
    pairs = [(f, s) for f in fwd_splits for s in splits]
    first = lambda cs: _parse_configs(cs)[0] if cs else None  # noqa: E731
    pieces = args.carry_pieces or None
    if args.sweep:  # the carry candidates are swept, not fixed
        with _tuning(split=splits[0], fwd_split=fwd_splits[0], carry_pieces=pieces):
            return [r for s in shapes for r in _sweep(s, args, device)]
    with _tuning(fwd=first(args.fwd_configs), bwd=first(args.bwd_configs),
                 carry=first(args.carry_configs), carry_pieces=pieces):
        if args.once:
            with _tuning(split=splits[0], fwd_split=fwd_splits[0]):
                return [_once(s, args, device) for s in shapes]
        impls = [i.strip() for i in args.impls.split(",") if i.strip()]
        rows = []

        def add(row):
            rows.append(row)
            _progress(args, row)

        docs_list = list(dict.fromkeys(getattr(args, "docs", [0]) or [0]))
        if any(k < 0 for k in docs_list):
            raise ValueError("--docs: expected document counts >= 0")
        for b, d, l, n in shapes:
            base = None
            no_docs = {}  # impl -> its row without seq_idx (same asked splits)
            for impl, docs in [(i, k) for i in impls for k in docs_list]:
                if impl == "mamba_ssm" and docs:
                    continue  # no document boundaries in mamba_ssm's Mamba-1 scan
                if impl == "mamba_ssm" and _mamba_ssm_fn() is None:
                    add({"shape": f"B{b} D{d} L{l} N{n}", "dtype": args.dtype, "impl": impl,
                         "note": f"skipped: not importable ({_mamba_ssm_missing()})"})
                    continue
                if impl == "torch" and b * d * l * n > args.torch_max_elems:
                    add({"shape": f"B{b} D{d} L{l} N{n}", "dtype": args.dtype, "impl": impl,
                         "note": "skipped (--torch-max-elems)"})
                    continue
                for fsplit, split in (pairs if impl == "triton" else [(None, None)]):
                    with _tuning(split=split, fwd_split=fsplit):
                        row = _time_shape((b, d, l, n), impl, args, device, docs)
                    ref = no_docs.get((impl, fsplit, split))
                    if docs == 0:
                        no_docs[(impl, fsplit, split)] = row
                    elif ref is not None:
                        row["vs_no_docs_fwd"] = row["fwd_ms"] / ref["fwd_ms"]
                        if "fwdbwd_ms" in row and "fwdbwd_ms" in ref:
                            row["vs_no_docs_fwdbwd"] = row["fwdbwd_ms"] / ref["fwdbwd_ms"]
                    if docs:
                        add(row)
                        torch.cuda.empty_cache()
                        continue
                    if impl == "triton":
                        row["asked"] = "/".join("auto" if v is None else str(v)
                                                for v in (fsplit, split))
                        if base is None or (split is None and fsplit is None):
                            base = row  # the ratios below compare with the shipped default
                    elif base is not None:  # how many times slower than Triton
                        row["vs_triton_fwd"] = row["fwd_ms"] / base["fwd_ms"]
                        if "fwdbwd_ms" in row and "fwdbwd_ms" in base:
                            row["vs_triton_fwdbwd"] = row["fwdbwd_ms"] / base["fwdbwd_ms"]
                    add(row)
                    torch.cuda.empty_cache()
        return rows


if __name__ == "__main__":  # python -m hybridseq.bench.scan: the same as `hybridseq bench scan`
    from .common import script_main

    script_main(add_arguments, run, __doc__)
