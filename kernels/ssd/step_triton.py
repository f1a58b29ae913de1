"""Triton one-token SSD state update (the Mamba-2 decode step), inference only.

Same contract as ``step_ref.py``: with dt = softplus(dt + dt_bias) (or without softplus), clamped
to dt_limit, for batch b, head h, group g(h) = h // (nheads // ngroups), headdim index i and
state index n,

    state[b, h, i, n] <- exp(dt[b, h] A[h]) state[b, h, i, n] + dt[b, h] x[b, h, i] B[b, g(h), n]
    y[b, h, i] = sum_n state[b, h, i, n] C[b, g(h), n] + D x[b, h, i],   y *= silu(z[b, h, i])

One program owns one (batch, head) and a block of BP headdim rows of its state with the whole
(padded) state axis, so each state element is read once and written once, in place: a program
writes only the rows it read, so no two programs touch the same element. The decay is one scalar
per program. fp32 arithmetic; the state keeps its dtype (float32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._launch import launch
from .._ops import compiling, custom_op
from .._utils import check_ssd_state_update_args
from ..backend import interpreting

__all__ = ["run_ssd_state_update_triton", "ssd_state_update_triton"]

_INTERPRET = interpreting()  # Triton read the same variable when it decorated the kernel


def _alloc(shape, dtype, device):
    """Uninitialised output buffer (tests replace this to poison outputs with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _softplus(v):
    """log(1 + exp(v)), accurate for all v: max(v, 0) + log1p(exp(-|v|)), with log1p(u)
    computed as log(w) * u / (w - 1), w = 1 + u (exact where w rounds to 1)."""
    u = tl.exp(-tl.abs(v))
    w = 1.0 + u
    one = w == 1.0
    l1p = tl.where(one, u, tl.log(w) * u / tl.where(one, 1.0, w - 1.0))
    return tl.maximum(v, 0.0) + l1p


@triton.jit
def _ssd_step_kernel(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dtb_ptr, y_ptr,
                     P, N, HEADS_PER_GROUP, dt_lo, dt_hi,
                     s_sb, s_sh, s_sp, s_sn, sxb, sxh, sxp, sdtb, sdth, sA,
                     sBb, sBg, sBn, sCb, sCg, sCn, sDh, sDp, szb, szh, szp, sdtbias,
                     syb, syh, syp,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DTB: tl.constexpr,
                     SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
                     BP: tl.constexpr, BN: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1).to(tl.int64)
    i = tl.program_id(2) * BP + tl.arange(0, BP)
    n = tl.arange(0, BN)
    imask = i < P
    nmask = n < N
    m2 = imask[:, None] & nmask[None, :]
    grp = pid_h // HEADS_PER_GROUP

    dt = tl.load(dt_ptr + pid_b * sdtb + pid_h * sdth).to(tl.float32)
    if HAS_DTB:
        dt += tl.load(dtb_ptr + pid_h * sdtbias).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    if HAS_LIMIT:
        dt = tl.minimum(tl.maximum(dt, dt_lo), dt_hi)
    dA = tl.exp(dt * tl.load(A_ptr + pid_h * sA).to(tl.float32))

    x = tl.load(x_ptr + pid_b * sxb + pid_h * sxh + i * sxp, mask=imask, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + pid_b * sBb + grp * sBg + n * sBn, mask=nmask, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + pid_b * sCb + grp * sCg + n * sCn, mask=nmask, other=0.0).to(tl.float32)
    s_ptrs = state_ptr + pid_b * s_sb + pid_h * s_sh + i[:, None] * s_sp + n[None, :] * s_sn
    s = tl.load(s_ptrs, mask=m2, other=0.0).to(tl.float32)
    s = dA * s + (dt * x)[:, None] * Bv[None, :]
    tl.store(s_ptrs, s.to(state_ptr.dtype.element_ty), mask=m2)

    y = tl.sum(s * Cv[None, :], axis=1)
    if HAS_D:
        y += tl.load(D_ptr + pid_h * sDh + i * sDp, mask=imask, other=0.0).to(tl.float32) * x
    if HAS_Z:
        zv = tl.load(z_ptr + pid_b * szb + pid_h * szh + i * szp, mask=imask,
                     other=0.0).to(tl.float32)
        y = y * zv * tl.sigmoid(zv)
    tl.store(y_ptr + pid_b * syb + pid_h * syh + i * syp, y.to(y_ptr.dtype.element_ty), mask=imask)


def _block_p(bn: int, p: int) -> int:
    """Headdim rows per program: about 2048 state elements per program, at least one row."""
    return max(1, min(triton.next_power_of_2(p), 2048 // bn))


def run_ssd_state_update_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                                dt_softplus=False, dt_limit=None):
    """``ssd_state_update_triton`` without the argument checks (the caller made them). Under
    ``torch.compile``: the custom op ``hybridseq::ssd_state_update`` (it mutates ``state``)."""
    if compiling():
        lo, hi = (float(dt_limit[0]), float(dt_limit[1])) if dt_limit is not None else (0.0, 0.0)
        return _step_op(state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus),
                        dt_limit is not None, lo, hi)
    return _launch_step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit)


def _launch_step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit):
    b, h, p, n = state.shape
    g = B.shape[1]
    y = _alloc((b, h, p), dtype=x.dtype, device=x.device)
    if b == 0 or h == 0 or p == 0:
        return y
    bn = triton.next_power_of_2(n)
    bp = _block_p(bn, p)
    dummy = x
    Ds = ((D.stride(0), D.stride(1)) if D.dim() == 2 else (D.stride(0), 0)) if D is not None \
        else (0, 0)
    lo, hi = (float(dt_limit[0]), float(dt_limit[1])) if dt_limit is not None else (0.0, 0.0)
    args = (state, x, dt, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
            dt_bias if dt_bias is not None else dummy, y,
            p, n, h // g, lo, hi,
            *state.stride(), *x.stride(), *dt.stride(), A.stride(0), *B.stride(), *C.stride(),
            *Ds, *(z.stride() if z is not None else (0, 0, 0)),
            dt_bias.stride(0) if dt_bias is not None else 0, *y.stride())
    consts = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_DTB=dt_bias is not None,
                  SOFTPLUS=bool(dt_softplus), HAS_LIMIT=dt_limit is not None, BP=bp, BN=bn)
    launch(_ssd_step_kernel, (b, h, triton.cdiv(p, bp)), args, consts,
           num_warps=1 if _INTERPRET else 4)
    return y


@custom_op("ssd_state_update", mutates_args=("state",))
def _step_op(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
             B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None,
             dt_bias: torch.Tensor | None, dt_softplus: bool, has_limit: bool, lo: float,
             hi: float) -> torch.Tensor:
    """y (b, h, p); ``state`` updated in place (``kernels._ops``)."""
    return _launch_step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus,
                        (lo, hi) if has_limit else None)


@_step_op.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, has_limit, lo, hi):
    return x.new_empty(tuple(state.shape[:3]))


def ssd_state_update_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                            dt_softplus=False, dt_limit=None):
    """One decode step on CUDA (or the interpreter); see ``ssd_state_update_ref``. Updates
    ``state`` (b, h, p, n) in place and returns y (b, h, p) in x's dtype. Any strides (x, z, B, C
    may be slices of a wider projection). No autograd (decoding runs under ``torch.no_grad()``)."""
    check_ssd_state_update_args("ssd_state_update_triton", state, x, dt, A, B, C, D, z, dt_bias,
                                dt_limit)
    return run_ssd_state_update_triton(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias,
                                       dt_softplus=dt_softplus, dt_limit=dt_limit)
