"""Triton kernels of the SSD state passing: the forward state scan and the backward adjoint scan.

Forward (``_ssd_state_fwd_kernel``). Per head the state h is a (headdim, dstate) matrix with

    h_t = exp(a_t) h_{t-1} + dt_t x_t B_t^T,        a_t = dt_t A  (one scalar per head and step).

One program owns one (batch, head) and a (BLOCK_P, BLOCK_N) block of h in float32 registers (the
entries of h are independent of each other: the recurrence is elementwise in (p, n), so P and N
split freely across programs) and walks the sequence in sub-blocks of BLOCK_L steps. Unrolled
over a sub-block [k0, k1) the recurrence is

    h_{k1-1} = exp(cs_e - cs_b) h_{k0-1} + sum_s exp(cs_e - cs_s) dt_s x_s B_s^T

with cs the cumulative sum of a (cs_b before the sub-block, cs_e at its end): the sum is one
tensor-core product (x * w)^T B, (BLOCK_P x BLOCK_L) @ (BLOCK_L x BLOCK_N), with weights
w_s = exp(cs_e - cs_s) dt_s, every exp argument <= 0. The sub-blocks run in order, so the
chunked algorithm's "chunk state" and "state passing" steps are one pass here: the state never
goes through device memory between them, and no (batch, chunk, head, p, n) buffer of chunk-local
states is written and read back.

Chunks (CHUNK steps, a multiple of BLOCK_L) matter only for what is stored: the state entering
each chunk, ``hin`` (batch, n_chunks + 1, nheads, headdim, dstate) float32 (slot n_chunks: the
state after the last chunk), which the chunk-scan kernel reads (y's inter-chunk term) and the
backward reads; the final state again in ``hlast`` (batch, nheads, headdim, dstate) float32,
the tensor returned to the caller. The (p, n) block-(0, 0) program also stores the effective dt
and the chunk-local cumulative sum cs (each (batch, nheads, n_chunks * CHUNK) float32) that the
other kernels read.

Documents (seq_idx): the state after a sub-block belongs to the document of its last step, d_e.
Only steps of d_e enter the sub-block's sum; the incoming state carries over only if it belongs
to d_e too (the step before the sub-block is in d_e; for the first sub-block the incoming state
is initial_state, which belongs to the first document). With non-decreasing seq_idx this is the
reference's "reset to 0 where seq_idx changes".

Backward (``_ssd_state_bwd_kernel``): the same walk in reverse for the adjoint lambda = dL/dh of
the state handed from one sub-block to the next. With g_t = dy_t * silu(z_t) the gradient
reaching y_t = h_t C_t, the adjoint of the state before sub-block [k0, k1) is

    lambda_{k0-1} = exp(cs_e - cs_b) lambda_{k1-1} + sum_t exp(cs_t - cs_b) g_t^T C_t

(tokens t of the document of step k0 - 1 only; the carry only within one document), again one
tensor-core product per sub-block. Where a chunk ends, lambda (the gradient of the state leaving
that chunk, from every later step and from h_last) is stored in ``dhout`` (batch, n_chunks,
nheads, headdim, dstate) float32 for the chunk kernels of the backward; after the first step it
is the gradient of initial_state.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import _dot, _dt_eff, _gate_grad_in, _seq_at, _seq_vec


@triton.jit
def _pn_store(ptr, val, offs_p, offs_n, P, N):
    """Store a (BLOCK_P, BLOCK_N) block into a (P, N) row-major matrix at ptr. The offsets and
    the mask are formed here, at the store: computed once before the walk they would stay live
    through it as tile-sized registers."""
    tl.store(ptr + offs_p[:, None] * N + offs_n[None, :], val,
             mask=(offs_p[:, None] < P) & (offs_n[None, :] < N))


@triton.jit
def _pn_load(ptr, offs_p, offs_n, P, N):
    return tl.load(ptr + offs_p[:, None] * N + offs_n[None, :],
                   mask=(offs_p[:, None] < P) & (offs_n[None, :] < N), other=0.0).to(tl.float32)


@triton.jit
def _ssd_state_fwd_kernel(
    x_ptr, dt_ptr, A_ptr, bias_ptr, B_ptr, seq_ptr, h0_ptr,
    dtp_ptr, cs_ptr, hin_ptr, hlast_ptr,
    L, H, P, N, NC, LP, HPG, lo, hi,
    s_x_b, s_x_l, s_x_h, s_x_p,
    s_dt_b, s_dt_l, s_dt_h,
    s_B_b, s_B_l, s_B_g, s_B_n,
    s_seq_b, s_seq_l,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
    HAS_SEQ: tl.constexpr, HAS_H0: tl.constexpr, DOT: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_p = tl.program_id(1)
    pid_n = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    grp = h // HPG
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)
    bh_state = (b * H + h) * P * N  # (b, h) in a (batch, nheads, P, N) array

    A_h = tl.load(A_ptr + h).to(tl.float32)
    bias_h = 0.0
    if HAS_BIAS:
        bias_h = tl.load(bias_ptr + h).to(tl.float32)
    if HAS_H0:
        state = _pn_load(h0_ptr + bh_state, offs_p, offs_n, P, N)
    else:
        state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    # the state entering chunk 0
    _pn_store(hin_ptr + (b * (NC + 1) * H + h) * P * N, state, offs_p, offs_n, P, N)
    write_cs = (pid_p == 0) & (pid_n == 0)

    x_base = x_ptr + b * s_x_b + h * s_x_h
    dt_base = dt_ptr + b * s_dt_b + h * s_dt_h
    B_base = B_ptr + b * s_B_b + grp * s_B_g
    seq_base = seq_ptr + b * s_seq_b
    row_base = (b * H + h) * LP  # (b, h) in a (batch, nheads, LP) array

    seq_prev = _seq_at(seq_base, 0, HAS_SEQ)  # document of the incoming state
    cs_pre = tl.full((), 0.0, tl.float32)  # chunk-local cumulative sum of a before the sub-block
    for k in tl.range(0, (L + BLOCK_L - 1) // BLOCK_L, disable_licm=True):
        t0 = k * BLOCK_L
        offs_t = t0 + offs_l
        mt = offs_t < L
        t1 = tl.minimum(t0 + BLOCK_L, L)
        cs_pre = tl.where(t0 % CHUNK == 0, 0.0, cs_pre)
        dtr = tl.load(dt_base + offs_t * s_dt_l, mask=mt, other=0.0)
        dtv = _dt_eff(dtr, bias_h, mt, lo, hi, HAS_BIAS, SOFTPLUS, HAS_LIMIT)
        a = dtv * A_h
        cs = cs_pre + tl.cumsum(a, axis=0)
        cs_end = cs_pre + tl.sum(a, axis=0)
        if write_cs:
            tl.store(dtp_ptr + row_base + offs_t, dtv, mask=mt)
            tl.store(cs_ptr + row_base + offs_t, cs, mask=mt)
        doc_end = _seq_at(seq_base, (t1 - 1) * s_seq_l, HAS_SEQ)
        seq_t = _seq_vec(seq_base, offs_t * s_seq_l, mt, HAS_SEQ)
        # w_s = exp(cs_end - cs_s) dt_s for the steps of the document the sub-block ends in
        keep = mt & (seq_t == doc_end)
        w = tl.exp(tl.where(keep, cs_end - cs, float("-inf"))) * dtv
        xt = tl.load(x_base + offs_t[:, None] * s_x_l + offs_p[None, :] * s_x_p,
                     mask=mt[:, None] & (offs_p[None, :] < P), other=0.0)
        Bt = tl.load(B_base + offs_t[:, None] * s_B_l + offs_n[None, :] * s_B_n,
                     mask=mt[:, None] & (offs_n[None, :] < N), other=0.0)
        xw = xt.to(tl.float32) * w[:, None]
        carry = tl.where(seq_prev == doc_end, tl.exp(cs_end - cs_pre), 0.0)
        state = carry * state + _dot(tl.trans(xw), Bt, DOT)
        seq_prev = doc_end
        cs_pre = cs_end
        # chunk end: the state entering the next chunk (slot NC: the final state)
        if (t1 >= L) | (t1 % CHUNK == 0):
            c_next = ((t1 - 1) // CHUNK + 1).to(tl.int64)
            _pn_store(hin_ptr + ((b * (NC + 1) + c_next) * H + h) * P * N, state, offs_p, offs_n,
                      P, N)
            if t1 >= L:
                _pn_store(hlast_ptr + bh_state, state, offs_p, offs_n, P, N)


@triton.jit
def _ssd_state_bwd_kernel(
    dy_ptr, z_ptr, C_ptr, seq_ptr, dtp_ptr, cs_ptr, dhlast_ptr,
    dhout_ptr, dh0_ptr,
    L, H, P, N, NC, LP, HPG,
    s_dy_b, s_dy_l, s_dy_h, s_dy_p,
    s_z_b, s_z_l, s_z_h, s_z_p,
    s_C_b, s_C_l, s_C_g, s_C_n,
    s_seq_b, s_seq_l,
    HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_DHLAST: tl.constexpr,
    STORE_DH0: tl.constexpr, DOT: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_p = tl.program_id(1)
    pid_n = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    grp = h // HPG
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)
    mask_p = offs_p < P
    bh_state = (b * H + h) * P * N

    if HAS_DHLAST:
        lam = _pn_load(dhlast_ptr + bh_state, offs_p, offs_n, P, N)
    else:
        lam = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)

    dy_base = dy_ptr + b * s_dy_b + h * s_dy_h
    z_base = z_ptr + b * s_z_b + h * s_z_h
    C_base = C_ptr + b * s_C_b + grp * s_C_g
    seq_base = seq_ptr + b * s_seq_b
    row_base = (b * H + h) * LP
    n_blk = (L + BLOCK_L - 1) // BLOCK_L
    for kk in tl.range(0, n_blk, disable_licm=True):
        k = n_blk - 1 - kk
        t0 = k * BLOCK_L
        offs_t = t0 + offs_l
        mt = offs_t < L
        t1 = tl.minimum(t0 + BLOCK_L, L)
        # the last sub-block of a chunk: lambda is the gradient of the state leaving the chunk
        if (t1 >= L) | (t1 % CHUNK == 0):
            c = (t0 // CHUNK).to(tl.int64)
            _pn_store(dhout_ptr + ((b * NC + c) * H + h) * P * N, lam, offs_p, offs_n, P, N)
        cs = tl.load(cs_ptr + row_base + offs_t, mask=mt, other=0.0)
        cs_end = tl.load(cs_ptr + row_base + t1 - 1)
        # cs before the sub-block (chunk-local: 0 at a chunk start)
        cs_pre = tl.load(cs_ptr + row_base + tl.maximum(t0 - 1, 0))
        cs_pre = tl.where(t0 % CHUNK == 0, 0.0, cs_pre)
        seq_pre = _seq_at(seq_base, tl.maximum(t0 - 1, 0) * s_seq_l, HAS_SEQ)
        doc_end = _seq_at(seq_base, (t1 - 1) * s_seq_l, HAS_SEQ)
        seq_t = _seq_vec(seq_base, offs_t * s_seq_l, mt, HAS_SEQ)
        keep = mt & (seq_t == seq_pre)
        w = tl.exp(tl.where(keep, cs - cs_pre, float("-inf")))
        mtp = mt[:, None] & mask_p[None, :]
        dy = tl.load(dy_base + offs_t[:, None] * s_dy_l + offs_p[None, :] * s_dy_p, mask=mtp,
                     other=0.0)
        zt = dy
        if HAS_Z:
            zt = tl.load(z_base + offs_t[:, None] * s_z_l + offs_p[None, :] * s_z_p, mask=mtp,
                         other=0.0)
        g = _gate_grad_in(dy, zt, HAS_Z) * w[:, None]
        Ct = tl.load(C_base + offs_t[:, None] * s_C_l + offs_n[None, :] * s_C_n,
                     mask=mt[:, None] & (offs_n[None, :] < N), other=0.0)
        carry = tl.where(seq_pre == doc_end, tl.exp(cs_end - cs_pre), 0.0)
        lam = carry * lam + _dot(tl.trans(g), Ct, DOT)
    if STORE_DH0:
        _pn_store(dh0_ptr + bh_state, lam, offs_p, offs_n, P, N)
