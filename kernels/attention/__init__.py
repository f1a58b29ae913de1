"""One-token decode attention against a fixed-capacity KV cache (static shapes, CUDA-graph safe).

    o = decode_attention(q, k_cache, v_cache, pos, *, ring=False, scale=None, impl="auto")

Files: ``ref.py`` (``decode_attention_ref``: the masked softmax in plain PyTorch, the CPU path and
``impl="torch"``), ``triton_decode.py`` (the split-K Triton kernels and their merge, reading only
the visible slots). ``impl`` is resolved by ``kernels.backend.resolve``. Both paths take ``pos``
from a device tensor without a host synchronisation, so one captured CUDA graph replays for every
position.
"""
from __future__ import annotations

import torch

from .._utils import check_decode_attention_args
from ..backend import resolve
from .ref import decode_attention_ref

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_HEAD_DIM = 256
TRITON_LIMITS = ("q, k_cache, v_cache float16, bfloat16 or float32, k_cache and v_cache of one "
                 f"dtype, head_dim <= {TRITON_MAX_HEAD_DIM}")


def triton_limits(q, k_cache, v_cache) -> str:
    """Why the Triton kernel cannot take these (already checked) inputs; "" when it can."""
    if q.dtype not in TRITON_DTYPES or k_cache.dtype not in TRITON_DTYPES:
        return f"dtypes q {q.dtype}, k_cache {k_cache.dtype} (float16, bfloat16 or float32)"
    if v_cache.dtype != k_cache.dtype:
        return f"k_cache is {k_cache.dtype} but v_cache is {v_cache.dtype} (one dtype)"
    if q.shape[-1] > TRITON_MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]} > {TRITON_MAX_HEAD_DIM}"
    return ""


def decode_attention(q, k_cache, v_cache, pos, *, ring=False, scale=None, impl="auto"):
    """Attention of the token at position ``pos`` over the cache slots it sees.

    q (batch, n_heads, head_dim): one query per row. k_cache, v_cache (batch, n_kv_heads, cap,
    head_dim) with n_heads % n_kv_heads == 0; query head i reads KV head i // (n_heads //
    n_kv_heads) (GQA). The current token's key/value is already in the cache, at slot ``pos``
    (linear cache, ``ring=False``, pos < cap) or ``pos % cap`` (ring buffer of a sliding window of
    cap, ``ring=True``). The visible slots are s <= pos, i.e. 0 .. min(pos, cap - 1); the others
    are never read by the Triton kernel (and never reach the output of either path).

    pos: an int32/int64 tensor of shape () (or (batch,), one position per row) on q's device,
    read on the device, or a Python int. scale: default head_dim ** -0.5. Returns o (batch,
    n_heads, head_dim) in q's dtype; softmax and accumulation in float32. Inference only: no
    autograd. impl: "auto" (Triton for CUDA tensors within ``TRITON_LIMITS``, else "torch") |
    "torch" (``decode_attention_ref``) | "triton".
    """
    check_decode_attention_args("decode_attention", q, k_cache, v_cache, pos, ring, scale)
    why = triton_limits(q, k_cache, v_cache)
    which = resolve("decode_attention", impl, q, fits=not why, limits=why or TRITON_LIMITS,
                    choices=("auto", "torch", "triton"))
    if which == "triton":
        from .triton_decode import run_decode_attention_triton

        return run_decode_attention_triton(q, k_cache, v_cache, pos, scale)
    return decode_attention_ref(q, k_cache, v_cache, pos, ring=ring, scale=scale)


__all__ = ["TRITON_LIMITS", "decode_attention", "decode_attention_ref", "triton_limits"]
