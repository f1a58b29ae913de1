"""SwiGLU activation on a fused gate|up projection, with explicit forward and backward.

For h (..., 2F), gate g = h[..., :F], up u = h[..., F:], s = sigmoid(g):

    swiglu(h) = silu(g) * u
    d/dg = da * u * s * (1 + g * (1 - s)),   d/du = da * silu(g)

- ``swiglu_ref(h)``: the definition with autograd (F.silu(g) * u), for the tests.
- ``swiglu_fwd_ref(h)`` / ``swiglu_bwd_ref(h, da)``: the explicit formulas in PyTorch (math in
  fp32 for half inputs, results in h's dtype), the twins of the Triton kernels in
  ``swiglu_triton.py``.
- ``swiglu_fwd(h, impl)`` / ``swiglu_bwd(h, da, impl)``: impl ``auto`` (Triton on CUDA when it
  imports, else torch), ``torch`` (the explicit formulas), ``triton`` (CPU only under
  TRITON_INTERPRET=1). Used by ``grouped_mlp.py``, which saves h and calls these itself.
- ``swiglu(h, impl)``: the autograd op (saves h only), on the output of one fused gate|up
  projection: what ``blocks/mlp.py`` and the MoE's shared experts use.
- ``silu_mul(g, u, impl)``: the same on separate gate and up tensors (saves g and u; the
  backward returns dg and du without a cat), for an MLP with two projections (``bench moe``'s
  ``block_fused`` anchor).
  ``silu_mul_ref(g, u)`` = F.silu(g) * u.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._ops import compiling
from ..backend import resolve

SWIGLU_IMPLS = ("auto", "torch", "triton")


def swiglu_ref(h: torch.Tensor) -> torch.Tensor:
    g, u = h.chunk(2, dim=-1)
    return F.silu(g) * u


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def swiglu_fwd_ref(h: torch.Tensor) -> torch.Tensor:
    g, u = _acc(h).chunk(2, dim=-1)
    return (F.silu(g) * u).to(h.dtype)


def swiglu_bwd_ref(h: torch.Tensor, da: torch.Tensor) -> torch.Tensor:
    g, u = _acc(h).chunk(2, dim=-1)
    da = _acc(da)
    s = torch.sigmoid(g)
    dg = da * u * s * (1 + g * (1 - s))
    du = da * (g * s)
    return torch.cat([dg, du], dim=-1).to(h.dtype)


def _use_triton(t: torch.Tensor, impl: str) -> bool:
    return resolve("swiglu", impl, t, choices=SWIGLU_IMPLS) == "triton"


def _check(h: torch.Tensor) -> None:
    if h.shape[-1] % 2:
        raise ValueError(f"swiglu: the last dim of h must be even (gate|up), got shape {tuple(h.shape)}")


def swiglu_fwd(h: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    _check(h)
    if not _use_triton(h, impl):
        return swiglu_fwd_ref(h)
    from .swiglu_triton import swiglu_fwd_op, swiglu_fwd_triton

    fn = swiglu_fwd_op if compiling() else swiglu_fwd_triton
    lead = h.shape[:-1]
    return fn(h.reshape(-1, h.shape[-1])).view(*lead, h.shape[-1] // 2)


def swiglu_bwd(h: torch.Tensor, da: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    _check(h)
    if not _use_triton(h, impl):
        return swiglu_bwd_ref(h, da)
    from .swiglu_triton import swiglu_bwd_op, swiglu_bwd_triton

    fn = swiglu_bwd_op if compiling() else swiglu_bwd_triton
    lead = h.shape[:-1]
    return fn(h.reshape(-1, h.shape[-1]), da.reshape(-1, da.shape[-1])).view(*lead, h.shape[-1])


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, impl):
        ctx.save_for_backward(h)
        ctx.impl = impl
        return swiglu_fwd(h, impl)

    @staticmethod
    def backward(ctx, da):
        (h,) = ctx.saved_tensors
        return swiglu_bwd(h, da, ctx.impl), None


def swiglu(h: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """silu(h[..., :F]) * h[..., F:] with the fused backward (saves only h). Under
    ``torch.compile`` with the Triton kernels: the custom op ``hybridseq::swiglu_fwd`` and its
    registered backward."""
    if compiling() and _use_triton(h, impl):
        from .swiglu_triton import swiglu_fwd_op

        _check(h)
        lead = h.shape[:-1]
        return swiglu_fwd_op(h.reshape(-1, h.shape[-1])).view(*lead, h.shape[-1] // 2)
    return _SwiGLU.apply(h, impl)


def silu_mul_ref(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u):
        from .swiglu_triton import silu_mul_fwd_triton

        ctx.save_for_backward(g, u)
        return silu_mul_fwd_triton(g.reshape(-1, g.shape[-1]), u.reshape(-1, u.shape[-1])).view(g.shape)

    @staticmethod
    def backward(ctx, da):
        from .swiglu_triton import silu_mul_bwd_triton

        g, u = ctx.saved_tensors
        f = g.shape[-1]
        dg, du = silu_mul_bwd_triton(g.reshape(-1, f), u.reshape(-1, f), da.reshape(-1, f))
        return dg.view(g.shape), du.view(u.shape)


def silu_mul(g: torch.Tensor, u: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """silu(g) * u for g, u of one shape (..., F); Triton forward and backward (one pass each) when
    ``impl`` resolves to triton, else ``silu_mul_ref`` (autograd)."""
    if g.shape != u.shape:
        raise ValueError(f"silu_mul: g and u must have one shape, got {tuple(g.shape)} and {tuple(u.shape)}")
    if not _use_triton(g, impl):
        return silu_mul_ref(g, u)
    if compiling():
        from .swiglu_triton import silu_mul_fwd_op

        f = g.shape[-1]
        return silu_mul_fwd_op(g.reshape(-1, f), u.reshape(-1, f)).view(g.shape)
    return _SiluMul.apply(g, u)
