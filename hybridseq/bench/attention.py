"""Attention backends: TFLOP/s forward and forward+backward, per backend available here.

Default shape: batch 4, 16 heads, seqlen 4096, head_dim 128, causal, bf16 (the issue's table).
Rows: ``auto`` (what an attention block with ``impl: auto`` runs, and which backend that is),
``sdpa`` (our priority: cuDNN first), the single SDPA kernels ``sdpa[cudnn]``,
``sdpa[flash]``, ``sdpa[efficient]``, ``flex`` (compiled), ``flash_attn`` (when installed), and
``torch`` (the reference; only below ``--ref-max-elems`` scores). FLOPs follow the
FlashAttention benchmark convention (``attention_flops``): 4 b h l^2 d / 2 causal forward,
2.5x that backward. ``pct_of_best`` compares each row's fwd+bwd TFLOP/s with the best row.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from ..blocks.attention_backends import (_causal_mask, attention, attention_flops, backend_available,
                                         select_backend)
from .common import time_fn

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_SDPA_KERNELS = {"sdpa[cudnn]": "CUDNN_ATTENTION", "sdpa[flash]": "FLASH_ATTENTION",
                 "sdpa[efficient]": "EFFICIENT_ATTENTION"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=None, help="GQA key/value heads (default: heads)")
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--window", type=int, default=None, help="sliding window (default: full causal)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    parser.add_argument("--backends", default="auto,sdpa,sdpa[cudnn],sdpa[flash],sdpa[efficient],flex,flash_attn,torch",
                        help="comma list")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--ref-max-elems", type=float, default=2e9,
                        help="skip the torch reference above this many b*h*l*l score elements")
    parser.add_argument("--device", default=None)
    parser.add_argument("--progress", action="store_true", help="print each row to stderr when done")


def _run_one(name, q, k, v, window):
    if name.startswith("sdpa["):  # one SDPA kernel only (errors when it cannot run this call)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        mask = None if window is None else _causal_mask(q.shape[1], window, q.device)
        with sdpa_kernel([getattr(SDPBackend, _SDPA_KERNELS[name])]):
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=q.shape[2] != k.shape[2])
        return o.transpose(1, 2)
    return attention(q, k, v, window=window, impl=name)


def run(args) -> list[dict]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _DTYPES[args.dtype]
    b, h, l, d = args.batch, args.heads, args.seqlen, args.head_dim
    hkv = args.kv_heads or h
    gen = torch.Generator(device=device).manual_seed(0)
    mk = lambda n: torch.randn(b, l, n, d, device=device, dtype=dtype, generator=gen)  # noqa: E731
    q, k, v = mk(h), mk(hkv), mk(hkv)
    for t in (q, k, v):
        t.requires_grad_(True)
    do = torch.randn(b, l, h, d, device=device, dtype=dtype, generator=gen)
    f_fwd = attention_flops(b, h, l, d, window=args.window, mode="fwd")
    f_all = attention_flops(b, h, l, d, window=args.window, mode="fwd_bwd")
    rows = []
    for name in [s.strip() for s in args.backends.split(",") if s.strip()]:
        row = {"backend": name, "shape": f"B{b} H{h}/{hkv} L{l} D{d}" + (f" W{args.window}" if args.window else "")}
        base = name.split("[")[0]
        if name == "auto":
            row["runs"] = select_backend("auto", device.type, dtype, d, args.window, True)[0]
        elif base != "sdpa":
            ok, why = backend_available(base, device.type, dtype=dtype, head_dim=d, requires_grad=True)
            if not ok:
                rows.append({**row, "status": f"skipped: {why}"})
                continue
        if name == "torch" and b * h * l * l > args.ref_max_elems:
            rows.append({**row, "status": "skipped: above --ref-max-elems"})
            continue
        try:
            def fwd():
                with torch.no_grad():
                    _run_one(name, q, k, v, args.window)

            def fwd_bwd():
                o = _run_one(name, q, k, v, args.window)
                torch.autograd.grad(o, (q, k, v), do)

            fwd_bwd()  # compile / select kernels outside the timings
            t_f = time_fn(fwd, iters=args.iters, device=device)["median_ms"]
            t_fb = time_fn(fwd_bwd, iters=args.iters, device=device)["median_ms"]
        except Exception as e:  # a kernel that refuses this shape: report, keep going
            rows.append({**row, "status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:80]}"})
            continue
        rows.append({**row, "fwd_ms": t_f, "fwd_TFLOPs": f_fwd / t_f / 1e9,
                     "fwd_bwd_ms": t_fb, "fwd_bwd_TFLOPs": f_all / t_fb / 1e9, "status": "ok"})
        if args.progress:
            print(rows[-1], file=sys.stderr, flush=True)
    best = max((r.get("fwd_bwd_TFLOPs", 0.0) for r in rows), default=0.0)
    for r in rows:
        if "fwd_bwd_TFLOPs" in r and best:
            r["pct_of_best"] = 100.0 * r["fwd_bwd_TFLOPs"] / best
    return rows


if __name__ == "__main__":  # python -m hybridseq.bench.attention: the same as `hybridseq bench attention`
    from .common import script_main

    script_main(add_arguments, run, __doc__)
