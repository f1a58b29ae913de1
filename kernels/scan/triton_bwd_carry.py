"""Triton carry pass of the sequence-split selective-scan backward (the math of the backward is in
triton_bwd.py; the tile layout in triton_fwd.py).

The adjoint recurrence gh_t = gy_t C_t + a_{t+1} gh_{t+1} is linear in its carry. For any
stretch of steps [lo, hi), the adjoint at its start is

    gh_lo = loc + P * gh_hi
    loc   = sum_{t in [lo, hi)} (prod_{k=lo+1}^{t} a_k) gy_t C_t      (the zero-carry adjoint)
    P     = prod_{k=lo+1}^{hi} a_k = exp(A * sum_{k=lo+1}^{hi} dt_k)

(a_k = 1 past the sequence end; at the sequence end gh_L = g(h_last)). The backward cuts the
sequence into S segments of SEG_LEN steps, and this pass cuts each segment s = 1 .. S - 1 into
M pieces of SUB_LEN steps (the last ones may be short or empty) and computes every piece's loc
(batch, (S - 1) M, dim, dstate) and dt sum (batch, (S - 1) M, dim) in parallel: grid (batch, dim
blocks, (S - 1) M). It reads only delta, z, C and the output gradient: no state recompute and no
gradient outputs. The main backward kernel then folds the pieces after its segment, last first,
into the adjoint entering its segment from its end, so every segment runs in parallel.

Packed documents (HAS_SEQ_IDX): a_k = 0 at the steps k that start a document, so the adjoint
does not cross them: loc stops at the first document start after lo, and P = 0 when a document
starts at any k in [lo + 1, hi] (inside the piece after its first step, or at the step after
it). The kernel writes that as a flag per (batch, piece), ``rst`` (batch, (S - 1) M) int32.

Each program walks its piece's chunks in reverse with the main kernel's reverse
``tl.associative_scan`` over (a_{t+1}, gy_t C_t), the carry folded into the chunk's last step;
rows past the piece end get gy = 0 and a = 1, so they pass the (zero) carry through.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_fwd import (_carry_piece, _delta_to_dt, _doc_start, _linrec_combine,
                         _load_params, _tile_index)


# the split sizes vary with S: no recompile for each value
@triton.jit(do_not_specialize=["SEG_LEN", "SUB_LEN", "M"])
def _scan_bwd_carry_kernel(
    delta_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, dout_ptr, seq_ptr, loc_ptr, dtsum_ptr, rst_ptr,
    L, DIM, NSTATE, DPG_C, SEG_LEN, SUB_LEN, M,
    s_dt_b, s_dt_l, s_dt_d,
    s_z_b, s_z_l, s_z_d,
    s_C_b, s_C_l, s_C_g, s_C_n,
    s_g_b, s_g_l, s_g_d,
    s_q_b, s_q_l,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, NI: tl.constexpr, NO: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    slot = tl.program_id(2)  # piece M + slot: piece i of segment s is s * M + i
    n_slot = tl.num_programs(2)
    d0 = pid_d * BLOCK_D
    grp_C = d0 // DPG_C
    lo, hi, n_ch = _carry_piece(1 + slot // M, slot, M, SEG_LEN, SUB_LEN, L, BLOCK_T)

    offs_t, offs_d, mask_d, t3, nb, n3, d3, mask_s, state_off, first, last = _tile_index(
        d0, DIM, NSTATE, BLOCK_T, BLOCK_D, NI, NO)
    td = offs_t[:, None]
    A, _D, bias = _load_params(A_ptr, None, bias_ptr, state_off, mask_s, offs_d, mask_d, False,
                               HAS_BIAS)  # no D in this pass
    G = tl.zeros((NI, BLOCK_D, NO), dtype=tl.float32)
    dts_acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)  # summed over time at the end

    # pointers at the piece's last chunk; each iteration prefetches the chunk before it
    t_last = (lo + (n_ch - 1) * BLOCK_T).to(tl.int64)
    dt_p = delta_ptr + pid_b * s_dt_b + (t_last + 1 + td) * s_dt_l + offs_d[None, :] * s_dt_d
    g_p = dout_ptr + pid_b * s_g_b + (t_last + td) * s_g_l + offs_d[None, :] * s_g_d
    z_p = z_ptr + pid_b * s_z_b + (t_last + td) * s_z_l + offs_d[None, :] * s_z_d
    C_p = C_ptr + pid_b * s_C_b + grp_C * s_C_g + (t_last + t3) * s_C_l + nb * s_C_n
    m_t = (t_last + offs_t >= lo) & (t_last + offs_t < hi)
    m_td = m_t[:, None] & mask_d[None, :]
    m_t1d = ((t_last + offs_t + 1) < L)[:, None] & m_td
    m_p = (t_last + t3 >= lo) & (t_last + t3 < hi) & (nb < NSTATE)
    dln_n = tl.load(dt_p, mask=m_t1d, other=0.0)
    g_n = tl.load(g_p, mask=m_td, other=0.0)
    C_n = tl.load(C_p, mask=m_p, other=0.0)
    if HAS_Z:
        z_n = tl.load(z_p, mask=m_td, other=0.0)
    # document starts at the steps t + 1 of rows t in [lo, hi) (a_{t+1} = 0 there)
    if HAS_SEQ_IDX:
        seq_b = seq_ptr + pid_b * s_q_b
        q_hi = tl.minimum(hi + 1, L)
        new_n = _doc_start(seq_b, t_last + 1 + offs_t, lo + 1, q_hi, s_q_l)
        new_acc = tl.zeros((BLOCK_T,), dtype=tl.int32)  # any document start, per row

    for k in range(0, n_ch):
        t0 = t_last - k * BLOCK_T
        rows = t0 + offs_t
        m_td = (rows < hi)[:, None] & mask_d[None, :]
        m_t1d = ((rows + 1) < L)[:, None] & m_td
        dln = dln_n.to(tl.float32)
        gout = g_n.to(tl.float32)
        Ct = C_n.to(tl.float32)[:, :, None, :]
        if HAS_Z:
            zz = z_n.to(tl.float32)
        if HAS_SEQ_IDX:
            new_doc = new_n
        # prefetch the previous chunk (all masked before the piece start)
        dt_p -= BLOCK_T * s_dt_l
        g_p -= BLOCK_T * s_g_l
        C_p -= BLOCK_T * s_C_l
        pre_td = ((rows - BLOCK_T) >= lo)[:, None] & mask_d[None, :]
        pre_p = ((t0 - BLOCK_T + t3) >= lo) & (nb < NSTATE)
        dln_n = tl.load(dt_p, mask=pre_td, other=0.0)
        g_n = tl.load(g_p, mask=pre_td, other=0.0)
        C_n = tl.load(C_p, mask=pre_p, other=0.0)
        if HAS_Z:
            z_p -= BLOCK_T * s_z_l
            z_n = tl.load(z_p, mask=pre_td, other=0.0)
        if HAS_SEQ_IDX:
            new_n = _doc_start(seq_b, rows - BLOCK_T + 1, lo + 1, q_hi, s_q_l)

        if HAS_Z:
            gy = gout * zz / (1.0 + tl.exp(-zz))
        else:
            gy = gout
        # dt_{t+1}, for a_{t+1}: 0 (a = 1) past the piece / sequence end
        dtn = _delta_to_dt(dln, bias, m_t1d, HAS_BIAS, SOFTPLUS)
        dts_acc += dtn
        an = tl.exp2(dtn[:, None, :, None] * A[None])
        if HAS_SEQ_IDX:  # a document starts at t + 1: the adjoint stops there
            an = tl.where(new_doc[:, None, None, None], 0.0, an)
            new_acc = tl.maximum(new_acc, new_doc.to(tl.int32))
        cc = gy[:, None, :, None] * Ct  # 0 past the piece end (masked loads)
        _, gh = tl.associative_scan((an, tl.where(last, cc + an * G[None], cc)), 0,
                                    _linrec_combine, reverse=True)
        G = tl.sum(tl.where(first, gh, 0.0), axis=0)

    base = pid_b * n_slot + slot
    tl.store(loc_ptr + base * DIM * NSTATE + state_off, G, mask=mask_s)
    tl.store(dtsum_ptr + base * DIM + offs_d, tl.sum(dts_acc, axis=0), mask=mask_d)
    if HAS_SEQ_IDX:  # the same flag in every dim block: the first one writes it
        tl.store(rst_ptr + base, tl.max(new_acc, axis=0), mask=pid_d == 0)
