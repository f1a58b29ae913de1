"""Triton forward kernel of the selective scan (Mamba-1 S6), channel-last layout.

Math (docs/kernels.md), per batch b, channel d, state index n, time t:

    dt_t = softplus(delta_t + delta_bias)          (or delta_t + delta_bias)
    a_t  = exp(dt_t * A[d, n])                     b_t = dt_t * u_t * B_t[n]
    h_t  = a_t * h_{t-1} + b_t                     (float32, h_{-1} = initial_state or 0)
    y_t  = sum_n C_t[n] h_t[n] + D[d] u_t          y_t *= silu(z_t) when z is given

Kernel design. The grid is (batch, dim blocks, segments): with S > 1 segments of SEG_CH chunks
(whole checkpoint segments) each program starts from the state entering its segment, folded from
the carry pass's per-piece end states (triton_fwd_carry.py); S = 1 is the plain
scan. One program owns BLOCK_D channels x BLOCK_N
states of h in registers and walks time in chunks of BLOCK_T steps. Each chunk loads
(BLOCK_T, BLOCK_D) tiles of u / delta / z (contiguous along dim: coalesced in our (b, l, d)
layout) and (BLOCK_T, BLOCK_N) tiles of B / C; the next chunk's tiles are loaded before the
current one is computed (register double buffering hides the memory latency).

The work tile is 4-D, (BLOCK_T, NI, BLOCK_D, NO), state index n = no * NI + ni. Triton's default
layout gives lanes to the last dimensions first, so NO and dim go to lanes and warps while time
and NI stay inside each thread: the recurrence over time (``tl.associative_scan`` along axis 0,
combine (a1, b1), (a2, b2) -> (a1 a2, a2 b1 + b2)) runs sequentially in registers, and the
contraction y = sum_n C h needs only log2(NO) shuffles. The carried state enters the scan
folded into the first step (b_0 += a_0 h), so only the b half of the scan is used; the next
carry is the last row. Steps past the sequence end get a = 1, b = 0 (the carry passes through);
padded states (n >= dstate) and channels (d >= dim) stay zero.

Packed documents (HAS_SEQ_IDX, seq_idx (batch, seqlen) integer): at a step t that starts a
document (t > 0, seq_idx[t] != seq_idx[t-1]) a_t = 0, so h_t = b_t: the state restarts from zero
there and the carry, initial_state included, does not cross it. A carry-pass piece that contains
such a step has total decay 0 (its flag in ``rst``): the state before the piece does not enter.
Without seq_idx none of this is compiled in.

When gradients are needed the kernel also writes the state entering every CK_R-th chunk,
``ckpt`` (batch, n_seg, dim, dstate) float32, from which the backward kernel recomputes the
states (the host picks CK_R so that this stays within a few floats per (b, l, d) element,
never (b, l, d, n)), and y before the silu(z) gate, ``ypre`` (batch, seqlen, dim).
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _softplus(x):
    """log(1 + exp(x)), stable: max(x, 0) + log(1 + exp(-|x|))."""
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _linrec_combine(a1, b1, a2, b2):
    """Compose two steps of h -> a h + b: first (a1, b1), then (a2, b2)."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _tile_index(d0, DIM, NSTATE, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, NI: tl.constexpr,
                NO: tl.constexpr):
    """Index tiles of the dim block starting at d0 (the layout above), shared by the kernels.
    2-D (time, dim) tiles: offs_t, offs_d, mask_d. 3-D (time, ni, no) tiles: t3 and nb, the state
    index (1, NI, NO); B / C are loaded in this shape and then broadcast along dim (a 4-D load
    would make the compiler give the whole 4-D computation the load's layout). 3-D (ni, dim, no)
    state: n3, d3, mask_s and state_off, the offset in a (dim, dstate) array. first / last: the
    first / last time step of the 4-D (time, ni, dim, no) work tile."""
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = d0 + tl.arange(0, BLOCK_D)
    mask_d = offs_d < DIM
    t4 = tl.arange(0, BLOCK_T)[:, None, None, None]
    ni = tl.arange(0, NI)
    no = tl.arange(0, NO)
    t3 = offs_t[:, None, None]
    nb = no[None, None, :] * NI + ni[None, :, None]  # (1, NI, NO)
    n3 = no[None, None, :] * NI + ni[:, None, None]  # (NI, 1, NO)
    d3 = offs_d[None, :, None]  # (1, D, 1)
    mask_s = (d3 < DIM) & (n3 < NSTATE)
    state_off = d3 * NSTATE + n3
    return offs_t, offs_d, mask_d, t3, nb, n3, d3, mask_s, state_off, t4 == 0, t4 == BLOCK_T - 1


