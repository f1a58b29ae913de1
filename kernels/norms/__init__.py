"""Normalisations: the gated RMSNorm of Mamba-2.

    y = rmsnorm_gated(x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=False,
                      impl="auto")

Files: ``ref.py`` (the PyTorch reference, also the CPU path), ``triton_norm.py`` (the Triton
forward and backward kernels as one autograd op). ``impl`` is resolved by
``kernels.backend.resolve`` ("torch" and "ref" are the same here).
"""
from __future__ import annotations

from .._utils import check_rmsnorm_gated_args
from ..backend import resolve
from .ref import rmsnorm_gated_ref

_MAX_GROUP_SIZE = 16384  # triton_norm.MAX_GROUP_SIZE (not imported: it would import Triton)


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
        from .triton_norm import rmsnorm_gated_triton

        return rmsnorm_gated_triton(x, weight, z, eps, gs, norm_before_gate)
    return rmsnorm_gated_ref(x, weight, z, eps, group_size, norm_before_gate)


__all__ = ["rmsnorm_gated", "rmsnorm_gated_ref"]
