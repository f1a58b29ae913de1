"""Plain-PyTorch reference of one-token decode attention against a fixed-capacity KV cache.

For batch row b, query head i, its key/value head j = i // (n_heads // n_kv_heads) and the
visible slots V = {s : s <= pos} (s < cap):

    o[b, i] = sum_{s in V} softmax_s(scale * q[b, i] . k_cache[b, j, s]) v_cache[b, j, s]

A linear cache holds position p in slot p (pos < cap); a ring buffer (sliding window of cap) holds
p in slot p % cap, so once pos >= cap - 1 every slot is visible. Either way the visible slots are
0 .. min(pos, cap - 1): softmax does not depend on the order of the slots.

The mask is built from ``pos`` on the device (no host synchronisation, so a CUDA graph can capture
the call and replay it for every position). Scores, softmax and the weighted sum run in float32
(float64 when any input is float64). Every slot is read, but the invisible ones never reach the
output, even when they hold NaN or inf (an uninitialised buffer).
"""
from __future__ import annotations

import torch

from .._utils import check_decode_attention_args, compute_dtype

__all__ = ["decode_attention_ref", "visible_mask"]


def visible_mask(pos, cap: int, batch: int, device) -> torch.Tensor:
    """(batch or 1, 1, 1, cap) bool: slot s is visible (s <= pos). ``pos``: an int, or an integer
    tensor of shape () or (batch,) on ``device``."""
    slots = torch.arange(cap, device=device)
    if isinstance(pos, torch.Tensor):
        p = pos.reshape(-1, 1, 1, 1)  # () -> (1, 1, 1, 1); (batch,) -> (batch, 1, 1, 1)
        return slots <= p
    return (slots <= pos).reshape(1, 1, 1, cap)


def decode_attention_ref(q, k_cache, v_cache, pos, *, ring=False, scale=None):
    """Attention of one query per row over the visible cache slots (module docstring).

    q (batch, n_heads, head_dim); k_cache, v_cache (batch, n_kv_heads, cap, head_dim);
    pos an int or an int32/int64 tensor of shape () or (batch,); ring: the cache is a ring buffer
    (the visible slots are the same, ``ring`` only relaxes the check pos < cap of an int pos);
    scale: default head_dim ** -0.5. Returns o (batch, n_heads, head_dim) in q's dtype.
    """
    b, h, hkv, cap, d = check_decode_attention_args("decode_attention_ref", q, k_cache, v_cache,
                                                    pos, ring, scale)
    scale = d ** -0.5 if scale is None else float(scale)
    ct = compute_dtype(q, k_cache, v_cache)
    g = h // hkv
    qf = q.to(ct).reshape(b, hkv, g, d)
    vis = visible_mask(pos, cap, b, q.device)  # (b or 1, 1, 1, cap)
    s = torch.einsum("bjgd,bjsd->bjgs", qf, k_cache.to(ct)) * scale
    s = s.masked_fill(~vis, float("-inf"))
    w = torch.softmax(s, dim=-1)
    # zero the invisible values too: a weight of 0 times a NaN/inf slot would still give NaN
    v = v_cache.to(ct).masked_fill(~vis.reshape(vis.shape[0], 1, cap, 1), 0.0)
    o = torch.einsum("bjgs,bjsd->bjgd", w, v)
    return o.reshape(b, h, d).to(q.dtype)
