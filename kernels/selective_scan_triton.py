"""Selective scan on Triton: ``selective_scan_triton``, an autograd.Function over the forward
kernel (selective_scan_triton_fwd.py) and the backward kernel (selective_scan_triton_bwd.py).

Contract (DESIGN.md): u, delta, z (batch, seqlen, dim), any strides; B, C (batch, seqlen, dstate)
or (batch, seqlen, ngroups, dstate) with dim % ngroups == 0; A (dim, dstate); D, delta_bias
(dim,); initial_state (batch, dim, dstate).

    dt = softplus(delta + delta_bias) (or delta + delta_bias),
    h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t   (float32, h_{-1} = initial_state or 0),
    y_t = C_t . h_t + D u_t,   y = y * silu(z) when z is given.

Returns y (u's dtype), or (y, h_last (batch, dim, dstate) float32) with ``return_final_state``.
Every tensor input gets a gradient, h_last's included.

Saved for backward (only when a gradient is wanted): the inputs, y before the silu(z) gate
(batch, seqlen, dim) in u's dtype, and the float32 state every CK steps, (batch, seqlen / CK,
dim, dstate), with CK chosen by ``_plan`` so that this is at most about 4 floats per (b, l, d)
element: O(batch * seqlen * dim), never (b, l, d, n).

The cross-block reductions of the backward (gB, gC over dim blocks; gA, gD, g(delta_bias) over
the batch) go through float32 partial buffers summed here, so results are deterministic run to
run. Only where the gB / gC partials would outgrow about twice the (b, l, d) float32 activations
(dstate > 16 with narrow dim blocks) do gB / gC use float32 atomics instead (not bit-for-bit
reproducible).
"""
from __future__ import annotations

import torch

from ._utils import check_selective_scan_args
from .selective_scan_triton_bwd import _scan_bwd_kernel
from .selective_scan_triton_fwd import _scan_fwd_kernel

# Block shapes. ``TUNING["fwd"|"bwd"]`` = (BLOCK_T, BLOCK_D, NO, num_warps) overrides the
# heuristic (used by the tests and by `hybridseq bench scan --sweep`); None: the heuristic.
# NO is the number of lanes that share one channel's states (each holds BLOCK_N / NO of them).
# ``TUNING["ckpt"]`` overrides the checkpoint spacing target (steps, see _plan).
TUNING: dict = {"fwd": None, "bwd": None, "ckpt": None}
# Defaults: the fastest in the H100 sweeps of 2026-11-22 at B8 D2048 L2048 N16 bf16
_DEFAULTS = {"fwd": (4, 8, 4, 1), "bwd": (4, 16, 4, 1)}
# Checkpoint spacing (see _plan): at most _CKPT_FLOATS saved state floats per (b, l, d)
# element where _MAX_SUBCHUNKS backward chunks per checkpoint allow it.
_CKPT_FLOATS = 4
_MAX_SUBCHUNKS = 16
# gB / gC go through per-dim-block partials while n_dblocks * dstate <= this * dim.
_PARTIAL_LIMIT = 2
# Per-thread work elements (BLOCK_T * NI * channels per thread) the heuristic allows.
_THREAD_ELEMS = {"fwd": 32, "bwd": 32}
# Tests set this to fill every output with NaN before the kernels run (catches unwritten ones).
POISON_OUTPUTS = False


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def _lowbit(x: int) -> int:
    return x & -x


