"""Triton kernels of the gated RMSNorm (Mamba-2), forward and backward, as one autograd op.

Rows are the flattened leading dimensions of x (M, d); each row splits into d / G groups of
G = group_size consecutive channels, and one program normalises a block of BM rows of one group.
With gate = silu(z), u = x * gate (norm_before_gate False) or u = x (True, or no z), and
r = rstd = 1 / sqrt(mean_G(u^2) + eps), xhat = u r:

    forward   y = xhat * w            (* gate when norm_before_gate)      r saved per (row, group)

    backward  with gy = dy * gate (norm_before_gate) or dy, and gw = gy * w,
              dw = sum_rows gy * xhat
              du = r * (gw - xhat * mean_G(gw * xhat))                   (the RMSNorm backward)
              norm_before_gate False: dx = du * gate,  dz = du * x * silu'(z)
              norm_before_gate True:  dx = du,         dz = dy * xhat * w * silu'(z)
              silu'(z) = s (1 + z (1 - s)),  s = sigmoid(z)

The backward recomputes u and xhat from x, z and r (the forward saves x, z, weight and r only).
dw is reduced deterministically: each backward program owns a fixed contiguous range of row
blocks, accumulates its partial dw in float32 registers and writes it to its own row of a
(programs, d) float32 buffer, which one torch sum reduces. All math in float32; y, dx, dz in the
inputs' dtypes, dw in weight's.

The forward and backward launches are also the custom ops ``hybridseq::rmsnorm_gated_fwd`` /
``hybridseq::rmsnorm_gated_bwd`` (``kernels._ops``): what ``torch.compile`` traces.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .._ops import custom_op
from ..backend import interpreting

__all__ = ["MAX_GROUP_SIZE", "rmsnorm_gated_op", "rmsnorm_gated_triton"]

_INTERPRET = interpreting()  # Triton read the same variable when it decorated the kernels
MAX_GROUP_SIZE = 16384  # one program holds a whole group in registers


@triton.jit
def _rmsnorm_gated_fwd_kernel(x_ptr, z_ptr, w_ptr, y_ptr, rstd_ptr, M, G, NG, sx, sz, sy, sw,
                              eps, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
                              BM: tl.constexpr, BG: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    grp = tl.program_id(1)
    j = tl.arange(0, BG)
    cols = grp * G + j
    rmask = rows < M
    cmask = j < G
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + rows[:, None] * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = x
    if HAS_Z:
        zv = tl.load(z_ptr + rows[:, None] * sz + cols[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        gate = zv * tl.sigmoid(zv)
        if not NORM_BEFORE_GATE:
            u = x * gate
    rstd = 1.0 / tl.sqrt(tl.sum(u * u, axis=1) / G + eps)
    tl.store(rstd_ptr + rows * NG + grp, rstd, mask=rmask)
    w = tl.load(w_ptr + cols * sw, mask=cmask, other=0.0).to(tl.float32)
    y = u * rstd[:, None] * w[None, :]
    if HAS_Z:
        if NORM_BEFORE_GATE:
            y = y * gate
    tl.store(y_ptr + rows[:, None] * sy + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_gated_bwd_kernel(x_ptr, z_ptr, w_ptr, rstd_ptr, dy_ptr, dx_ptr, dz_ptr, dwp_ptr,
                              M, G, NG, D, BLOCKS_PER_PROG, N_BLOCKS, sx, sz, sw, sdy, sdx, sdz,
                              HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
                              BM: tl.constexpr, BG: tl.constexpr):
    pid = tl.program_id(0)
    grp = tl.program_id(1)
    j = tl.arange(0, BG)
    cols = grp * G + j
    cmask = j < G
    w = tl.load(w_ptr + cols * sw, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros((BG,), dtype=tl.float32)
    start = pid * BLOCKS_PER_PROG
    end = tl.minimum(start + BLOCKS_PER_PROG, N_BLOCKS)
    for blk in range(start, end):
        rows = (blk * BM + tl.arange(0, BM)).to(tl.int64)  # row numbers fit int32, offsets not
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(x_ptr + rows[:, None] * sx + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * sdy + cols[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows * NG + grp, mask=rmask, other=0.0)
        u = x
        gy = dy
        if HAS_Z:
            zv = tl.load(z_ptr + rows[:, None] * sz + cols[None, :], mask=mask,
                         other=0.0).to(tl.float32)
            sg = tl.sigmoid(zv)
            gate = zv * sg
            dgate = sg * (1.0 + zv * (1.0 - sg))
            if not NORM_BEFORE_GATE:
                u = x * gate
        xhat = u * rstd[:, None]
        if HAS_Z:
            if NORM_BEFORE_GATE:
                dz = dy * xhat * w[None, :] * dgate
                gy = dy * gate
        dw += tl.sum(gy * xhat, axis=0)
        gw = gy * w[None, :]
        c = tl.sum(gw * xhat, axis=1) / G
        du = rstd[:, None] * (gw - xhat * c[:, None])
        dx = du
        if HAS_Z:
            if not NORM_BEFORE_GATE:
                dx = du * gate
                dz = du * x * dgate
            tl.store(dz_ptr + rows[:, None] * sdz + cols[None, :],
                     dz.to(dz_ptr.dtype.element_ty), mask=mask)
        tl.store(dx_ptr + rows[:, None] * sdx + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=mask)
    tl.store(dwp_ptr + pid * D + cols, dw, mask=cmask)


def _tiles(G: int) -> tuple[int, int, int]:
    """(BM, BG, num_warps): a whole group per tile row, about 4096 elements per tile."""
    bg = triton.next_power_of_2(G)
    bm = max(1, 4096 // bg)
    if _INTERPRET:
        return min(bm, 16), bg, 1
    elems = bm * bg
    return bm, bg, 4 if elems <= 4096 else (8 if elems <= 8192 else 16)


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


def _fwd(x2, z2, weight, eps, group_size, norm_before_gate):
    """(y (M, d), rstd (M, d / group_size) float32) for rows x2, z2 (M, d)."""
    M, d = x2.shape
    ng = d // group_size
    y = torch.empty(M, d, dtype=x2.dtype, device=x2.device)
    rstd = torch.empty(M, ng, dtype=torch.float32, device=x2.device)
    if M > 0 and d > 0:
        bm, bg, nw = _tiles(group_size)
        _rmsnorm_gated_fwd_kernel[(triton.cdiv(M, bm), ng)](
            x2, z2 if z2 is not None else x2, weight, y, rstd, M, group_size, ng,
            x2.stride(0), z2.stride(0) if z2 is not None else 0, y.stride(0),
            weight.stride(0), float(eps),
            HAS_Z=z2 is not None, NORM_BEFORE_GATE=bool(norm_before_gate), BM=bm, BG=bg,
            num_warps=nw)
    return y, rstd


def _bwd(x2, z2, weight, rstd, dy2, group_size, nbg):
    """(dx (M, d), dw (d,), dz (M, d) or None) for the output gradient rows dy2 (M, d)."""
    M, d = x2.shape
    ng = d // group_size
    dx = torch.empty(M, d, dtype=x2.dtype, device=x2.device)
    dz = torch.empty_like(z2, memory_format=torch.contiguous_format) if z2 is not None \
        else None
    if M == 0 or d == 0:
        if dz is not None:
            dz.zero_()
        return dx.zero_(), torch.zeros_like(weight), dz
    bm, bg, nw = _tiles(group_size)
    n_blocks = triton.cdiv(M, bm)
    progs = _bwd_programs(n_blocks, x2.device)
    per_prog = triton.cdiv(n_blocks, progs)
    progs = triton.cdiv(n_blocks, per_prog)  # no program without rows
    dw_part = torch.empty(progs, d, dtype=torch.float32, device=x2.device)
    _rmsnorm_gated_bwd_kernel[(progs, ng)](
        x2, z2 if z2 is not None else x2, weight, rstd, dy2, dx,
        dz if dz is not None else dx, dw_part,
        M, group_size, ng, d, per_prog, n_blocks,
        x2.stride(0), z2.stride(0) if z2 is not None else 0, weight.stride(0),
        dy2.stride(0), dx.stride(0), dz.stride(0) if dz is not None else 0,
        HAS_Z=z2 is not None, NORM_BEFORE_GATE=nbg, BM=bm, BG=bg, num_warps=nw)
    return dx, dw_part.sum(0).to(weight.dtype), dz


# ------------------------------------------------------------------- eager: autograd.Function
class _RMSNormGated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, z, eps, group_size, norm_before_gate):
        d = x.shape[-1]
        x2 = _rows(x, d)
        z2 = _rows(z, d) if z is not None else None
        y, rstd = _fwd(x2, z2, weight, eps, group_size, norm_before_gate)
        ctx.save_for_backward(x2, z2, weight, rstd)
        ctx.cfg = (x.shape, group_size, bool(norm_before_gate))
        return y.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x2, z2, weight, rstd = ctx.saved_tensors
        shape, group_size, nbg = ctx.cfg
        dx, dw, dz = _bwd(x2, z2, weight, rstd, _rows(dy, x2.shape[1]), group_size, nbg)
        need = ctx.needs_input_grad
        return (dx.view(shape) if need[0] else None, dw if need[1] else None,
                dz.view(shape) if dz is not None and need[2] else None, None, None, None)


# ------------------------------------------------------------------ compiled: the custom ops
@custom_op("rmsnorm_gated_fwd")
def _fwd_op(x: torch.Tensor, weight: torch.Tensor, z: torch.Tensor | None, eps: float,
            group_size: int, norm_before_gate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y like x, rstd (M, d / group_size) float32)."""
    d = x.shape[-1]
    y, rstd = _fwd(_rows(x, d), _rows(z, d) if z is not None else None, weight, eps,
                   group_size, norm_before_gate)
    return y.view(x.shape), rstd


