"""Normalisations: the gated RMSNorm of Mamba-2, and the fused residual add + RMSNorm.

    y = rmsnorm_gated(x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=False,
                      impl="auto")
    normed, residual = add_rmsnorm(x, residual, weight, eps=1e-5, impl="auto",
                                   residual_in_fp32=False, out_dtype=None)

Files: ``ref.py`` (the PyTorch references, also the CPU paths), ``triton_norm.py`` (the gated
norm's Triton forward and backward kernels as one autograd op), ``triton_add_norm.py`` (the same
for the residual add + RMSNorm). ``impl`` is resolved by ``kernels.backend.resolve`` ("torch"
and "ref" are the same here). Under ``torch.compile`` the Triton paths run as the custom ops
``hybridseq::rmsnorm_gated_fwd/bwd`` and ``hybridseq::add_rmsnorm_fwd/bwd`` (``kernels._ops``).
"""
from __future__ import annotations

from .._ops import compiling
from .._utils import check_add_rmsnorm_args, check_rmsnorm_gated_args
from ..backend import resolve
from .ref import add_rmsnorm_dtypes, add_rmsnorm_ref, rmsnorm_gated_ref

_MAX_GROUP_SIZE = 16384  # triton_norm.MAX_GROUP_SIZE (not imported: it would import Triton)
_MAX_ADD_NORM_D = 32768  # triton_add_norm.MAX_D


def rmsnorm_gated(x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=False,
                  impl="auto"):
    """Gated RMSNorm over groups of ``group_size`` channels (None: the whole last dim), with
    rms(u) = sqrt(mean_group(u^2) + eps):

        y = (x * silu(z)) / rms(x * silu(z)) * weight     (norm_before_gate=False)
        y = x / rms(x) * weight * silu(z)                  (norm_before_gate=True)
        y = x / rms(x) * weight                            (z is None)

    x, z: (..., d); weight: (d,); d % group_size == 0. Statistics in float32, y in x's dtype.
    Differentiable in x, weight and z."""
    _, gs = check_rmsnorm_gated_args("rmsnorm_gated", x, weight, z, eps, group_size)
    which = resolve("rmsnorm_gated", impl, x, fits=gs <= _MAX_GROUP_SIZE,
                    limits=f"group_size <= {_MAX_GROUP_SIZE}, got {gs}")
    if which == "triton":
        from .triton_norm import rmsnorm_gated_op, rmsnorm_gated_triton

        fn = rmsnorm_gated_op if compiling() else rmsnorm_gated_triton
        return fn(x, weight, z, eps, gs, norm_before_gate)
    return rmsnorm_gated_ref(x, weight, z, eps, group_size, norm_before_gate)


def add_rmsnorm(x, residual, weight, eps=1e-5, impl="auto", *, residual_in_fp32=False,
                out_dtype=None):
    """The residual add of a pre-norm sublayer fused with the next RMSNorm:

        new_residual = x + residual        (residual None: x), in the residual stream's dtype
                                           (residual's, x's without one; at least float32 with
                                           ``residual_in_fp32``)
        normed = new_residual / sqrt(mean(new_residual^2) + eps) * weight    (``out_dtype``,
                                           default x's dtype)

    x, residual: (..., d); weight: (d,). The sum and the statistics in float32, taken from
    new_residual as stored. Returns (normed, new_residual), differentiable in x, residual and
    weight (both outputs carry gradients: new_residual's from the later sublayers). The Triton
    path reads x and residual once and writes both outputs in one pass (backward: one pass, dw
    reduced deterministically)."""
    d = check_add_rmsnorm_args("add_rmsnorm", x, residual, weight, eps, out_dtype)
    which = resolve("add_rmsnorm", impl, x, fits=d <= _MAX_ADD_NORM_D,
                    limits=f"d <= {_MAX_ADD_NORM_D}, got {d}")
    if which == "triton":
        from .triton_add_norm import add_rmsnorm_op, add_rmsnorm_triton

        res_dtype, y_dtype = add_rmsnorm_dtypes(x, residual, residual_in_fp32, out_dtype)
        fn = add_rmsnorm_op if compiling() else add_rmsnorm_triton
        return fn(x, residual, weight, eps, res_dtype, y_dtype)
    return add_rmsnorm_ref(x, residual, weight, eps, residual_in_fp32, out_dtype)


__all__ = ["add_rmsnorm", "add_rmsnorm_ref", "rmsnorm_gated", "rmsnorm_gated_ref"]
