"""Mamba-2 SSD timings: the Triton scan and the chunked PyTorch path against mamba_ssm's Triton SSD
(``mamba_chunk_scan_combined``) when importable; with ``--block``, the Mamba-2 block against
mamba_ssm's ``Mamba2`` module of the same sizes.

Scan rows, for each shape BxLxHxPxN (ngroups 1, chunk 256, D per head, dt_bias, softplus, as in a
Mamba-2 block; ``--z`` adds the gate): forward and forward+backward medians (``common.time_fn``,
the ``--timing`` method), the backward being ``torch.autograd.grad`` of the output with respect
to every input. Block rows: d_model D at batch 8, seqlen 2048 (``--block-shape``), bf16 autocast
not used: the block runs in bf16 weights and activations, A_log / D / dt_bias in float32.

mamba_ssm is an anchor only: put its source distribution on PYTHONPATH (its Triton SSD needs no
build; see BENCHMARKS.md for the command).
"""
from __future__ import annotations

import argparse

import torch

DEFAULT_SHAPES = ["8x2048x32x64x128", "2x8192x64x64x128"]  # batch x seqlen x heads x headdim x dstate
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="BxLxHxPxN")
    parser.add_argument("--impls", default="triton,torch,mamba_ssm",
                        help="comma list of triton, torch (the chunked CPU path), mamba_ssm")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    parser.add_argument("--z", action="store_true", help="with the z gate inside the scan")
    parser.add_argument("--block", nargs="*", type=int, default=None, metavar="D_MODEL",
                        help="also time the Mamba-2 block at these d_model (e.g. 1024 2048)")
    parser.add_argument("--block-shape", default="8x2048", help="batch x seqlen of the block rows")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default=None)
    parser.add_argument("--torch-max-elems", type=float, default=2e8,
                        help="skip the torch path above this many x elements (it is slow on GPUs)")


def make_inputs(b, l, h, p, n, dtype, device, z=False, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    t = {"x": r(b, l, h, p).to(dtype), "dt": (0.5 * r(b, l, h)).to(dtype),
         "A": -(torch.rand(h, generator=g) * 4 + 0.5).to(device),
         "B": r(b, l, 1, n).to(dtype), "C": r(b, l, 1, n).to(dtype),
         "D": r(h), "dt_bias": r(h) - 2.0, "z": r(b, l, h, p).to(dtype) if z else None}
    return t


def _mamba_ssm_scan():
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined  # type: ignore
        return mamba_chunk_scan_combined
    except Exception:
        return None


def _scan_callables(impl, t):
    """(forward, forward+backward) closures for one implementation on inputs ``t``."""
    from hybridseq.kernels import ssd_scan

    leaves = {k: v.detach().clone().requires_grad_() for k, v in t.items() if v is not None}
    if impl in ("triton", "torch"):
        def call(a):
            return ssd_scan(a["x"], a["dt"], a["A"], a["B"], a["C"], D=a["D"], z=a.get("z"),
                            dt_bias=a["dt_bias"], dt_softplus=True, chunk_size=256, impl=impl)
    elif impl == "mamba_ssm":
        fn = _mamba_ssm_scan()
        if fn is None:
            raise RuntimeError("mamba_ssm is not importable")

        def call(a):
            return fn(a["x"], a["dt"], a["A"], a["B"], a["C"], 256, D=a["D"], z=a.get("z"),
                      dt_bias=a["dt_bias"], dt_softplus=True)
    else:
        raise ValueError(f"--impls: unknown implementation {impl!r} (triton, torch, mamba_ssm)")
    plain = {k: v for k, v in t.items() if v is not None}
    gy = torch.randn_like(t["x"])

    def fwd():
        with torch.no_grad():
            return call(plain)

    def fwd_bwd():
        torch.autograd.grad(call(leaves), list(leaves.values()), gy)

    return fwd, fwd_bwd


def _block_rows(args, device, dtype) -> list[dict]:
    from .common import time_fn

    b, l = (int(v) for v in args.block_shape.split("x"))
    rows = []
    for d in args.block:
        from hybridseq.blocks.mamba2 import Mamba2Block

        x = torch.randn(b, l, d, device=device, dtype=dtype, requires_grad=True)
        gy = torch.randn_like(x)
        blocks = {"hybridseq": lambda: Mamba2Block(d, {"impl": "auto"})}
        try:
            from mamba_ssm.modules.mamba2 import Mamba2  # type: ignore

            blocks["mamba_ssm"] = lambda: Mamba2(d_model=d)
        except Exception:
            pass
        for name, make in blocks.items():
            torch.manual_seed(0)
            blk = make().to(device=device, dtype=dtype)
            params = [p for p in blk.parameters() if p.requires_grad]

            def fwd_bwd(blk=blk, params=params):
                torch.autograd.grad(blk(x), [x, *params], gy)

            try:
                ms = time_fn(fwd_bwd, iters=args.iters, warmup=args.warmup)["median_ms"]
                rows.append({"what": f"Mamba-2 block d_model {d} B{b} L{l}", "impl": name,
                             "fwd_bwd_ms": ms, "tokens_per_s": b * l / ms * 1e3})
            except Exception as e:  # an anchor that cannot run here: say so
                rows.append({"what": f"Mamba-2 block d_model {d}", "impl": name,
                             "error": f"{type(e).__name__}: {str(e)[:100]}"})
    return rows


def run(args) -> list[dict]:
    from .common import time_fn

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _DTYPES[args.dtype]
    rows = []
    for shape in args.shapes:
        b, l, h, p, n = (int(v) for v in shape.split("x"))
        t = make_inputs(b, l, h, p, n, dtype, device, args.z)
        shape_rows = []
        for impl in [i for i in args.impls.split(",") if i]:
            row = {"what": f"SSD B{b} L{l} H{h} P{p} N{n}", "impl": impl}
            if impl == "torch" and b * l * h * p > args.torch_max_elems:
                row["error"] = "skipped: above --torch-max-elems"
            elif impl == "mamba_ssm" and _mamba_ssm_scan() is None:
                row["error"] = "skipped: mamba_ssm is not importable"
            else:
                try:
                    fwd, fwd_bwd = _scan_callables(impl, t)
                    row["fwd_ms"] = time_fn(fwd, iters=args.iters, warmup=args.warmup)["median_ms"]
                    row["fwd_bwd_ms"] = time_fn(fwd_bwd, iters=args.iters, warmup=args.warmup)["median_ms"]
                    row["bwd_ms"] = row["fwd_bwd_ms"] - row["fwd_ms"]
                except Exception as e:  # an implementation that cannot run here: report it
                    row["error"] = f"{type(e).__name__}: {str(e)[:100]}"
            shape_rows.append(row)
        # the anchor timed in the same run: mamba_ssm's fwd+bwd over ours
        anchor = next((r for r in shape_rows if r["impl"] == "mamba_ssm" and "fwd_bwd_ms" in r), None)
        for r in shape_rows:
            if anchor is not None and "fwd_bwd_ms" in r:
                r["speedup_vs_mamba_ssm"] = anchor["fwd_bwd_ms"] / r["fwd_bwd_ms"]
        rows += shape_rows
    if args.block:
        rows += _block_rows(args, device, dtype)
    return rows


if __name__ == "__main__":
    from .common import script_main

    script_main(add_arguments, run, __doc__)
