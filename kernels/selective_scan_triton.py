"""Selective scan on Triton: ``selective_scan_triton``, an autograd.Function over the forward
kernel (selective_scan_triton_fwd.py) and the backward kernel (selective_scan_triton_bwd.py).

Contract (DESIGN.md): u, delta, z (batch, seqlen, dim), any strides; B, C (batch, seqlen, dstate)
or (batch, seqlen, ngroups, dstate) with dim % ngroups == 0; A (dim, dstate); D, delta_bias
(dim,); initial_state (batch, dim, dstate).

    dt = softplus(delta + delta_bias) (or delta + delta_bias),
    h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t   (float32, h_{-1} = initial_state or 0),
    y_t = C_t . h_t + D u_t,   y = y * silu(z) when z is given.

Returns y (u's dtype), or (y, h_last (batch, dim, dstate) float32) with ``return_final_state``.
Every tensor input gets a gradient, h_last's included. Saved for backward: the inputs and the
float32 state at the start of every BLOCK_T-step chunk, (batch, n_chunks, dim, dstate).
The cross-block reductions of the backward (gB, gC, gA, gD, g(delta_bias)) go through float32
partial buffers summed here, so results are deterministic run to run.
"""
from __future__ import annotations

import torch

from ._utils import check_selective_scan_args
from .selective_scan_triton_bwd import _scan_bwd_kernel
from .selective_scan_triton_fwd import _scan_fwd_kernel

# Block shapes. ``TUNING["fwd"|"bwd"]`` = (BLOCK_T, BLOCK_D, NO, num_warps) overrides the
# heuristic (used by the tests and by `hybridseq bench scan --sweep`); None: the heuristic.
# NO is the number of lanes that share one channel's states (each holds BLOCK_N / NO of them).
TUNING: dict = {"fwd": None, "bwd": None}
_DEFAULTS = {"fwd": (8, 32, 4, 4), "bwd": (8, 32, 4, 4)}
# Per-thread work elements (BLOCK_T * NI * channels per thread) the heuristic allows.
_THREAD_ELEMS = {"fwd": 32, "bwd": 32}
# Tests set this to fill every output with NaN before the kernels run (catches unwritten ones).
POISON_OUTPUTS = False


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def _lowbit(x: int) -> int:
    return x & -x


