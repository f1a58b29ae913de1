"""Rotary position embedding (RoPE, Su et al. 2021), "rotate-half" (GPT-NeoX/Llama) layout.

For a head vector whose first ``rot_dim`` channels rotate (``rot_dim = head_dim`` unless the
spec's ``partial_rotary`` is below 1; the other channels pass through unchanged), split into
halves ``(x1, x2)`` of size ``rot_dim / 2``, and position ``p``:

    inv_freq[i] = theta ** (-2 i / rot_dim),   angle[p, i] = p * inv_freq[i]
    rope(x, p) = (x1 cos - x2 sin, x2 cos + x1 sin) * attention_factor

``rope_scaling`` (the spec key, as transformers' ``rope_parameters``) changes ``inv_freq`` and
``attention_factor`` for context extension:

- ``{type: linear, factor}``: ``inv_freq / factor``;
- ``{type: llama3, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}``:
  wavelengths above ``original / low_freq_factor`` are divided by ``factor``, those below
  ``original / high_freq_factor`` kept, and the band between interpolated smoothly (Llama 3.1);
- ``{type: yarn, factor, original_max_position_embeddings, beta_fast (32), beta_slow (1),
  attention_factor, mscale, mscale_all_dim, truncate (true)}``: YaRN's blend of interpolated and
  extrapolated frequencies over a linear ramp between the correction dims, and cos/sin scaled by
  ``attention_factor`` (default ``0.1 ln(factor) + 1``, or the ratio of the two mscales).

The tables are built from integer positions on the fly (no buffer to be cast by
``model.half()``), in float64 and returned as float32; the rotation runs in float32 and the
result has the input's dtype. Positions are one shared row (l,) or one row per sequence (b, l)
(packed documents whose positions restart at each document start).
"""
from __future__ import annotations

import math

import torch

ROPE_SCALING_TYPES = ("linear", "llama3", "yarn")


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_freq_and_factor(rot_dim: int, theta: float, scaling: dict | None = None,
                        device=None) -> tuple[torch.Tensor, float]:
    """(inv_freq (rot_dim / 2,) float64, attention_factor) for ``rope_scaling`` (module
    docstring); ``scaling`` None: plain RoPE, factor 1."""
    inv = theta ** (-torch.arange(0, rot_dim, 2, device=device, dtype=torch.float64) / rot_dim)
    if not scaling:
        return inv, 1.0
    kind = scaling.get("type")
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor, 1.0
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        old = float(scaling["original_max_position_embeddings"])
        att = scaling.get("attention_factor")
        if att is None:
            ms, ms_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            att = (_yarn_mscale(factor, ms) / _yarn_mscale(factor, ms_all) if ms and ms_all
                   else _yarn_mscale(factor))
        beta_fast = float(scaling.get("beta_fast") or 32)
        beta_slow = float(scaling.get("beta_slow") or 1)

        def correction_dim(rotations: float) -> float:
            return rot_dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, rot_dim - 1)
        if lo == hi:
            hi += 0.001  # no zero-width ramp
        ramp = ((torch.arange(rot_dim // 2, device=device, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
        extrapolate = 1 - ramp  # 1: keep the frequency, 0: interpolate it by factor
        return inv / factor * (1 - extrapolate) + inv * extrapolate, float(att)
    raise ValueError(f"unknown rope_scaling type {kind!r} (one of: {', '.join(ROPE_SCALING_TYPES)})")


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, scaling: dict | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape ``positions.shape + (head_dim // 2,)``, float32 (``head_dim``: the
    rotated channels, ``rot_dim``): (l, hd/2) for shared positions (l,), (b, l, hd/2) for
    per-sequence positions (b, l). ``scaling``: the spec's ``rope_scaling``; its attention factor
    multiplies both tables."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv_freq, factor = inv_freq_and_factor(head_dim, theta, scaling, positions.device)
    angles = positions.to(torch.float64)[..., None] * inv_freq
    cos, sin = angles.cos(), angles.sin()
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos.float(), sin.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, l, h, head_dim); cos/sin (l, r / 2) or (b, l, r / 2) with r <= head_dim the rotated
    channels (the first r; the rest pass through). Returns x rotated, in x's dtype."""
    rot = 2 * cos.shape[-1]
    xf = x.float()
    rest = None
    if rot < x.shape[-1]:
        xf, rest = xf[..., :rot], xf[..., rot:]
    half = rot // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    c = cos[:, :, None, :]
    s = sin[:, :, None, :]
    parts = [x1 * c - x2 * s, x2 * c + x1 * s]
    if rest is not None:
        parts.append(rest)
    return torch.cat(parts, dim=-1).to(x.dtype)
