"""Triton carry pass of the sequence-split selective-scan forward (math and tile layout in
triton_fwd.py).

The recurrence h_t = a_t h_{t-1} + b_t is linear in its carry. Cut the sequence into S segments
of SEG_LEN steps, each into M pieces [lo, hi) of SUB_LEN steps (the last ones may be short or
empty); then the state at a piece end is

    h_{hi-1} = loc + P * h_{lo-1},   loc = the piece's end state from a zero start,
    P = prod_{t=lo}^{hi-1} a_t = exp(A * sum_{t=lo}^{hi-1} dt_t).

This kernel computes loc (batch, (S - 1) M, dim, dstate) and the dt sum (batch, (S - 1) M, dim)
for the pieces of segments 0 .. S - 2 in parallel, grid (batch, dim blocks, (S - 1) M); it reads
only u, delta and B. The forward kernel then folds the pieces before its segment, first to last,
into its starting state, so every segment runs in parallel. Rows past a piece end get dt = 0
(a = 1, b = 0): they pass the state through.

Packed documents (HAS_SEQ_IDX): a_t = 0 at the steps that start a document, so loc is the end
state of the piece's last document (from zero), and a piece with such a step has P = 0: the
kernel writes a flag per (batch, piece), ``rst`` (batch, (S - 1) M) int32, 1 when the piece
contains a document start (the dt sum is then unused).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_fwd import (_carry_piece, _delta_to_dt, _doc_start, _linrec_combine,
                         _load_params, _tile_index)


# the split sizes vary with S: no recompile for each value
@triton.jit(do_not_specialize=["SEG_LEN", "SUB_LEN", "M"])
def _scan_fwd_carry_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, bias_ptr, seq_ptr, loc_ptr, dtsum_ptr, rst_ptr,
    L, DIM, NSTATE, DPG_B, SEG_LEN, SUB_LEN, M,
    s_u_b, s_u_l, s_u_d,
    s_dt_b, s_dt_l, s_dt_d,
    s_B_b, s_B_l, s_B_g, s_B_n,
    s_q_b, s_q_l,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, NI: tl.constexpr, NO: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    slot = tl.program_id(2)  # piece i of segment s is slot s * M + i
    n_slot = tl.num_programs(2)
    d0 = pid_d * BLOCK_D
    grp_B = d0 // DPG_B
    lo, hi, n_ch = _carry_piece(slot // M, slot, M, SEG_LEN, SUB_LEN, L, BLOCK_T)

    offs_t, offs_d, mask_d, t3, nb, n3, d3, mask_s, state_off, first, last = _tile_index(
        d0, DIM, NSTATE, BLOCK_T, BLOCK_D, NI, NO)
    A, _D, bias = _load_params(A_ptr, None, bias_ptr, state_off, mask_s, offs_d, mask_d, False,
                               HAS_BIAS)  # no D in this pass
    h = tl.zeros((NI, BLOCK_D, NO), dtype=tl.float32)
    dts_acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)  # summed over time at the end

    t_lo = lo.to(tl.int64)
    u_p = u_ptr + pid_b * s_u_b + (t_lo + offs_t[:, None]) * s_u_l + offs_d[None, :] * s_u_d
    dt_p = delta_ptr + pid_b * s_dt_b + (t_lo + offs_t[:, None]) * s_dt_l \
        + offs_d[None, :] * s_dt_d
    B_p = B_ptr + pid_b * s_B_b + grp_B * s_B_g + (t_lo + t3) * s_B_l + nb * s_B_n
    m_td = ((t_lo + offs_t) < hi)[:, None] & mask_d[None, :]
    m_p = ((t_lo + t3) < hi) & (nb < NSTATE)
    u_n = tl.load(u_p, mask=m_td, other=0.0)
    dt_n = tl.load(dt_p, mask=m_td, other=0.0)
    B_n = tl.load(B_p, mask=m_p, other=0.0)
    if HAS_SEQ_IDX:
        seq_b = seq_ptr + pid_b * s_q_b
        new_n = _doc_start(seq_b, t_lo + offs_t, lo, hi, s_q_l)
        new_acc = tl.zeros((BLOCK_T,), dtype=tl.int32)  # any document start, per row
    for k in range(0, n_ch):
        t0 = t_lo + k * BLOCK_T
        m_td = ((t0 + offs_t) < hi)[:, None] & mask_d[None, :]
        u = u_n.to(tl.float32)
        dt = dt_n.to(tl.float32)
        Bt = B_n.to(tl.float32)[:, :, None, :]
        if HAS_SEQ_IDX:
            new_doc = new_n
        # prefetch the next chunk (all masked past the piece end)
        u_p += BLOCK_T * s_u_l
        dt_p += BLOCK_T * s_dt_l
        B_p += BLOCK_T * s_B_l
        nxt_td = ((t0 + BLOCK_T + offs_t) < hi)[:, None] & mask_d[None, :]
        nxt_p = ((t0 + BLOCK_T + t3) < hi) & (nb < NSTATE)
        u_n = tl.load(u_p, mask=nxt_td, other=0.0)
        dt_n = tl.load(dt_p, mask=nxt_td, other=0.0)
        B_n = tl.load(B_p, mask=nxt_p, other=0.0)
        if HAS_SEQ_IDX:
            new_n = _doc_start(seq_b, t0 + BLOCK_T + offs_t, lo, hi, s_q_l)

        dt = _delta_to_dt(dt, bias, m_td, HAS_BIAS, SOFTPLUS)  # 0 past the piece end
        dts_acc += dt
        a = tl.exp2(dt[:, None, :, None] * A[None])
        if HAS_SEQ_IDX:  # a document starts: nothing before it enters
            a = tl.where(new_doc[:, None, None, None], 0.0, a)
            new_acc = tl.maximum(new_acc, new_doc.to(tl.int32))
        bx = (dt * u)[:, None, :, None] * Bt
        bx = tl.where(first, bx + a * h[None], bx)
        _, hs = tl.associative_scan((a, bx), 0, _linrec_combine)
        h = tl.sum(tl.where(last, hs, 0.0), axis=0)

    base = pid_b * n_slot + slot
    tl.store(loc_ptr + base * DIM * NSTATE + state_off, h, mask=mask_s)
    tl.store(dtsum_ptr + base * DIM + offs_d, tl.sum(dts_acc, axis=0), mask=mask_d)
    if HAS_SEQ_IDX:  # the same flag in every dim block: the first one writes it
        tl.store(rst_ptr + base, tl.max(new_acc, axis=0), mask=pid_d == 0)
