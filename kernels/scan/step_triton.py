"""Triton one-token selective-state update (the Mamba decode step), inference only.

Same contract as ``selective_state_update_ref.py``: with dt = softplus(dt + dt_bias) (or without
softplus), for batch b, channel d, state index n,

    new_state[b, d, n] = exp(dt[b, d] A[d, n]) state[b, d, n] + dt[b, d] B[b, g(d), n] x[b, d]
    y[b, d] = sum_n C[b, g(d), n] new_state[b, d, n] + D[d] x[b, d],   y *= silu(z[b, d])

g(d) = d // (dim // ngroups) (ngroups = 1 for B, C of shape (b, n); B and C may have different
ngroups). One program owns a block
of channels of one batch row and the whole (padded) state axis, so the state is read once and
written once: the kernel moves 2 * b * d * n * 4 bytes plus the small vectors. fp32 arithmetic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._ops import compiling, custom_op
from ..backend import interpreting
from .._utils import check_selective_state_update_args

__all__ = ["selective_state_update_triton"]

_INTERPRET = interpreting()  # Triton read the same variable when it decorated the kernels


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
def _state_update_kernel(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dtb_ptr,
                         y_ptr, ns_ptr,
                         DIM, N, CH_PER_GROUP_B, CH_PER_GROUP_C,
                         s_sb, s_sd, s_sn, sxb, sxd, sdtb, sdtd, sAd, sAn,
                         sBb, sBg, sBn, sCb, sCg, sCn, szb, szd, syb, syd, snb, snd, snn,
                         HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DTB: tl.constexpr,
                         SOFTPLUS: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BD + tl.arange(0, BD)
    n = tl.arange(0, BN)
    cmask = c < DIM
    nmask = n < N
    m2 = cmask[:, None] & nmask[None, :]
    x = tl.load(x_ptr + pid_b * sxb + c * sxd, mask=cmask, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + pid_b * sdtb + c * sdtd, mask=cmask, other=0.0).to(tl.float32)
    if HAS_DTB:
        dt += tl.load(dtb_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    A = tl.load(A_ptr + c[:, None] * sAd + n[None, :] * sAn, mask=m2, other=0.0).to(tl.float32)
    gB = c // CH_PER_GROUP_B
    gC = c // CH_PER_GROUP_C
    Bv = tl.load(B_ptr + pid_b * sBb + gB[:, None] * sBg + n[None, :] * sBn, mask=m2,
                 other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + pid_b * sCb + gC[:, None] * sCg + n[None, :] * sCn, mask=m2,
                 other=0.0).to(tl.float32)
    h = tl.load(state_ptr + pid_b * s_sb + c[:, None] * s_sd + n[None, :] * s_sn, mask=m2,
                other=0.0).to(tl.float32)
    h = tl.exp(dt[:, None] * A) * h + (dt * x)[:, None] * Bv
    tl.store(ns_ptr + pid_b * snb + c[:, None] * snd + n[None, :] * snn, h, mask=m2)
    y = tl.sum(h * Cv, axis=1)
    if HAS_D:
        y += tl.load(D_ptr + c, mask=cmask, other=0.0).to(tl.float32) * x
    if HAS_Z:
        zv = tl.load(z_ptr + pid_b * szb + c * szd, mask=cmask, other=0.0).to(tl.float32)
        y = y * zv / (1.0 + tl.exp(-zv))
    tl.store(y_ptr + pid_b * syb + c * syd, y.to(y_ptr.dtype.element_ty), mask=cmask)


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _args_plain(state, x, dt, A, B, C, D, z, dt_bias) -> bool:
    """A quick validity check (the full one, slower, only names the problem when this says no)."""
    if state.dim() != 3 or x.dim() != 2 or B.dim() not in (2, 3) or C.dim() not in (2, 3):
        return False
    b, d, n = state.shape
    dev = x.device
    ok = lambda t, shape: t.dtype in _FLOATS and t.shape == shape and t.device == dev  # noqa: E731
    bc_ok = lambda t: (ok(t, (b, n)) if t.dim() == 2  # noqa: E731
                       else ok(t, (b, t.shape[1], n)) and t.shape[1] >= 1 and d % t.shape[1] == 0)
    return (ok(state, (b, d, n)) and ok(x, (b, d)) and ok(dt, (b, d)) and ok(A, (d, n))
            and bc_ok(B) and bc_ok(C) and (D is None or ok(D, (d,)))
            and (z is None or ok(z, (b, d))) and (dt_bias is None or ok(dt_bias, (d,))))


def _block_dim(n_pad: int, dim: int) -> int:
    """Channels per program: about 2048 state elements per program, at least 1 channel."""
    if _INTERPRET:
        return 16
    return max(1, min(triton.next_power_of_2(dim), 2048 // n_pad, 256))


def selective_state_update_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                                  dt_softplus=False):
    """One decode step on CUDA (or the interpreter); see ``selective_state_update_ref``.

    Returns (y (b, d) in x's dtype, new_state (b, d, n) float32); ``state`` is not modified.
    Any dstate (a program holds about 2048 state values: fewer channels for larger dstate);
    B/C (b, n) or grouped (b, g, n), B and C each with their own ngroups.
    No autograd: the outputs carry no gradient (decoding runs under ``torch.no_grad()``).
    """
    if not _args_plain(state, x, dt, A, B, C, D, z, dt_bias):
        check_selective_state_update_args("selective_state_update_triton", state, x, dt, A, B, C,
                                          D, z, dt_bias)  # raises the precise error
    if compiling():
        return _step_op(state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus))
    return _launch_step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


def _launch_step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    b, d, n = state.shape
    Bg = B if B.dim() == 3 else B.unsqueeze(1)
    Cg = C if C.dim() == 3 else C.unsqueeze(1)
    y = _alloc((b, d), dtype=x.dtype, device=x.device)
    new_state = _alloc((b, d, n), dtype=torch.float32, device=x.device)
    if b == 0 or d == 0 or n == 0:
        return y, new_state
    bn = triton.next_power_of_2(n)
    bd = _block_dim(bn, d)
    dummy = x
    grid = (b, triton.cdiv(d, bd))
    _state_update_kernel[grid](
        state, x, dt, A, Bg, Cg,
        D if D is not None else dummy, z if z is not None else dummy,
        dt_bias if dt_bias is not None else dummy, y, new_state,
        d, n, d // Bg.shape[1], d // Cg.shape[1],
        *state.stride(), *x.stride(), *dt.stride(), *A.stride(), *Bg.stride(), *Cg.stride(),
        *(z.stride() if z is not None else (0, 0)), *y.stride(), *new_state.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DTB=dt_bias is not None,
        SOFTPLUS=bool(dt_softplus), BD=bd, BN=bn, num_warps=1 if _INTERPRET else 4)
    return y, new_state


@custom_op("selective_state_update")
def _step_op(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
             B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None,
             dt_bias: torch.Tensor | None, dt_softplus: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, new_state): the decode step as the custom op ``hybridseq::selective_state_update``
    (what ``torch.compile`` traces; ``kernels._ops``)."""
    return _launch_step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


@_step_op.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    return x.new_empty(x.shape), state.new_empty(state.shape, dtype=torch.float32)
