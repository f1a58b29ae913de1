"""Gated RMSNorm of Mamba-2 and the fused residual add + RMSNorm, by their definitions (the
references and the CPU paths).

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

from .._utils import check_add_rmsnorm_args, check_rmsnorm_gated_args, compute_dtype


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


def add_rmsnorm_dtypes(x, residual, residual_in_fp32=False, out_dtype=None):
    """(residual dtype, normed dtype) of ``add_rmsnorm``: the new residual keeps the residual
    stream's dtype (x's when there is no residual yet), at least float32 with
    ``residual_in_fp32``; normed has ``out_dtype``, default x's dtype."""
    res = residual.dtype if residual is not None else x.dtype
    if residual_in_fp32:
        res = torch.promote_types(res, torch.float32)
    return res, (out_dtype or x.dtype)


def add_rmsnorm_ref(x, residual, weight, eps=1e-5, residual_in_fp32=False, out_dtype=None):
    """Residual add + RMSNorm by its definition:

        new_residual = (x + residual) in the residual's dtype (x alone when residual is None)
        normed = new_residual / sqrt(mean(new_residual^2) + eps) * weight     (out_dtype)

    The sum and the statistics in float32 (float64 when an input is float64); the statistics
    are those of new_residual as stored (rounded to its dtype). Returns (normed,
    new_residual). Gradients through autograd."""
    check_add_rmsnorm_args("add_rmsnorm_ref", x, residual, weight, eps, out_dtype)
    res_dtype, y_dtype = add_rmsnorm_dtypes(x, residual, residual_in_fp32, out_dtype)
    ct = compute_dtype(x, residual, weight)
    with torch.autocast(x.device.type, enabled=False):
        h = x.to(ct) if residual is None else x.to(ct) + residual.to(ct)
        h = h.to(res_dtype)
        hf = h.to(ct)
        y = hf * torch.rsqrt(hf.square().mean(-1, keepdim=True) + eps) * weight.to(ct)
    return y.to(y_dtype), h


__all__ = ["add_rmsnorm_dtypes", "add_rmsnorm_ref", "rmsnorm_gated_ref"]
