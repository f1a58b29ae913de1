"""Rotary position embedding (RoPE, Su et al. 2021), "rotate-half" (GPT-NeoX/Llama) layout.

For a head vector split into halves ``(x1, x2)`` of size ``head_dim / 2`` and position ``p``:

    inv_freq[i] = theta ** (-2 i / head_dim),   angle[p, i] = p * inv_freq[i]
    rope(x, p) = (x1 cos - x2 sin, x2 cos + x1 sin)

The tables are built in float32 from integer positions on the fly (no buffer to be cast by
``model.half()``), and the rotation runs in float32; the result has the input's dtype.
Positions are one shared row (l,) or one row per sequence (b, l) (packed documents whose
positions restart at each document start).
"""
from __future__ import annotations

import torch


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape ``positions.shape + (head_dim // 2,)``, float32: (l, hd/2) for shared
    positions (l,), (b, l, hd/2) for per-sequence positions (b, l)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv_freq = theta ** (
        -torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim
    )
    angles = positions.to(torch.float64)[..., None] * inv_freq
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, l, h, head_dim); cos/sin (l, head_dim // 2) or (b, l, head_dim // 2). Returns x
    rotated, in x's dtype."""
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    c = cos[:, :, None, :]
    s = sin[:, :, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