def _config(kind: str, seqlen: int, dim: int, nstate: int, dpg_b: int, dpg_c: int):
    """(BLOCK_T, BLOCK_D, NI, NO, num_warps) for one launch; NI * NO = next_pow2(dstate).
    dpg_b / dpg_c: channels per group of B / C (dim when ungrouped); a dim block must lie
    inside one group of each."""
    bn = _next_pow2(nstate)
    over = TUNING.get(kind)
    bt, bd, no, nw = over if over is not None else _DEFAULTS[kind]
    if over is None and bn > 16:  # big dstate: more lanes on the state, NI = 4 per thread
        no = min(32, bn // 4)
        bd = min(bd, max(1, 32 // no) * nw)
    no = min(no, bn)
    ni = bn // no
    if over is None:  # keep BLOCK_T * NI (registers per thread) within budget for big dstate
        bt = max(1, min(bt, _THREAD_ELEMS[kind] // ni))
    bt = min(bt, _next_pow2(seqlen))
    bd = min(bd, _next_pow2(dim))
    for dpg in (dpg_b, dpg_c):
        if dpg != dim:
            bd = min(bd, _lowbit(dpg))
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


def _groups(X, d):
    """Channels per group of B or C: dim for (b, l, n), dim // g for (b, l, g, n)."""
    return d if X.dim() == 3 else d // X.shape[2]


def _plan(l, d, n, dpg_b, dpg_c, for_grad=True):
    """Launch plan shared by forward and backward: both configs and the checkpoint spacing CK.

    With gradients the forward saves the state every CK steps (a segment): b * l * d * n / CK
    floats. CK = R * (backward BLOCK_T) with R the smallest count (at most _MAX_SUBCHUNKS) that
    keeps this within _CKPT_FLOATS floats per (b, l, d) element, so the saved states stay
    O(b * l * d) for any dstate. With R > 1 the backward recomputes the states at its chunk
    starts from each segment's checkpoint (one extra forward pass, a small scratch buffer;
    measured slower on the H100), so dstate <= 16 gets R = 1. The forward chunk is cut to CK
    when it is longer."""
    fwd = _config("fwd", l, d, n, dpg_b, dpg_c)
    bwd = _config("bwd", l, d, n, dpg_b, dpg_c)
    tb = bwd[0]
    if TUNING.get("ckpt"):
        r = max(1, TUNING["ckpt"] // tb)
    else:
        r = -(-_next_pow2(n) // (_CKPT_FLOATS * tb))
    ck = tb * min(_MAX_SUBCHUNKS, _next_pow2(r))
    if for_grad and fwd[0] > ck:
        fwd = (ck,) + tuple(fwd[1:])
    ck = max(ck, fwd[0])
    return fwd, bwd, ck


def _fwd(u, delta, A, B, C, D, z, delta_bias, softplus, initial_state, want_hlast, want_ckpt):
    b, l, d = u.shape
    n = A.shape[1]
    dpg_b, dpg_c = _groups(B, d), _groups(C, d)
    (bt, bd, ni, no, nw), _, ck = _plan(l, d, n, dpg_b, dpg_c, for_grad=want_ckpt)
    n_chunks = triton_cdiv(l, bt)
    n_seg = triton_cdiv(l, ck)
    dev = u.device
    y = _empty((b, l, d), u.dtype, dev)
    hlast = _empty((b, d, n), torch.float32, dev) if want_hlast else y
    ckpt = _empty((b, n_seg, d, n), torch.float32, dev) if want_ckpt else y
    # y before the silu(z) gate, for the gradient of z (saves recomputing C . h backward)
    ypre = _empty((b, l, d), u.dtype, dev) if (want_ckpt and z is not None) else y
    h0 = initial_state.float().contiguous() if initial_state is not None else y
    zz = z if z is not None else u
    grid = (b, triton_cdiv(d, bd))
    _scan_fwd_kernel[grid](
        u, delta, A, B, C, D if D is not None else u, zz,
        delta_bias if delta_bias is not None else u, h0,
        y, hlast, ckpt, ypre,
        l, d, n, dpg_b, dpg_c, n_chunks, n_seg,
        *u.stride(), *delta.stride(), *zz.stride(), *_bc_strides(B), *_bc_strides(C),
        *y.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(softplus), HAS_H0=initial_state is not None, STORE_HLAST=want_hlast,
        STORE_CKPT=want_ckpt, CK_R=ck // bt, STORE_YPRE=want_ckpt and z is not None,
        BLOCK_T=bt, BLOCK_D=bd, NI=ni, NO=no, num_warps=nw,
    )
    return (y, (hlast if want_hlast else None), (ckpt if want_ckpt else None),
            (ypre if want_ckpt and z is not None else None))


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _reduce_bc(part, X, d, bd, atomic):
    """The gradient of B or C ((b, l, n) or (b, l, g, n), X's dtype) from the kernel's float32
    buffer: (b, l, g, n) atomics, or (n_dblocks, b, l, n) partials, one per dim block (a
    block lies inside one group: sum each group's blocks)."""
    if atomic:
        out = part
    else:
        b, l, n = part.shape[1:]
        g = 1 if X.dim() == 3 else X.shape[2]
        if g == 1:
            out = part.sum(0)
        else:  # bd divides the group width d // g
            out = part.view(g, (d // g) // bd, b, l, n).sum(1).permute(1, 2, 0, 3)
    return out.reshape(X.shape).to(X.dtype)


def _bwd(saved, softplus, has_h0, dout, dhlast):
    u, delta, A, B, C, D, z, delta_bias, ckpt, ypre = saved
    b, l, d = u.shape
    n = A.shape[1]
    dpg_b, dpg_c = _groups(B, d), _groups(C, d)
    _, (bt, bd, ni, no, nw), ck = _plan(l, d, n, dpg_b, dpg_c)
    n_chunks = triton_cdiv(l, bt)
    dev = u.device
    n_dblocks = triton_cdiv(d, bd)
    du = _empty((b, l, d), u.dtype, dev)
    ddelta = _empty((b, l, d), delta.dtype, dev)
    dz = _empty((b, l, d), z.dtype, dev) if z is not None else du
    # gB / gC: deterministic per-dim-block partials unless they would outgrow about twice the
    # (b, l, d) float32 activations (big dstate, narrow blocks); then float32 atomics
    atomic = n_dblocks * n > _PARTIAL_LIMIT * d
    if atomic:
        dBp = torch.zeros((b, l, d // dpg_b, n), dtype=torch.float32, device=dev)
        dCp = torch.zeros((b, l, d // dpg_c, n), dtype=torch.float32, device=dev)
    else:
        dBp = _empty((n_dblocks, b, l, n), torch.float32, dev)
        dCp = _empty((n_dblocks, b, l, n), torch.float32, dev)
    dAp = _empty((b, d, n), torch.float32, dev)
    dDp = _empty((b, d), torch.float32, dev) if D is not None else dAp
    dbp = _empty((b, d), torch.float32, dev) if delta_bias is not None else dAp
    dh0 = _empty((b, d, n), torch.float32, dev) if has_h0 else dAp
    # per program: the states at the sub-chunk starts of one checkpoint segment (CK_R > 1)
    scratch = (torch.empty((b, n_dblocks, ck // bt, bd * ni * no), dtype=torch.float32,
                           device=dev) if ck > bt else dAp)
    zz = z if z is not None else u
    _scan_bwd_kernel[(b, n_dblocks)](
        u, delta, A, B, C, D if D is not None else u, zz,
        delta_bias if delta_bias is not None else u, ckpt, dout,
        dhlast.float().contiguous() if dhlast is not None else dAp,
        ypre if ypre is not None else du,
        du, ddelta, dz, dBp, dCp, dAp, dDp, dbp, dh0, scratch,
        l, d, n, dpg_b, dpg_c, n_chunks, ckpt.shape[1],
        *u.stride(), *delta.stride(), *zz.stride(), *_bc_strides(B), *_bc_strides(C),
        *dout.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(softplus), HAS_DHLAST=dhlast is not None, STORE_DH0=has_h0,
        BLOCK_T=bt, BLOCK_D=bd, NI=ni, NO=no, num_warps=nw, CK_R=ck // bt, BC_ATOMIC=atomic,
    )
    dB = _reduce_bc(dBp, B, d, bd, atomic)
    dC = _reduce_bc(dCp, C, d, bd, atomic)
    dA = dAp.sum(0).to(A.dtype)
    dD = dDp.sum(0).to(D.dtype) if D is not None else None
    dbias = dbp.sum(0).to(delta_bias.dtype) if delta_bias is not None else None
    return du, ddelta, dA, dB, dC, dD, (dz if z is not None else None), dbias, \
        (dh0 if has_h0 else None)


class _SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                return_final_state, need_grad):
        A = A.contiguous()
        D = D.contiguous() if D is not None else None
        delta_bias = delta_bias.contiguous() if delta_bias is not None else None
        y, hlast, ckpt, ypre = _fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                    initial_state, return_final_state, need_grad)
        if need_grad:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt, ypre)
            ctx.softplus = bool(delta_softplus)
            ctx.has_h0 = initial_state is not None
            ctx.h0_dtype = initial_state.dtype if initial_state is not None else None
        if return_final_state:
            return y, hlast
        return y

    @staticmethod
    def backward(ctx, dy, dhlast=None):
        saved = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(saved[0])
        du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = _bwd(
            saved, ctx.softplus, ctx.has_h0, dy.contiguous() if dy.stride(-1) != 1 else dy, dhlast)
        if dh0 is not None:
            dh0 = dh0.to(ctx.h0_dtype)
        return du, ddelta, dA, dB, dC, dD, dz, dbias, None, dh0, None, None


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
    # ctx.needs_input_grad is True under torch.no_grad() too: decide here whether the
    # forward must save its checkpoints for a backward
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (u, delta, A, B, C, D, z, delta_bias, initial_state))
    return _SelectiveScanTriton.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                      initial_state, return_final_state, need_grad)
