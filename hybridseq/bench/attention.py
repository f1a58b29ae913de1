"""Attention backends: TFLOP/s forward and forward+backward, per backend available here.

Default shape: batch 4, 16 heads, seqlen 4096, head_dim 128, causal, bf16 (the shape of BENCHMARKS.md's attention rows).
Rows: ``auto`` (what an attention block with ``impl: auto`` runs, and which backend that is),
``sdpa`` (our priority: cuDNN first), the single SDPA kernels ``sdpa[cudnn]``,
``sdpa[flash]``, ``sdpa[efficient]``, ``flex`` (compiled), ``flash_attn`` (when installed), and
``torch`` (the reference; only below ``--ref-max-elems`` scores). FLOPs follow the
FlashAttention benchmark convention (``attention_flops``): 4 b h l^2 d / 2 causal forward,
2.5x that backward. ``pct_of_best`` compares each row's fwd+bwd TFLOP/s with the best row.

``--doc-len N``: packed sequences, every row cut into documents of N tokens (the last one
shorter when N does not divide the length), passed as ``doc_ids``; FLOPs then count only the
work inside documents (each document as its own causal sequence), so TFLOP/s compare with the
unpacked rows directly. The ``sdpa[...]`` rows then take the dense boolean document mask. The
``auto`` row shows the backend an attention block picks for a call with ``doc_ids``. The row
``sdpa[split]`` (when N divides the length) runs the same work unmasked: the documents as a batch
of b * l / N causal sequences through our SDPA path (cuDNN first): the anchor for a document mask.
``mask_ms``: building the mask a row's backend needs from fresh ``doc_ids`` (once per forward
in a model, shared by its layers, so outside the per-layer timings).
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from ..blocks.attention.backends import (_causal_mask, attention, attention_flops, backend_available,
                                         document_layout, select_backend)
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
    parser.add_argument("--doc-len", type=int, default=None,
                        help="packed documents of this many tokens per row (document mask)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    parser.add_argument("--backends", default="auto,sdpa,sdpa[cudnn],sdpa[flash],sdpa[efficient],flex,flash_attn,torch",
                        help="comma list")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--ref-max-elems", type=float, default=2e9,
                        help="skip the torch reference above this many b*h*l*l score elements")
    parser.add_argument("--device", default=None)
    parser.add_argument("--progress", action="store_true", help="print each row to stderr when done")


def _run_one(name, q, k, v, window, doc_ids=None, doc_len=None):
    if name == "sdpa[split]":  # equal documents as separate sequences: the same work, no mask
        b, l, h, d = q.shape
        split = lambda t: t.reshape(b * l // doc_len, doc_len, t.shape[2], d)  # noqa: E731
        o = attention(split(q), split(k), split(v), window=window, impl="sdpa")
        return o.reshape(b, l, h, d)
    if name.startswith("sdpa["):  # one SDPA kernel only (errors when it cannot run this call)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if doc_ids is not None:
            mask = document_layout(doc_ids).mask(window)[:, None]
        else:
            mask = None if window is None else _causal_mask(q.shape[1], window, q.device)
        with sdpa_kernel([getattr(SDPBackend, _SDPA_KERNELS[name])]):
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=q.shape[2] != k.shape[2])
        return o.transpose(1, 2)
    return attention(q, k, v, window=window, impl=name, doc_ids=doc_ids)


def _mask_build_ms(backend: str, doc_ids, window, device) -> float:
    """Time to derive what ``backend`` needs from a fresh ``doc_ids`` tensor (paid once per
    forward, shared by all layers; not inside the per-layer timings): the FlexAttention block
    mask, flash-attn's cu_seqlens, or the dense mask."""
    def build():
        layout = document_layout(doc_ids.clone())
        if backend == "flex":
            layout.block_mask(window)
        elif backend == "flash_attn":
            layout.varlen()
        else:
            layout.mask(window)

    return time_fn(build, warmup=1, iters=3, device=device)["median_ms"]


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
    doc_ids, doc_lens, doc_tag = None, None, ""
    if args.doc_len:
        n = int(args.doc_len)
        doc_lens = [n] * (l // n) + ([l % n] if l % n else [])
        doc_ids = (torch.arange(l, device=device) // n).expand(b, l)
        doc_tag = f" docs {n}"
    f_fwd = attention_flops(b, h, l, d, window=args.window, mode="fwd", doc_lens=doc_lens)
    f_all = attention_flops(b, h, l, d, window=args.window, mode="fwd_bwd", doc_lens=doc_lens)
    rows = []
    for name in [s.strip() for s in args.backends.split(",") if s.strip()]:
        shape = f"B{b} H{h}/{hkv} L{l} D{d}" + (f" W{args.window}" if args.window else "") + doc_tag
        row = {"backend": name, "shape": shape}
        base = name.split("[")[0]
        if name == "auto":
            row["runs"] = select_backend("auto", device.type, dtype, d, args.window, True,
                                         doc_ids is not None)[0]
        elif base != "sdpa":
            ok, why = backend_available(base, device.type, dtype=dtype, head_dim=d, requires_grad=True)
            if not ok:
                rows.append({**row, "status": f"skipped: {why}"})
                continue
        if name == "sdpa[split]" and not (args.doc_len and l % args.doc_len == 0):
            rows.append({**row, "status": "skipped: needs --doc-len dividing --seqlen"})
            continue
        if name == "torch" and b * h * l * l > args.ref_max_elems:
            rows.append({**row, "status": "skipped: above --ref-max-elems"})
            continue
        try:
            def fwd():
                with torch.no_grad():
                    _run_one(name, q, k, v, args.window, doc_ids, args.doc_len)

            def fwd_bwd():
                o = _run_one(name, q, k, v, args.window, doc_ids, args.doc_len)
                torch.autograd.grad(o, (q, k, v), do)

            fwd_bwd()  # compile / select kernels outside the timings
            t_f = time_fn(fwd, iters=args.iters, device=device)["median_ms"]
            t_fb = time_fn(fwd_bwd, iters=args.iters, device=device)["median_ms"]
        except Exception as e:  # a kernel that refuses this shape: report, keep going
            rows.append({**row, "status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:80]}"})
            continue
        rows.append({**row, "fwd_ms": t_f, "fwd_TFLOPs": f_fwd / t_f / 1e9,
                     "fwd_bwd_ms": t_fb, "fwd_bwd_TFLOPs": f_all / t_fb / 1e9, "status": "ok"})
        if doc_ids is not None and name != "sdpa[split]":
            rows[-1]["mask_ms"] = _mask_build_ms(row.get("runs", base), doc_ids, args.window, device)
        if args.progress:
            print(rows[-1], file=sys.stderr, flush=True)
    best = max((r.get("fwd_bwd_TFLOPs", 0.0) for r in rows), default=0.0)
    for r in rows:
        if "fwd_bwd_TFLOPs" in r and best:
            r["pct_of_best"] = 100.0 * (r["fwd_bwd_TFLOPs"] / best)  # exactly 100 for the best row
    return rows


if __name__ == "__main__":  # python -m hybridseq.bench.attention: the same as `hybridseq bench attention`
    from .common import script_main

    script_main(add_arguments, run, __doc__)