def _config(kind: str, seqlen: int, dim: int, nstate: int, d_per_g: int, grouped: bool):
    """(BLOCK_T, BLOCK_D, NI, NO, num_warps) for one launch; NI * NO = next_pow2(dstate)."""
    bn = _next_pow2(nstate)
    over = TUNING.get(kind)
    bt, bd, no, nw = over if over is not None else _DEFAULTS[kind]
    no = min(no, bn)
    ni = bn // no
    if over is None:  # keep BLOCK_T * NI (registers per thread) within budget for big dstate
        bt = max(1, min(bt, _THREAD_ELEMS[kind] // ni))
    bt = min(bt, _next_pow2(seqlen))
    bd = min(bd, _next_pow2(dim))
    if grouped:  # a dim block must lie inside one group of B/C
        bd = min(bd, _lowbit(d_per_g))
    return bt, bd, ni, no, nw


def _empty(shape, dtype, device):
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _bc_strides(X: torch.Tensor):
    """(s_b, s_l, s_g, s_n) of B or C, (b, l, n) taken as one group."""
    if X.dim() == 3:
        return X.stride(0), X.stride(1), 0, X.stride(2)
    return X.stride(0), X.stride(1), X.stride(2), X.stride(3)


def _fwd(u, delta, A, B, C, D, z, delta_bias, softplus, initial_state, want_hlast, want_ckpt):
    b, l, d = u.shape
    n = A.shape[1]
    g = 1 if B.dim() == 3 else B.shape[2]
    gC = 1 if C.dim() == 3 else C.shape[2]
    if gC != g:  # the kernel indexes B and C with one group id; give them the same grouping
        B, C = _expand_to(B, d), _expand_to(C, d)
        g = d
    bt, bd, ni, no, nw = _config("fwd", l, d, n, d // g, g > 1)
    n_chunks = triton_cdiv(l, bt)
    dev = u.device
    y = _empty((b, l, d), u.dtype, dev)
    hlast = _empty((b, d, n), torch.float32, dev) if want_hlast else y
    ckpt = _empty((b, n_chunks, d, n), torch.float32, dev) if want_ckpt else y
    h0 = initial_state.float().contiguous() if initial_state is not None else y
    zz = z if z is not None else u
    grid = (b, triton_cdiv(d, bd))
    _scan_fwd_kernel[grid](
        u, delta, A, B, C, D if D is not None else u, zz,
        delta_bias if delta_bias is not None else u, h0,
        y, hlast, ckpt,
        l, d, n, d // g, n_chunks,
        *u.stride(), *delta.stride(), *zz.stride(), *_bc_strides(B), *_bc_strides(C),
        *y.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(softplus), HAS_H0=initial_state is not None, STORE_HLAST=want_hlast,
        STORE_CKPT=want_ckpt,
        BLOCK_T=bt, BLOCK_D=bd, NI=ni, NO=no, num_warps=nw,
    )
    return y, (hlast if want_hlast else None), (ckpt if want_ckpt else None), bt


def _expand_to(X, d):
    """B or C as (b, l, d, n): one group per channel (used only when B and C group differently)."""
    if X.dim() == 3:
        return X.unsqueeze(2).expand(-1, -1, d, -1)
    return X.repeat_interleave(d // X.shape[2], dim=2)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _reduce_bc(part, X, d, n_dblocks, bd, g_kernel):
    """Sum the (n_dblocks, b, l, n) float32 partials into X's shape and dtype."""
    if X.dim() == 3:
        return part.sum(0).to(X.dtype)
    g = X.shape[2]
    if g_kernel != g:  # B/C were expanded to one group per channel for the kernel
        raise AssertionError("unreachable: grouped partials are reduced per kernel group")
    per_group = (d // g) // bd  # whole dim blocks per group
    b, l, n = part.shape[1:]
    out = part.view(g, per_group, b, l, n).sum(1)  # (g, b, l, n)
    return out.permute(1, 2, 0, 3).to(X.dtype)


def _bwd(ctx_tensors, softplus, has_h0, dout, dhlast, bt_fwd):
    u, delta, A, B, C, D, z, delta_bias, ckpt = ctx_tensors
    b, l, d = u.shape
    n = A.shape[1]
    gB_ = 1 if B.dim() == 3 else B.shape[2]
    gC_ = 1 if C.dim() == 3 else C.shape[2]
    Bk, Ck, g = B, C, gB_
    if gC_ != gB_:
        Bk, Ck, g = _expand_to(B, d), _expand_to(C, d), d
    bt, bd, ni, no, nw = _config("bwd", l, d, n, d // g, g > 1)
    bt = bt_fwd  # the chunk-start states were saved every bt_fwd steps
    dev = u.device
    n_chunks = ckpt.shape[1]
    n_dblocks = triton_cdiv(d, bd)
    du = _empty((b, l, d), u.dtype, dev)
    ddelta = _empty((b, l, d), delta.dtype, dev)
    dz = _empty((b, l, d), z.dtype, dev) if z is not None else du
    dBp = _empty((n_dblocks, b, l, n), torch.float32, dev)
    dCp = _empty((n_dblocks, b, l, n), torch.float32, dev)
    dAp = _empty((b, d, n), torch.float32, dev)
    dDp = _empty((b, d), torch.float32, dev) if D is not None else dAp
    dbp = _empty((b, d), torch.float32, dev) if delta_bias is not None else dAp
    dh0 = _empty((b, d, n), torch.float32, dev) if has_h0 else dAp
    dout = dout if dout.dtype.is_floating_point else dout.float()
    zz = z if z is not None else u
    grid = (b, n_dblocks)
    _scan_bwd_kernel[grid](
        u, delta, A, Bk, Ck, D if D is not None else u, zz,
        delta_bias if delta_bias is not None else u, ckpt, dout,
        dhlast.float().contiguous() if dhlast is not None else dAp,
        du, ddelta, dz, dBp, dCp, dAp, dDp, dbp, dh0,
        l, d, n, d // g, n_chunks,
        *u.stride(), *delta.stride(), *zz.stride(), *_bc_strides(Bk), *_bc_strides(Ck),
        *dout.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(softplus), HAS_DHLAST=dhlast is not None, STORE_DH0=has_h0,
        BLOCK_T=bt, BLOCK_D=bd, NI=ni, NO=no, num_warps=nw,
    )
    if Bk is B:
        dB = _reduce_bc(dBp, B, d, n_dblocks, bd, g)
        dC = _reduce_bc(dCp, C, d, n_dblocks, bd, g)
    else:  # per-channel partials of expanded B/C: sum each original group's channels
        dB = _reduce_expanded(dBp, B, d, bd)
        dC = _reduce_expanded(dCp, C, d, bd)
    dA = dAp.sum(0).to(A.dtype)
    dD = dDp.sum(0).to(D.dtype) if D is not None else None
    dbias = dbp.sum(0).to(delta_bias.dtype) if delta_bias is not None else None
    return du, ddelta, dA, dB, dC, dD, (dz if z is not None else None), dbias, \
        (dh0 if has_h0 else None)


def _reduce_expanded(part, X, d, bd):
    """Partials of a per-channel-expanded B/C (bd == 1 there): sum into X's groups."""
    b, l, n = part.shape[1:]
    per_chan = part.view(d, b, l, n)  # bd == 1: one dim block per channel
    if X.dim() == 3:
        return per_chan.sum(0).to(X.dtype)
    g = X.shape[2]
    return per_chan.view(g, d // g, b, l, n).sum(1).permute(1, 2, 0, 3).to(X.dtype)


class _SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                return_final_state):
        need_grad = any(ctx.needs_input_grad)
        A = A.contiguous()
        D = D.contiguous() if D is not None else None
        delta_bias = delta_bias.contiguous() if delta_bias is not None else None
        y, hlast, ckpt, bt = _fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                  initial_state, return_final_state, need_grad)
        if need_grad:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt)
            ctx.softplus = bool(delta_softplus)
            ctx.has_h0 = initial_state is not None
            ctx.h0_dtype = initial_state.dtype if initial_state is not None else None
            ctx.bt = bt
        if return_final_state:
            return y, hlast
        return y

    @staticmethod
    def backward(ctx, dy, dhlast=None):
        saved = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(saved[0])
        du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = _bwd(
            saved, ctx.softplus, ctx.has_h0, dy, dhlast, ctx.bt)
        if dh0 is not None:
            dh0 = dh0.to(ctx.h0_dtype)
        return du, ddelta, dA, dB, dC, dD, dz, dbias, None, dh0, None


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                          delta_softplus=False, initial_state=None, return_final_state=False):
    """Selective scan on Triton (module docstring: contract, outputs, what backward saves)."""
    dims = check_selective_scan_args("selective_scan_triton", u, delta, A, B, C, D, z,
                                     delta_bias, initial_state)
    if dims.seqlen == 0:  # nothing to scan: y is empty and the state passes through
        y = u.new_zeros(u.shape) + 0 * delta.sum()
        if not return_final_state:
            return y
        h = (initial_state.float() if initial_state is not None
             else torch.zeros(dims.batch, dims.dim, dims.dstate, device=u.device))
        return y, h
    return _SelectiveScanTriton.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                      initial_state, return_final_state)