@_fwd_op.register_fake
def _(x, weight, z, eps, group_size, norm_before_gate):
    d = x.shape[-1]
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty((math.prod(x.shape[:-1]), d // group_size), dtype=torch.float32))


@custom_op("rmsnorm_gated_bwd")
def _bwd_op(x: torch.Tensor, weight: torch.Tensor, z: torch.Tensor | None, rstd: torch.Tensor,
            dy: torch.Tensor, group_size: int, norm_before_gate: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw, dz); dz is an empty stand-in without z."""
    d = x.shape[-1]
    dx, dw, dz = _bwd(_rows(x, d), _rows(z, d) if z is not None else None, weight, rstd,
                      _rows(dy, d), group_size, norm_before_gate)
    return dx.view(x.shape), dw, (dz.view(x.shape) if dz is not None else x.new_empty(0))


@_bwd_op.register_fake
def _(x, weight, z, rstd, dy, group_size, norm_before_gate):
    dz = torch.empty_like(x, memory_format=torch.contiguous_format) if z is not None \
        else x.new_empty(0)
    return torch.empty_like(x, memory_format=torch.contiguous_format), \
        torch.empty_like(weight), dz


def _setup(ctx, inputs, output):
    x, weight, z, _, group_size, nbg = inputs
    ctx.save_for_backward(x, weight, z, output[1])
    ctx.cfg = (group_size, bool(nbg))


def _backward(ctx, dy, _drstd):
    x, weight, z, rstd = ctx.saved_tensors
    group_size, nbg = ctx.cfg
    dx, dw, dz = _bwd_op(x, weight, z, rstd, dy, group_size, nbg)
    return dx, dw, (dz if z is not None else None), None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup)


def rmsnorm_gated_op(x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=False):
    """``rmsnorm_gated_triton`` through the custom op (what ``torch.compile`` traces)."""
    gs = x.shape[-1] if group_size is None else group_size
    return _fwd_op(x, weight, z, float(eps), gs, bool(norm_before_gate))[0]


def rmsnorm_gated_triton(x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=False):
    """Gated RMSNorm on CUDA (or the interpreter), differentiable in x, weight and z; see
    ``rmsnorm_gated_ref``. Arguments are assumed checked (``rmsnorm_gated`` does it);
    group_size <= MAX_GROUP_SIZE."""
    d = x.shape[-1]
    gs = d if group_size is None else group_size
    return _RMSNormGated.apply(x, weight, z, eps, gs, norm_before_gate)
