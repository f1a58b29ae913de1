"""Triton backward kernel of the selective scan (see triton_fwd.py for the math and
the tile layout).

With g_t the gradient of the gated output, the adjoint of the recurrence runs backwards in time:

    gy_t  = g_t * silu(z_t)                 gz_t = g_t * y_t * silu'(z_t)   (y_t before the gate)
    gh_t  = gy_t C_t + a_{t+1} gh_{t+1}     gh_{L-1} = gy_{L-1} C_{L-1} + g(h_last)
    gB_t  = sum_d gh_t dt_t u_t             gC_t = sum_d gy_t h_t
    gu_t  = sum_n gh_t B_t dt_t + D gy_t    gD = sum_t gy_t u_t
    gdt_t = sum_n gh_t (B_t u_t + A a_t h_{t-1})       with a_t h_{t-1} = h_t - b_t
    gA    = sum_t gh_t a_t h_{t-1} dt_t     g(initial_state) = a_0 gh_0
    gdelta = gdt * sigmoid(delta + delta_bias) under softplus, else gdt;  g(delta_bias) = sum gdelta

Grid (batch, dim blocks, segments), the forward's 4-D (time, ni, dim, no) tile. The sequence
is cut into S segments of SEG_CH chunks (S = 1: one segment, the whole sequence); each program
walks its segment's chunks in reverse. A segment's states come from the forward's checkpoints
(segments start on checkpoint boundaries), and the adjoint entering it from its end is folded from
the later segments' carries, computed beforehand by the carry pass
(triton_bwd_carry.py: gh at a segment start = loc + exp(A sum dt) * gh at the
next segment's start), so the segments run in parallel.

Per chunk it reloads the inputs, recomputes h_t from the chunk-start state that the forward saved
(forward ``tl.associative_scan``, carry folded into the first step), then solves the adjoint
recurrence with a reverse ``tl.associative_scan`` over (a_t, 1, gy_t C_t) whose combine
(``_shifted_combine``) applies a_{t+1} to gh_{t+1}: the decays computed for the recompute serve
the adjoint too (no second exp2, no shifted reload of delta). The carry between chunks is
a_T gh_T (T the chunk's first step), folded into the last step of the chunk before it; it starts
at the segment's end as a_T times the folded adjoint, and in segment 0 it ends as g(initial_state).

Packed documents (HAS_SEQ_IDX): a_t = 0 at the steps that start a document (as in the
forward), in the recompute and therefore in the adjoint: gh_{t-1} gets no a_t gh_t from across
the start, and ga_t = gh_t a_t h_{t-1} = 0 there (no gradient through exp(dt_t A) to dt or A).
The carry entering a segment from its end is cut the same way: a piece flagged by the carry pass
(a document starts inside it, after its first step or at the step after it) has decay 0, and
a_T = 0 when the step T after the segment starts a document.

Reductions across programs: gB and gC are written as float32 partials per dim block,
(n_dblocks, batch, seqlen, dstate), summed by the host (deterministic), or with BC_ATOMIC
atomically added into float32 (batch, seqlen, groups, dstate) (for big dstate, where the
partials would be large); gA, gD and g(delta_bias) as per-(segment, batch) partials
(S, batch, dim, dstate) / (S, batch, dim); g(initial_state) from segment 0.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_fwd import (_delta_to_dt, _doc_start, _linrec_combine, _load_params, _softplus,
                         _tile_index)

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _shifted_combine(f1, p1, v1, f2, p2, v2):
    """Reverse-scan combine for gh_t = cc_t + a_{t+1} gh_{t+1} over elements (a_t, 1, cc_t):
    a stretch [i, j] is summarised by (a_i, a_{i+1}...a_j, V_i); in reverse mode the first
    argument is the later stretch, the second the earlier one. Sequentially (one element added at
    a time, p2 = 1) only v = v2 + f1 * v1 survives: a shift of a by one step at no cost."""
    return f2, p2 * f1 * p1, v2 + p2 * f1 * v1


# the split sizes vary with S: no recompile for each value
@triton.jit(do_not_specialize=["SEG_CH", "M"])
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, ckpt_ptr, dout_ptr,
    dhlast_ptr, ypre_ptr, loc_ptr, dtsum_ptr, seq_ptr, rst_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dBp_ptr, dCp_ptr, dAp_ptr, dDp_ptr, dbiasp_ptr, dh0_ptr,
    scratch_ptr,
    L, DIM, NSTATE, DPG_B, DPG_C, n_chunks, n_seg, SEG_CH, M,
    s_u_b, s_u_l, s_u_d,
    s_dt_b, s_dt_l, s_dt_d,
    s_z_b, s_z_l, s_z_d,
    s_B_b, s_B_l, s_B_g, s_B_n,
    s_C_b, s_C_l, s_C_g, s_C_n,
    s_g_b, s_g_l, s_g_d,
    s_q_b, s_q_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_DHLAST: tl.constexpr, STORE_DH0: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, NI: tl.constexpr, NO: tl.constexpr,
    CK_R: tl.constexpr, BC_ATOMIC: tl.constexpr, UNIT_LD: tl.constexpr, UNIT_Z: tl.constexpr,
    DZ_LIKE_Z: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)  # sequence segment: chunks [c_lo, c_hi)
    n_bat = tl.num_programs(0)
    n_dblk = tl.num_programs(1)
    n_split = tl.num_programs(2)
    c_lo = pid_s * SEG_CH
    c_hi = tl.minimum(c_lo + SEG_CH, n_chunks)
    T_lo = c_lo * BLOCK_T
    d0 = pid_d * BLOCK_D
    grp_B = d0 // DPG_B
    grp_C = d0 // DPG_C

    offs_t, offs_d, mask_d, t3, nb, n3, d3, mask_s, state_off, first, last = _tile_index(
        d0, DIM, NSTATE, BLOCK_T, BLOCK_D, NI, NO)
    A, Dv, bias = _load_params(A_ptr, D_ptr, bias_ptr, state_off, mask_s, offs_d, mask_d, HAS_D,
                               HAS_BIAS)
    if HAS_DHLAST:
        G = tl.load(dhlast_ptr + pid_b * DIM * NSTATE + state_off, mask=mask_s, other=0.0)
    else:
        G = tl.zeros((NI, BLOCK_D, NO), dtype=tl.float32)
    # The adjoint entering this segment from its end: fold the carries of the later segments'
    # M pieces each (triton_bwd_carry.py), last first:
    # gh at a piece start = loc + exp(A sum dt) * gh at the next piece's start
    # (+ loc alone when a document starts inside the piece or at the next piece's start)
    n_slot = (n_split - 1) * M
    for k in range(0, (n_split - 1 - pid_s) * M):
        slot = pid_b * n_slot + (n_slot - 1 - k)
        loc = tl.load(loc_ptr + slot * DIM * NSTATE + state_off, mask=mask_s, other=0.0)
        dts = tl.load(dtsum_ptr + slot * DIM + offs_d, mask=mask_d, other=0.0)
        decay = tl.exp2(dts[None, :, None] * A)
        if HAS_SEQ_IDX:
            decay = tl.where(tl.load(rst_ptr + slot) != 0, 0.0, decay)
        G = loc + decay * G
    # From here on G carries a_T gh_T, T = the step after this segment (a_T = 1 at the end)
    T_end = c_hi.to(tl.int64) * BLOCK_T
    m_T = mask_d & ((T_end + offs_d * 0) < L)
    dlT = tl.load(delta_ptr + pid_b * s_dt_b + T_end * s_dt_l + offs_d * s_dt_d,
                  mask=m_T, other=0.0).to(tl.float32)
    dlT = _delta_to_dt(dlT, bias, m_T, HAS_BIAS, SOFTPLUS)
    G = tl.exp2(dlT[None, :, None] * A) * G
    if HAS_SEQ_IDX:  # a_T = 0 when step T starts a document
        seq_b = seq_ptr + pid_b * s_q_b
        G = tl.where(_doc_start(seq_b, T_end, 0, L, s_q_l), 0.0, G)

    # Addresses: scalar bases at the segment's last chunk, stepped one chunk back every
    # iteration, plus int32 in-chunk offset tiles computed once (64-bit pointer tiles for every
    # input would cost registers, which bound this kernel's occupancy).
    t_last = (c_hi - 1).to(tl.int64) * BLOCK_T
    td = offs_t[:, None]
    off_o = td * DIM + offs_d[None, :]  # du / ddelta / dz / ypre: contiguous (b, l, d)
    if UNIT_LD:  # u, delta and the output gradient have the same (l, d) strides (DIM, 1)
        off_u = off_o
        off_dt = off_o
        off_g = off_o
    else:
        off_u = td * s_u_l + offs_d[None, :] * s_u_d
        off_dt = td * s_dt_l + offs_d[None, :] * s_dt_d
        off_g = td * s_g_l + offs_d[None, :] * s_g_d
    if UNIT_Z:  # z too (in the Mamba block z is the strided second half of in_proj's output)
        off_z = off_o
    else:
        off_z = td * s_z_l + offs_d[None, :] * s_z_d
    u_p = u_ptr + pid_b * s_u_b + t_last * s_u_l
    dt_p = delta_ptr + pid_b * s_dt_b + t_last * s_dt_l
    z_p = z_ptr + pid_b * s_z_b + t_last * s_z_l
    if DZ_LIKE_Z:  # dz laid out like z (the z half of a buffer shaped like z's base): z's offsets
        dz_p = dz_ptr + pid_b * s_z_b + t_last * s_z_l
    g_p = dout_ptr + pid_b * s_g_b + t_last * s_g_l
    o_b = pid_b * L * DIM + t_last * DIM
    off_B = t3 * s_B_l + nb * s_B_n
    off_C = t3 * s_C_l + nb * s_C_n
    B_p = B_ptr + pid_b * s_B_b + grp_B * s_B_g + t_last * s_B_l
    C_p = C_ptr + pid_b * s_C_b + grp_C * s_C_g + t_last * s_C_l
    if BC_ATOMIC:  # gB / gC accumulated with atomics in float32 (batch, L, groups, NSTATE)
        n_gB = DIM // DPG_B
        n_gC = DIM // DPG_C
        off_pB = (t3 * n_gB + grp_B) * NSTATE + nb
        off_pC = (t3 * n_gC + grp_C) * NSTATE + nb
        pB_b = (pid_b * L + t_last) * n_gB * NSTATE
        pC_b = (pid_b * L + t_last) * n_gC * NSTATE
    else:  # gB / gC partials per dim block: (n_dblocks, batch, L, NSTATE) contiguous
        off_pB = t3 * NSTATE + nb
        off_pC = off_pB
        pB_b = (pid_d * n_bat + pid_b) * L * NSTATE + t_last * NSTATE
        pC_b = pB_b
    ck_b = ckpt_ptr + pid_b * n_seg * DIM * NSTATE  # + chunk * DIM * NSTATE + state_off
    # this program's scratch: the states at the CK_R sub-chunk starts of the current segment
    SLOT = BLOCK_D * NI * NO
    sc_p = scratch_ptr + ((pid_b * n_dblk + pid_d) * n_split + pid_s) * (CK_R * SLOT) \
        + tl.arange(0, BLOCK_D)[None, :, None] * (NI * NO) + n3

    dA_acc = tl.zeros((NI, BLOCK_D, NO), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)  # summed over time at the end
    dbias_acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)

    # the segment's last chunk's inputs; each iteration then prefetches the chunk before it
    # (int32 like the loop's t0: Triton wants a loop-carried name to keep its type)
    t0 = (c_hi - 1) * BLOCK_T
    mask_td = ((t0 + offs_t) < L)[:, None] & mask_d[None, :]
    mask_p = ((t0 + t3) < L) & (nb < NSTATE)
    u_n = tl.load(u_p + off_u, mask=mask_td, other=0.0)
    dl_n = tl.load(dt_p + off_dt, mask=mask_td, other=0.0)
    g_n = tl.load(g_p + off_g, mask=mask_td, other=0.0)
    B_n = tl.load(B_p + off_B, mask=mask_p, other=0.0)
    C_n = tl.load(C_p + off_C, mask=mask_p, other=0.0)
    if HAS_Z:
        z_n = tl.load(z_p + off_z, mask=mask_td, other=0.0)
        yq_n = tl.load(ypre_ptr + o_b + off_o, mask=mask_td, other=0.0)
    if HAS_SEQ_IDX:  # the steps that start a document (a = 0 there)
        new_n = _doc_start(seq_b, t0 + offs_t, 0, L, s_q_l)
    if CK_R == 1:  # a checkpoint at every chunk start: no recompute pass, no scratch
        h0_n = tl.load(ck_b + (c_hi - 1).to(tl.int64) * DIM * NSTATE + state_off, mask=mask_s,
                       other=0.0)
    else:
        h0_n = tl.zeros((NI, BLOCK_D, NO), dtype=tl.float32)

    for k in range(0, c_hi - c_lo):
        c = c_hi - 1 - k
        t0 = c * BLOCK_T
        j = c % CK_R  # sub-chunk index inside its checkpoint segment
        if CK_R > 1:
            if (j == CK_R - 1) | (k == 0):
                # Entering segment c // CK_R from its end: recompute forward from its
                # checkpoint the states at the starts of its sub-chunks 0..j, into the scratch.
                tl.debug_barrier()  # every thread is done reading the previous segment's slots
                h = tl.load(ck_b + (c // CK_R).to(tl.int64) * DIM * NSTATE + state_off,
                            mask=mask_s, other=0.0)
                seg0 = tl.full((), (c - j) * BLOCK_T, tl.int64)
                for jj in range(0, j):
                    tl.store(sc_p + jj * SLOT, h)
                    tq = seg0 + jj * BLOCK_T
                    m_td = ((tq + offs_t) < L)[:, None] & mask_d[None, :]
                    m_p = ((tq + t3) < L) & (nb < NSTATE)
                    uq = tl.load(u_ptr + pid_b * s_u_b + (tq + td) * s_u_l
                                 + offs_d[None, :] * s_u_d, mask=m_td, other=0.0).to(tl.float32)
                    dq = tl.load(delta_ptr + pid_b * s_dt_b + (tq + td) * s_dt_l
                                 + offs_d[None, :] * s_dt_d, mask=m_td, other=0.0).to(tl.float32)
                    Bq = tl.load(B_ptr + pid_b * s_B_b + grp_B * s_B_g + (tq + t3) * s_B_l
                                 + nb * s_B_n, mask=m_p, other=0.0).to(tl.float32)
                    dq = _delta_to_dt(dq, bias, m_td, HAS_BIAS, SOFTPLUS)
                    aq = tl.exp2(dq[:, None, :, None] * A[None])
                    if HAS_SEQ_IDX:
                        nq = _doc_start(seq_b, tq + offs_t, 0, L, s_q_l)
                        aq = tl.where(nq[:, None, None, None], 0.0, aq)
                    bq = (dq * uq)[:, None, :, None] * Bq[:, :, None, :]
                    bq = tl.where(first, bq + aq * h[None], bq)
                    _, hq = tl.associative_scan((aq, bq), 0, _linrec_combine)
                    h = tl.sum(tl.where(last, hq, 0.0), axis=0)
                tl.store(sc_p + j * SLOT, h)
                tl.debug_barrier()  # other threads of the program read these slots
                h0_n = tl.load(sc_p + j * SLOT)
        mask_t = (t0 + offs_t) < L
        mask_td = mask_t[:, None] & mask_d[None, :]
        mask_p = ((t0 + t3) < L) & (nb < NSTATE)
        u = u_n.to(tl.float32)
        dl = dl_n.to(tl.float32)
        gout = g_n.to(tl.float32)
        Bt = B_n.to(tl.float32)[:, :, None, :]
        Ct = C_n.to(tl.float32)[:, :, None, :]
        h0 = h0_n
        if HAS_Z:
            zz = z_n.to(tl.float32)
            y = yq_n.to(tl.float32)  # y before the gate, saved by the forward
        if HAS_SEQ_IDX:
            new_doc = new_n

        # prefetch chunk k + 1 (= the previous time chunk; all masked after the segment's first)
        u_p -= BLOCK_T * s_u_l
        dt_p -= BLOCK_T * s_dt_l
        g_p -= BLOCK_T * s_g_l
        B_p -= BLOCK_T * s_B_l
        C_p -= BLOCK_T * s_C_l
        pre_t = (t0 - BLOCK_T + offs_t) >= T_lo
        pre_td = pre_t[:, None] & mask_d[None, :]
        pre_p = ((t0 - BLOCK_T + t3) >= T_lo) & (nb < NSTATE)
        u_n = tl.load(u_p + off_u, mask=pre_td, other=0.0)
        dl_n = tl.load(dt_p + off_dt, mask=pre_td, other=0.0)
        g_n = tl.load(g_p + off_g, mask=pre_td, other=0.0)
        B_n = tl.load(B_p + off_B, mask=pre_p, other=0.0)
        C_n = tl.load(C_p + off_C, mask=pre_p, other=0.0)
        if HAS_Z:
            z_p -= BLOCK_T * s_z_l
            z_n = tl.load(z_p + off_z, mask=pre_td, other=0.0)
            yq_n = tl.load(ypre_ptr + (o_b - BLOCK_T * DIM) + off_o, mask=pre_td, other=0.0)
        if HAS_SEQ_IDX:
            new_n = _doc_start(seq_b, t0 - BLOCK_T + offs_t, T_lo, L, s_q_l)
        if CK_R == 1:
            h0_n = tl.load(ck_b + (c - 1).to(tl.int64) * DIM * NSTATE + state_off,
                           mask=mask_s & ((d3 * 0 + c) > c_lo), other=0.0)
        else:  # the next chunk's start state when it lies in this segment (else the pass
            # above reloads it on entering the previous segment)
            h0_n = tl.load(sc_p + (j - 1) * SLOT, mask=(d3 * 0 + j) > 0, other=0.0)

        if HAS_BIAS:
            dl = dl + bias[None, :]
        if SOFTPLUS:
            sig = 1.0 / (1.0 + tl.exp(-dl))
            dt = _softplus(dl)
        else:
            dt = dl
        dt = tl.where(mask_td, dt, 0.0)

        # recompute the states of this chunk
        dtu = dt * u
        a = tl.exp2(dt[:, None, :, None] * A[None])
        if HAS_SEQ_IDX:  # a document starts: a = 0 cuts the state and the adjoint there
            a = tl.where(new_doc[:, None, None, None], 0.0, a)
        bx = dtu[:, None, :, None] * Bt
        _, hs = tl.associative_scan((a, tl.where(first, bx + a * h0[None], bx)), 0,
                                    _linrec_combine)
        if HAS_Z:
            sz = 1.0 / (1.0 + tl.exp(-zz))
            gz = gout * y * sz * (1.0 + zz * (1.0 - sz))
            if DZ_LIKE_Z:
                tl.store(dz_p + off_z, gz.to(dz_ptr.dtype.element_ty), mask=mask_td)
                dz_p -= BLOCK_T * s_z_l
            else:
                tl.store(dz_ptr + o_b + off_o, gz.to(dz_ptr.dtype.element_ty), mask=mask_td)
            gy = gout * zz * sz
        else:
            gy = gout
        gy4 = gy[:, None, :, None]
        if BC_ATOMIC:
            tl.atomic_add(dCp_ptr + pC_b + off_pC, tl.sum(hs * gy4, axis=2), mask=mask_p)
        else:
            tl.store(dCp_ptr + pC_b + off_pC, tl.sum(hs * gy4, axis=2), mask=mask_p)
        hm = hs - bx  # a_t h_{t-1}

        # adjoint: gh_t = gy_t C_t + a_{t+1} gh_{t+1}, a reverse scan, carry G folded in
        cc = gy4 * Ct
        # a_{t+1} comes from a_t through the combine: no second exp2 (measured 5-8% faster
        # fwd+bwd than exp(dt_{t+1} A) from a shifted load of delta, H100)
        _, _, gh = tl.associative_scan((a, tl.full(a.shape, 1.0, tl.float32),
                                        tl.where(last, cc + G[None], cc)), 0,
                                       _shifted_combine, reverse=True)
        G = tl.sum(tl.where(first, a * gh, 0.0), axis=0)  # a_t gh_t at the chunk's first step

        ga = gh * hm  # gh_t * a_t * h_{t-1}
        ghB = tl.sum(tl.sum(gh * Bt, axis=1), axis=2)
        gdt = tl.sum(tl.sum(ga * A[None], axis=1), axis=2) * LN2 + ghB * u
        gu = ghB * dt
        if HAS_D:
            gu += Dv[None, :] * gy
            dD_acc += gy * u
        dA_acc += tl.sum(ga * dt[:, None, :, None], axis=0)
        if SOFTPLUS:
            gdl = gdt * sig
        else:
            gdl = gdt
        gdl = tl.where(mask_td, gdl, 0.0)
        dbias_acc += gdl
        tl.store(du_ptr + o_b + off_o, gu.to(du_ptr.dtype.element_ty), mask=mask_td)
        tl.store(ddelta_ptr + o_b + off_o, gdl.to(ddelta_ptr.dtype.element_ty), mask=mask_td)
        if BC_ATOMIC:
            tl.atomic_add(dBp_ptr + pB_b + off_pB, tl.sum(gh * dtu[:, None, :, None], axis=2),
                          mask=mask_p)
        else:
            tl.store(dBp_ptr + pB_b + off_pB, tl.sum(gh * dtu[:, None, :, None], axis=2),
                     mask=mask_p)

        o_b -= BLOCK_T * DIM
        if BC_ATOMIC:
            pB_b -= BLOCK_T * n_gB * NSTATE
            pC_b -= BLOCK_T * n_gC * NSTATE
        else:
            pB_b -= BLOCK_T * NSTATE
            pC_b = pB_b

    # per-(segment, batch) partials, (n_split, batch, dim[, dstate])
    pb = pid_s * n_bat + pid_b
    tl.store(dAp_ptr + pb * DIM * NSTATE + state_off, dA_acc, mask=mask_s)
    if HAS_D:
        tl.store(dDp_ptr + pb * DIM + offs_d, tl.sum(dD_acc, axis=0), mask=mask_d)
    if HAS_BIAS:
        tl.store(dbiasp_ptr + pb * DIM + offs_d, tl.sum(dbias_acc, axis=0), mask=mask_d)
    if STORE_DH0:  # G = a_0 gh_0 = g(initial_state) in segment 0 (other segments store nothing)
        tl.store(dh0_ptr + pid_b * DIM * NSTATE + state_off, G,
                 mask=mask_s & ((d3 * 0 + pid_s) == 0))
