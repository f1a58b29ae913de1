"""Triton kernels of the fused residual add + RMSNorm, forward and backward, as one autograd op.

Rows are the flattened leading dimensions (M, d); one program owns BM whole rows (the row's d
channels in registers). With x the sublayer's output, r the residual stream (may be absent) and
w the norm weight:

    forward   h = round_res(x + r)            the new residual, stored in the residual's dtype
              s = 1 / sqrt(mean_d(h^2) + eps),  y = h s w      (y in its own dtype; s saved)

The statistics are taken from h as stored (after rounding to the residual's dtype), so the
forward and the backward, which recomputes hhat = h s from the saved h, see the same numbers,
and the result equals an unfused ``r = x + r; y = rmsnorm(r)``.

    backward  given dy (for y) and dh_out (for the new residual, from the later sublayers; may be
              absent), with gw = dy w and hhat = h s:
              dh = s (gw - hhat mean_d(gw hhat)) + dh_out
              dx = dh (x's dtype), dr = dh (the residual's dtype), dw = sum_rows dy hhat

One pass each way: the forward reads x and r once and writes h and y; the backward reads h, dy
and dh_out once and writes dx and dr. dw is reduced deterministically as in ``triton_norm.py``:
each backward program owns a fixed range of row blocks and writes its float32 partial to its
own row of a (programs, d) buffer, which one torch sum reduces. All math in float32.

``add_rmsnorm_fwd`` / ``add_rmsnorm_bwd`` are also the custom ops ``hybridseq::add_rmsnorm_fwd`` /
``hybridseq::add_rmsnorm_bwd`` (``kernels._ops``): what ``torch.compile`` traces.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .._ops import custom_op
from ..backend import interpreting

__all__ = ["MAX_D", "add_rmsnorm_op", "add_rmsnorm_triton"]

_INTERPRET = interpreting()  # Triton read the same variable when it decorated the kernels
MAX_D = 32768  # one program holds whole rows in registers


@triton.jit
def _add_rmsnorm_fwd_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, s_ptr, M, D, sx, sr, sy, sh,
                            eps, HAS_RES: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = tl.arange(0, BD)
    rmask = rows < M
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    h = tl.load(x_ptr + rows[:, None] * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        h += tl.load(r_ptr + rows[:, None] * sr + cols[None, :], mask=mask,
                     other=0.0).to(tl.float32)
    # a float32 -> 16-bit downcast rounds to nearest even, as torch (Triton's interpreter
    # truncates instead)
    hr = h.to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + rows[:, None] * sh + cols[None, :], hr, mask=mask)
    h = hr.to(tl.float32)  # the statistics of h as stored
    s = 1.0 / tl.sqrt(tl.sum(h * h, axis=1) / D + eps)
    tl.store(s_ptr + rows, s, mask=rmask)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    y = h * s[:, None] * w[None, :]
    tl.store(y_ptr + rows[:, None] * sy + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_rmsnorm_bwd_kernel(h_ptr, s_ptr, w_ptr, dy_ptr, dho_ptr, dx_ptr, dr_ptr, dwp_ptr,
                            M, D, BLOCKS_PER_PROG, N_BLOCKS, sh, sdy, sdho, sdx, sdr,
                            HAS_DHO: tl.constexpr, HAS_RES: tl.constexpr,
                            BM: tl.constexpr, BD: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BD)
    cmask = cols < D
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros((BD,), dtype=tl.float32)
    start = pid * BLOCKS_PER_PROG
    end = tl.minimum(start + BLOCKS_PER_PROG, N_BLOCKS)
    for blk in range(start, end):
        rows = (blk * BM + tl.arange(0, BM)).to(tl.int64)  # row numbers fit int32, offsets not
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        h = tl.load(h_ptr + rows[:, None] * sh + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * sdy + cols[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        s = tl.load(s_ptr + rows, mask=rmask, other=0.0)
        hhat = h * s[:, None]
        dw += tl.sum(dy * hhat, axis=0)
        gw = dy * w[None, :]
        c = tl.sum(gw * hhat, axis=1) / D
        dh = s[:, None] * (gw - hhat * c[:, None])
        if HAS_DHO:
            dh += tl.load(dho_ptr + rows[:, None] * sdho + cols[None, :], mask=mask,
                          other=0.0).to(tl.float32)
        tl.store(dx_ptr + rows[:, None] * sdx + cols[None, :], dh.to(dx_ptr.dtype.element_ty),
                 mask=mask)
        if HAS_RES:
            tl.store(dr_ptr + rows[:, None] * sdr + cols[None, :],
                     dh.to(dr_ptr.dtype.element_ty), mask=mask)
    tl.store(dwp_ptr + pid * D + cols, dw, mask=cmask)


def _tiles(d: int) -> tuple[int, int, int]:
    """(BM, BD, num_warps): whole rows per tile, about 4096 elements per tile."""
    bd = triton.next_power_of_2(max(d, 1))
    bm = max(1, 4096 // bd)
    if _INTERPRET:
        return min(bm, 16), bd, 1
    elems = bm * bd
    return bm, bd, 4 if elems <= 4096 else (8 if elems <= 8192 else 16)


def _rows(t: torch.Tensor, d: int) -> torch.Tensor:
    """(..., d) -> (M, d) with unit column stride (rows may be strided)."""
    t = t.reshape(-1, d)
    return t if t.stride(1) == 1 or d <= 1 else t.contiguous()


def _bwd_programs(n_blocks: int, device) -> int:
    """Row programs of the backward: a few per SM, each looping over a contiguous range of row
    blocks (fewer programs = a smaller dw partial buffer)."""
    if _INTERPRET or device.type != "cuda":
        return min(n_blocks, 4)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_blocks, 4 * sms))


# ---------------------------------------------------------------------------------- launches
def _fwd(x2, r2, weight, eps, res_dtype, out_dtype):
    """(y, h, s) for rows x2 (M, d) and r2 (M, d) or None."""
    M, d = x2.shape
    y = torch.empty(M, d, dtype=out_dtype, device=x2.device)
    h = torch.empty(M, d, dtype=res_dtype, device=x2.device)
    s = torch.empty(M, dtype=torch.float32, device=x2.device)
    if M > 0 and d > 0:
        bm, bd, nw = _tiles(d)
        _add_rmsnorm_fwd_kernel[(triton.cdiv(M, bm),)](
            x2, r2 if r2 is not None else x2, weight, y, h, s, M, d,
            x2.stride(0), r2.stride(0) if r2 is not None else 0, y.stride(0), h.stride(0),
            float(eps), HAS_RES=r2 is not None, BM=bm, BD=bd, num_warps=nw)
    return y, h, s


def _bwd(dy2, dho2, h2, s, weight, x_dtype, has_res):
    """(dx, dr or None, dw) for rows dy2 (M, d), dho2 (M, d) or None."""
    M, d = h2.shape
    dx = torch.empty(M, d, dtype=x_dtype, device=h2.device)
    dr = torch.empty(M, d, dtype=h2.dtype, device=h2.device) if has_res else None
    if M == 0 or d == 0:
        return dx, dr, torch.zeros_like(weight)
    bm, bd, nw = _tiles(d)
    n_blocks = triton.cdiv(M, bm)
    progs = _bwd_programs(n_blocks, h2.device)
    per_prog = triton.cdiv(n_blocks, progs)
    progs = triton.cdiv(n_blocks, per_prog)  # no program without rows
    dw_part = torch.empty(progs, d, dtype=torch.float32, device=h2.device)
    _add_rmsnorm_bwd_kernel[(progs,)](
        h2, s, weight, dy2, dho2 if dho2 is not None else dy2, dx, dr if dr is not None else dx,
        dw_part, M, d, per_prog, n_blocks, h2.stride(0), dy2.stride(0),
        dho2.stride(0) if dho2 is not None else 0, dx.stride(0),
        dr.stride(0) if dr is not None else 0,
        HAS_DHO=dho2 is not None, HAS_RES=has_res, BM=bm, BD=bd, num_warps=nw)
    return dx, dr, dw_part.sum(0).to(weight.dtype)


# ------------------------------------------------------------------- eager: autograd.Function
class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps, res_dtype, out_dtype):
        d = x.shape[-1]
        y, h, s = _fwd(_rows(x, d), _rows(residual, d) if residual is not None else None,
                       weight, eps, res_dtype, out_dtype)
        ctx.save_for_backward(h, s, weight)
        ctx.cfg = (x.shape, x.dtype, residual is not None)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None
        return y.view(x.shape), h.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_out):
        h, s, weight = ctx.saved_tensors
        shape, x_dtype, has_res = ctx.cfg
        d = h.shape[1]
        dy2 = _rows(dy, d) if dy is not None else torch.zeros_like(h)
        dho2 = _rows(dh_out, d) if dh_out is not None else None
        dx, dr, dw = _bwd(dy2, dho2, h, s, weight, x_dtype, has_res)
        need = ctx.needs_input_grad
        return (dx.view(shape) if need[0] else None,
                dr.view(shape) if dr is not None and need[1] else None,
                dw if need[2] else None, None, None, None)


# ------------------------------------------------------------------ compiled: the custom ops
@custom_op("add_rmsnorm_fwd")
def _fwd_op(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
            res_dtype: torch.dtype, out_dtype: torch.dtype
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, s): y and h shaped like x; s (M,) float32 the saved 1 / rms."""
    d = x.shape[-1]
    y, h, s = _fwd(_rows(x, d), _rows(residual, d) if residual is not None else None, weight,
                   eps, res_dtype, out_dtype)
    return y.view(x.shape), h.view(x.shape), s


