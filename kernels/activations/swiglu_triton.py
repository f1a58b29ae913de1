"""Triton kernels of the SwiGLU activation, one memory pass each way.

On a gate g and an up u (M, F) (separate tensors, or the two halves of one fused projection
h (M, 2F): gate in columns [:F], up in [F:]; rows may be strided, columns contiguous):

    forward   a[m, f] = silu(g) * u,               g = h[m, f], u = h[m, F + f]
    backward  dh[m, f]     = da * u * s * (1 + g * (1 - s)),   s = sigmoid(g)
              dh[m, F + f] = da * silu(g)

All math in fp32, outputs in h's dtype. Compared with PyTorch (silu, mul; and in the backward mul,
mul, silu_backward and the cat of the two halves) the forward reads h once and writes a once, and
the backward reads h and da once and writes dh once. ``kernels/swiglu.py`` holds the plain
PyTorch twins (``swiglu_fwd_ref``, ``swiglu_bwd_ref``) and the autograd entry point. Under
``torch.compile`` the kernels run as the custom ops at the end of this file.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._ops import custom_op


@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, a_ptr, M, F, stride_g, stride_u, stride_a,
                       BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows[:, None] < M) & (cols[None, :] < F)
    g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    a = g * tl.sigmoid(g) * u
    tl.store(a_ptr + rows[:, None] * stride_a + cols[None, :], a.to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(g_ptr, u_ptr, da_ptr, dg_ptr, du_ptr, M, F, stride_g, stride_u, stride_da,
                       stride_dg, stride_du, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows[:, None] < M) & (cols[None, :] < F)
    g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    da = tl.load(da_ptr + rows[:, None] * stride_da + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    dg = da * u * s * (1.0 + g * (1.0 - s))
    du = da * (g * s)
    tl.store(dg_ptr + rows[:, None] * stride_dg + cols[None, :], dg.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + rows[:, None] * stride_du + cols[None, :], du.to(du_ptr.dtype.element_ty), mask=mask)


def _blocks(f: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_F): up to 1024 columns per tile, about 4096 elements per program."""
    bf = min(1024, triton.next_power_of_2(max(f, 16)))
    return max(1, 4096 // bf), bf


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _grid(m: int, f: int):
    bm, bf = _blocks(f)
    return (triton.cdiv(m, bm), triton.cdiv(f, bf)), bm, bf


def silu_mul_fwd_triton(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """a (M, F) = silu(g) * u for g, u (M, F) (rows may be strided)."""
    g, u = _rows(g), _rows(u)
    m, f = g.shape
    a = torch.empty(m, f, dtype=g.dtype, device=g.device)
    if m == 0 or f == 0:
        return a
    grid, bm, bf = _grid(m, f)
    _swiglu_fwd_kernel[grid](g, u, a, m, f, g.stride(0), u.stride(0), a.stride(0), BLOCK_M=bm, BLOCK_F=bf)
    return a


def silu_mul_bwd_triton(g: torch.Tensor, u: torch.Tensor, da: torch.Tensor, dg: torch.Tensor | None = None,
                        du: torch.Tensor | None = None):
    """(dg, du) of a = silu(g) * u given da; written into ``dg``/``du`` when given (row views)."""
    g, u, da = _rows(g), _rows(u), _rows(da)
    m, f = g.shape
    dg = torch.empty_like(g) if dg is None else dg
    du = torch.empty_like(u) if du is None else du
    if m == 0 or f == 0:
        return dg, du
    grid, bm, bf = _grid(m, f)
    _swiglu_bwd_kernel[grid](g, u, da, dg, du, m, f, g.stride(0), u.stride(0), da.stride(0), dg.stride(0),
                             du.stride(0), BLOCK_M=bm, BLOCK_F=bf)
    return dg, du


def swiglu_fwd_triton(h: torch.Tensor) -> torch.Tensor:
    """a (M, F) = silu(h[:, :F]) * h[:, F:] for h (M, 2F)."""
    h = _rows(h)
    f = h.shape[1] // 2
    return silu_mul_fwd_triton(h[:, :f], h[:, f:])


def swiglu_bwd_triton(h: torch.Tensor, da: torch.Tensor) -> torch.Tensor:
    """dh (M, 2F), the gradient of swiglu_fwd at h given da (M, F): one pass, both halves."""
    h = _rows(h)
    f = h.shape[1] // 2
    dh = torch.empty(h.shape[0], 2 * f, dtype=h.dtype, device=h.device)
    silu_mul_bwd_triton(h[:, :f], h[:, f:], da, dh[:, :f], dh[:, f:])
    return dh


# ------------------------------------------------------------------ compiled: the custom ops
# ``hybridseq::swiglu_fwd`` (with its autograd: the SwiGLU op ``swiglu`` traces to), and
# ``swiglu_bwd``; ``silu_mul_fwd`` (with autograd) and ``silu_mul_bwd`` (``kernels._ops``). Rows
# are 2-D (M, 2F) / (M, F); the entry points reshape outside the ops.
@custom_op("swiglu_fwd")
def swiglu_fwd_op(h: torch.Tensor) -> torch.Tensor:
    return swiglu_fwd_triton(h)


@swiglu_fwd_op.register_fake
def _(h):
    return h.new_empty((h.shape[0], h.shape[1] // 2))


@custom_op("swiglu_bwd")
def swiglu_bwd_op(h: torch.Tensor, da: torch.Tensor) -> torch.Tensor:
    return swiglu_bwd_triton(h, da)


@swiglu_bwd_op.register_fake
def _(h, da):
    return h.new_empty((h.shape[0], h.shape[1]))


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _swiglu_backward(ctx, da):
    (h,) = ctx.saved_tensors
    return swiglu_bwd_op(h, da)


swiglu_fwd_op.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


@custom_op("silu_mul_fwd")
def silu_mul_fwd_op(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return silu_mul_fwd_triton(g, u)


@silu_mul_fwd_op.register_fake
def _(g, u):
    return g.new_empty(g.shape)


@custom_op("silu_mul_bwd")
def silu_mul_bwd_op(g: torch.Tensor, u: torch.Tensor, da: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    dg, du = silu_mul_bwd_triton(g, u, da)
    return dg.contiguous(), du.contiguous()


@silu_mul_bwd_op.register_fake
def _(g, u, da):
    return g.new_empty(g.shape), u.new_empty(u.shape)


def _silu_mul_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _silu_mul_backward(ctx, da):
    g, u = ctx.saved_tensors
    return silu_mul_bwd_op(g, u, da)


silu_mul_fwd_op.register_autograd(_silu_mul_backward, setup_context=_silu_mul_setup)