@triton.jit
def _load_params(A_ptr, D_ptr, bias_ptr, state_off, mask_s, offs_d, mask_d, HAS_D: tl.constexpr,
                 HAS_BIAS: tl.constexpr):
    """A as a (ni, dim, no) state tile, times log2(e) for exp2; D and delta_bias (dim,), float32
    (zeros when absent: a jit function cannot return None)."""
    A = tl.load(A_ptr + state_off, mask=mask_s, other=0.0).to(tl.float32) * LOG2E
    Dv = tl.zeros(offs_d.shape, tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    bias = tl.zeros(offs_d.shape, tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    return A, Dv, bias


@triton.jit
def _carry_piece(seg, slot, M, SEG_LEN, SUB_LEN, L, BLOCK_T: tl.constexpr):
    """Piece slot % M of segment seg, the unit of work of a carry pass: its steps [lo, hi) (maybe
    empty: the last pieces of a short segment) and their chunk count."""
    seg_end = tl.minimum((seg + 1) * SEG_LEN, L)
    lo = tl.minimum(seg * SEG_LEN + (slot % M) * SUB_LEN, seg_end)
    hi = tl.minimum(lo + SUB_LEN, seg_end)
    return lo, hi, (hi - lo + BLOCK_T - 1) // BLOCK_T


@triton.jit
def _doc_start(seq_base, t, lo, hi, s_q_l):
    """Packed documents: True at the steps t (any int tensor) in [lo, hi) that start a document,
    t > 0 with seq_idx[t] != seq_idx[t-1] (seq_base: this batch row of seq_idx); False elsewhere.
    There the decay a_t is 0."""
    m = (t >= lo) & (t >= 1) & (t < hi)
    cur = tl.load(seq_base + t * s_q_l, mask=m, other=0)
    prev = tl.load(seq_base + (t - 1) * s_q_l, mask=m, other=0)
    return m & (cur != prev)


@triton.jit
def _delta_to_dt(delta, bias, mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """dt = softplus(delta + bias) (each step optional; bias (dim,) broadcasts along time), 0 off
    mask: there a = 1, b = 0, so the carry passes through."""
    if HAS_BIAS:
        delta = delta + bias
    if SOFTPLUS:
        delta = _softplus(delta)
    return tl.where(mask, delta, 0.0)


# the split sizes vary with S: no recompile for each value
@triton.jit(do_not_specialize=["SEG_CH", "M"])
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, loc_ptr, dtsum_ptr,
    seq_ptr, rst_ptr, y_ptr, hlast_ptr, ckpt_ptr, ypre_ptr,
    L, DIM, NSTATE, DPG_B, DPG_C, n_chunks, n_seg, SEG_CH, M,
    s_u_b, s_u_l, s_u_d,
    s_dt_b, s_dt_l, s_dt_d,
    s_z_b, s_z_l, s_z_d,
    s_B_b, s_B_l, s_B_g, s_B_n,
    s_C_b, s_C_l, s_C_g, s_C_n,
    s_y_b, s_y_l, s_y_d,
    s_q_b, s_q_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_H0: tl.constexpr, STORE_HLAST: tl.constexpr,
    STORE_CKPT: tl.constexpr, CK_R: tl.constexpr, STORE_YPRE: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, NI: tl.constexpr, NO: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)  # sequence segment: chunks [c_lo, c_hi)
    n_split = tl.num_programs(2)
    c_lo = pid_s * SEG_CH
    c_hi = tl.minimum(c_lo + SEG_CH, n_chunks)
    T_lo = (c_lo * BLOCK_T).to(tl.int64)
    d0 = pid_d * BLOCK_D
    # B / C groups of this dim block (the host picks BLOCK_D so that a block never straddles
    # two groups; DPG_* = channels per group, dim for (b, l, n) B / C)
    grp_B = d0 // DPG_B
    grp_C = d0 // DPG_C

    offs_t, offs_d, mask_d, t3, nb, n3, d3, mask_s, state_off, first, last = _tile_index(
        d0, DIM, NSTATE, BLOCK_T, BLOCK_D, NI, NO)
    A, Dv, bias = _load_params(A_ptr, D_ptr, bias_ptr, state_off, mask_s, offs_d, mask_d, HAS_D,
                               HAS_BIAS)
    if HAS_H0:
        h = tl.load(h0_ptr + pid_b * DIM * NSTATE + state_off, mask=mask_s, other=0.0)
    else:
        h = tl.zeros((NI, BLOCK_D, NO), dtype=tl.float32)
    # the state entering this segment: fold the earlier segments' M pieces each, first to last
    # (triton_fwd_carry.py): h at a piece end = loc + exp(A sum dt) * h before it
    # (+ loc alone when a document starts inside the piece)
    n_slot = (n_split - 1) * M
    for k in range(0, pid_s * M):
        slot = pid_b * n_slot + k
        loc = tl.load(loc_ptr + slot * DIM * NSTATE + state_off, mask=mask_s, other=0.0)
        dts = tl.load(dtsum_ptr + slot * DIM + offs_d, mask=mask_d, other=0.0)
        decay = tl.exp2(dts[None, :, None] * A)
        if HAS_SEQ_IDX:
            decay = tl.where(tl.load(rst_ptr + slot) != 0, 0.0, decay)
        h = loc + decay * h

    tt = T_lo + offs_t[:, None]
    u_p = u_ptr + pid_b * s_u_b + tt * s_u_l + offs_d[None, :] * s_u_d
    dt_p = delta_ptr + pid_b * s_dt_b + tt * s_dt_l + offs_d[None, :] * s_dt_d
    z_p = z_ptr + pid_b * s_z_b + tt * s_z_l + offs_d[None, :] * s_z_d
    y_p = y_ptr + pid_b * s_y_b + tt * s_y_l + offs_d[None, :] * s_y_d
    yq_p = ypre_ptr + pid_b * L * DIM + tt * DIM + offs_d[None, :]  # contiguous
    B_p = B_ptr + pid_b * s_B_b + grp_B * s_B_g + (T_lo + t3) * s_B_l + nb * s_B_n
    C_p = C_ptr + pid_b * s_C_b + grp_C * s_C_g + (T_lo + t3) * s_C_l + nb * s_C_n
    ck_p = ckpt_ptr + pid_b * n_seg * DIM * NSTATE + state_off
    T_hi = tl.minimum(c_hi * BLOCK_T, L)  # the segment's end (prefetches stop there)

    # the segment's first chunk's inputs; each iteration then prefetches the next chunk
    mask_td = ((T_lo + offs_t) < L)[:, None] & mask_d[None, :]
    mask_tn = ((T_lo + t3) < L) & (nb < NSTATE)
    u_n = tl.load(u_p, mask=mask_td, other=0.0)
    dt_n = tl.load(dt_p, mask=mask_td, other=0.0)
    B_n = tl.load(B_p, mask=mask_tn, other=0.0)
    C_n = tl.load(C_p, mask=mask_tn, other=0.0)
    if HAS_Z:
        z_n = tl.load(z_p, mask=mask_td, other=0.0)
    if HAS_SEQ_IDX:  # the steps that start a document (a = 0 there)
        seq_b = seq_ptr + pid_b * s_q_b
        new_n = _doc_start(seq_b, T_lo + offs_t, 0, L, s_q_l)
    for c in range(c_lo, c_hi):
        if STORE_CKPT:  # the state entering every CK_R-th chunk (a segment start); a
            # predicated store rather than a branch keeps the loop body straight-line
            tl.store(ck_p + (c // CK_R) * DIM * NSTATE, h,
                     mask=mask_s & ((d3 * 0 + c % CK_R) == 0))
        t0 = c * BLOCK_T
        mask_td = ((t0 + offs_t) < L)[:, None] & mask_d[None, :]
        u = u_n.to(tl.float32)
        dt = dt_n.to(tl.float32)
        Bt = B_n.to(tl.float32)[:, :, None, :]
        Ct = C_n.to(tl.float32)[:, :, None, :]
        if HAS_Z:
            zz = z_n.to(tl.float32)
        if HAS_SEQ_IDX:
            new_doc = new_n
        # prefetch chunk c + 1 (fully masked after the last chunk: no memory traffic)
        u_p += BLOCK_T * s_u_l
        dt_p += BLOCK_T * s_dt_l
        B_p += BLOCK_T * s_B_l
        C_p += BLOCK_T * s_C_l
        mask_nd = ((t0 + BLOCK_T + offs_t) < T_hi)[:, None] & mask_d[None, :]
        mask_nn = ((t0 + BLOCK_T + t3) < T_hi) & (nb < NSTATE)
        u_n = tl.load(u_p, mask=mask_nd, other=0.0)
        dt_n = tl.load(dt_p, mask=mask_nd, other=0.0)
        B_n = tl.load(B_p, mask=mask_nn, other=0.0)
        C_n = tl.load(C_p, mask=mask_nn, other=0.0)
        if HAS_Z:
            z_p += BLOCK_T * s_z_l
            z_n = tl.load(z_p, mask=mask_nd, other=0.0)
        if HAS_SEQ_IDX:
            new_n = _doc_start(seq_b, t0 + BLOCK_T + offs_t, 0, T_hi, s_q_l)

        dt = _delta_to_dt(dt, bias, mask_td, HAS_BIAS, SOFTPLUS)  # 0 past the end
        dt4 = dt[:, None, :, None]
        a = tl.exp2(dt4 * A[None])
        if HAS_SEQ_IDX:  # a document starts: the state before it does not enter
            a = tl.where(new_doc[:, None, None, None], 0.0, a)
        bx = (dt * u)[:, None, :, None] * Bt
        bx = tl.where(first, bx + a * h[None], bx)  # fold the carry into the first step
        _, hs = tl.associative_scan((a, bx), 0, _linrec_combine)
        y = tl.sum(tl.sum(hs * Ct, axis=1), axis=2)
        h = tl.sum(tl.where(last, hs, 0.0), axis=0)

        if HAS_D:
            y += Dv[None, :] * u
        if STORE_YPRE:  # y before the gate, for the backward's gradient of z
            tl.store(yq_p, y.to(ypre_ptr.dtype.element_ty), mask=mask_td)
            yq_p += BLOCK_T * DIM
        if HAS_Z:
            y *= zz / (1.0 + tl.exp(-zz))
        tl.store(y_p, y.to(y_ptr.dtype.element_ty), mask=mask_td)
        y_p += BLOCK_T * s_y_l

    if STORE_HLAST:  # from the last segment
        tl.store(hlast_ptr + pid_b * DIM * NSTATE + state_off, h,
                 mask=mask_s & ((d3 * 0 + pid_s) == n_split - 1))