@_fwd_op.register_fake
def _(x, residual, weight, eps, res_dtype, out_dtype):
    return (x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape, dtype=res_dtype),
            x.new_empty((math.prod(x.shape[:-1]),), dtype=torch.float32))


@custom_op("add_rmsnorm_bwd")
def _bwd_op(dy: torch.Tensor, dh_out: torch.Tensor | None, h: torch.Tensor, s: torch.Tensor,
            weight: torch.Tensor, x_dtype: torch.dtype, has_res: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dr, dw); dr is an empty stand-in without a residual."""
    d = h.shape[-1]
    dx, dr, dw = _bwd(_rows(dy, d), _rows(dh_out, d) if dh_out is not None else None,
                      _rows(h, d), s, weight, x_dtype, has_res)
    return dx.view(h.shape), (dr.view(h.shape) if dr is not None else h.new_empty(0)), dw


@_bwd_op.register_fake
def _(dy, dh_out, h, s, weight, x_dtype, has_res):
    dr = h.new_empty(h.shape) if has_res else h.new_empty(0)
    return h.new_empty(h.shape, dtype=x_dtype), dr, torch.empty_like(weight)


def _setup(ctx, inputs, output):
    x, residual, weight = inputs[:3]
    _, h, s = output
    ctx.save_for_backward(h, s, weight)
    ctx.cfg = (x.dtype, residual is not None)


def _backward(ctx, dy, dh_out, _ds):
    h, s, weight = ctx.saved_tensors
    x_dtype, has_res = ctx.cfg
    if dy is None:
        dy = torch.zeros_like(h)
    dx, dr, dw = _bwd_op(dy, dh_out, h, s, weight, x_dtype, has_res)
    return dx, (dr if has_res else None), dw, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup)


def add_rmsnorm_op(x, residual, weight, eps, res_dtype, out_dtype):
    """(normed, new_residual) through the custom op (what ``torch.compile`` traces)."""
    y, h, _ = _fwd_op(x, residual, weight, float(eps), res_dtype, out_dtype)
    return y, h


def add_rmsnorm_triton(x, residual, weight, eps, res_dtype, out_dtype):
    """(normed, new_residual) on CUDA (or the interpreter), differentiable in x, residual and
    weight; see ``add_rmsnorm_ref``. Arguments are assumed checked (``add_rmsnorm`` does it)."""
    return _AddRMSNorm.apply(x, residual, weight, float(eps), res_dtype, out_dtype)
