"""Gated RMSNorm of Mamba-2, by its definition (the reference and the CPU path).

x, z: (..., d); weight: (d,). The RMS is taken over groups of ``group_size`` consecutive
channels (None: the whole last dimension), rms(u) = sqrt(mean_group(u^2) + eps):

    z is None:                        y = x / rms(x) * weight
    norm_before_gate=False (default): y = u / rms(u) * weight,          u = x * silu(z)
    norm_before_gate=True:            y = x / rms(x) * weight * silu(z)

Statistics and arithmetic in float32 (float64 when an input is float64), output in x's dtype.
Gradients through autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._utils import check_rmsnorm_gated_args, compute_dtype


def rmsnorm_gated_ref(x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=False):
    """Gated RMSNorm (see the module docstring)."""
    d, gs = check_rmsnorm_gated_args("rmsnorm_gated_ref", x, weight, z, eps, group_size)
    ct = compute_dtype(x, weight, z)
    with torch.autocast(x.device.type, enabled=False):
        u = x.to(ct)
        gate = F.silu(z.to(ct)) if z is not None else None
        if gate is not None and not norm_before_gate:
            u = u * gate
        ug = u.reshape(*u.shape[:-1], d // gs, gs)
        rstd = torch.rsqrt(ug.square().mean(-1, keepdim=True) + eps)
        y = (ug * rstd).reshape(u.shape) * weight.to(ct)
        if gate is not None and norm_before_gate:
            y = y * gate
    return y.to(x.dtype)


__all__ = ["rmsnorm_gated_ref"]
