"""Triton backward kernels of the SSD chunk terms: the column kernel (dx, dB, ddt, dz, dD and
the column half of d cs) and the row kernel (dC and the inter-chunk part of d cs).

Notation per (batch, chunk, head): g_t = dy_t * silu(z_t) (the gradient reaching y before the
gate), cs the chunk-local cumulative sum of a = dt A, Hin the state entering the chunk, dHout
the gradient of the state leaving it (triton_state.py's backward scan), H_c that state itself,
and for s <= t in one document

    L_ts = exp(cs_t - cs_s),   CB_ts = C_t . B_s,   M_ts = CB_ts L_ts dt_s,   dM_ts = g_t . x_s.

The forward's chunk terms are y_t = sum_s M_ts x_s + exp(cs_t) C_t Hin^T + D x_t and the chunk's
contribution to the state it hands on, S = sum_s exp(cs_last - cs_s) dt_s x_s B_s^T. Their
gradients:

    dx_s  = dt_s sum_{t>=s} CB_ts L_ts g_t + exp(cs_last - cs_s) dt_s dHout B_s + D g_s
    dB_s  = dt_s sum_{t>=s} dM_ts L_ts C_t + exp(cs_last - cs_s) dt_s x_s^T dHout  (sum over heads)
    dC_t  = sum_{s<=t} dM_ts L_ts dt_s B_s + exp(cs_t) g_t Hin                  (sum over heads)
    ddt_s = sum_{t>=s} dM_ts CB_ts L_ts + exp(cs_last - cs_s) x_s^T dHout B_s    (direct part)
    d cs_t: + sum_s W_ts (row), - sum_{t'} W_t's (column), W_ts = dM_ts M_ts,
            + g_t . exp(cs_t) C_t Hin^T,  - dt_t * (state part of ddt_t),
            + <dHout, H_c> at the chunk's last step (the decay of the whole chunk state).

The column half of d cs at step s is -dt_s * ddt_s (both parts: the W column sum over t is dt_s
times the intra part of ddt_s). The a = dt A path (reverse cumsum of d cs within the chunk) and
the dt preprocessing are left to triton_bwd_dt.py.

Column kernel (``_ssd_bwd_col_kernel``): one program per (batch, chunk, block of BLOCK_S source
steps s, group, head split). It loads B_s once and, for each head of its split, walks the
target blocks t >= s of the chunk: two products give the (s, t) tiles CB^T = B_s C_t^T (dstate
contraction) and dM^T = x_s g_t^T (headdim contraction); then dx_s += (CB^T L^T) g_t and
dB_s += (dM^T L^T dt_s) C_t on the tensor cores, ddt_s += row sums of dM^T CB^T L^T. The row
sums over s of W^T (the row half of d cs for the steps of block t) go to ``dcsw`` (NSB, batch,
nheads, LP) float32, slice = this source block (the diagonal block's sum stays in registers and
is stored with the column half). dB accumulates over the heads of the split in registers and is
stored once per split: ``dBp`` (n_split, batch, seqlen, ngroups, dstate) float32 partials,
summed by the host (deterministic; no atomics). Target and source blocks have one size, so
the diagonal tile is the first one.

Row kernel (``_ssd_bwd_row_kernel``): one program per (batch, chunk, block of BLOCK_M target steps
t, group, head split); for each head: g_t Hin (one product, headdim contraction) gives dC's
inter-chunk part and, dotted with C_t, the inter-chunk part of d cs (``dcso`` (batch, nheads,
LP)); then over source blocks s <= t: dM = g_t x_s^T and dC_t += (dM L dt_s) B_s. dC's partials
``dCp`` like dB's.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import _dot, _gate_grad_in, _lp, _seq_at, _seq_vec


@triton.jit
def _ssd_bwd_col_kernel(
    x_ptr, dy_ptr, z_ptr, B_ptr, C_ptr, D_ptr, seq_ptr, dtp_ptr, cs_ptr, dhout_ptr, hin_ptr,
    ypre_ptr,
    dx_ptr, dz_ptr, dBp_ptr, ddt_ptr, dcsw_ptr, dDp_ptr,
    L, H, P, N, G, NC, LP, HPG, HPS, NSPLIT, BATCH,
    s_x_b, s_x_l, s_x_h, s_x_p,
    s_dy_b, s_dy_l, s_dy_h, s_dy_p,
    s_z_b, s_z_l, s_z_h, s_z_p,
    s_B_b, s_B_l, s_B_g, s_B_n,
    s_C_b, s_C_l, s_C_g, s_C_n,
    s_seq_b, s_seq_l,
    s_dz_b, s_dz_l, s_dz_h, s_dz_p,
    HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr,
    DOT: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    NSB: tl.constexpr = CHUNK // BLOCK_S
    pid_k = tl.program_id(0)
    pid_bc = tl.program_id(1)
    pid_gs = tl.program_id(2)
    b = (pid_bc // NC).to(tl.int64)
    c = pid_bc % NC
    grp = pid_gs // NSPLIT
    split = pid_gs % NSPLIT
    c0 = c * CHUNK
    s0 = c0 + pid_k * BLOCK_S
    offs_p = tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    h_lo = grp * HPG + split * HPS
    h_hi = tl.minimum(h_lo + HPS, (grp + 1) * HPG)
    if s0 >= L:  # a block past the end of the last chunk: its dD partials are 0
        if HAS_D:
            for h in range(h_lo, h_hi):
                tl.store(dDp_ptr + (((b * NC + c) * NSB + pid_k) * H + h) * P + offs_p,
                         tl.zeros((BLOCK_P,), dtype=tl.float32), mask=mask_p)
        return
    c_end = tl.minimum(c0 + CHUNK, L)
    last = c_end - 1  # the chunk's last step
    offs_b = tl.arange(0, BLOCK_S)
    offs_s = s0 + offs_b
    ms = offs_s < L
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    msp = ms[:, None] & mask_p[None, :]
    mask_pn = mask_p[:, None] & mask_n[None, :]
    pn_off = offs_p[:, None] * N + offs_n[None, :]

    seq_base = seq_ptr + b * s_seq_b
    seq_s = _seq_vec(seq_base, offs_s * s_seq_l, ms, HAS_SEQ)
    seq_last = _seq_at(seq_base, last * s_seq_l, HAS_SEQ)
    B_base = B_ptr + b * s_B_b + grp * s_B_g
    C_base = C_ptr + b * s_C_b + grp * s_C_g
    Bs = tl.load(B_base + offs_s[:, None] * s_B_l + offs_n[None, :] * s_B_n,
                 mask=ms[:, None] & mask_n[None, :], other=0.0)
    dB_acc = tl.zeros((BLOCK_S, BLOCK_N), dtype=tl.float32)
    for h in tl.range(h_lo, h_hi, disable_licm=True):
        row_base = (b * H + h) * LP
        cs_s = tl.load(cs_ptr + row_base + offs_s, mask=ms, other=0.0)
        dt_s = tl.load(dtp_ptr + row_base + offs_s, mask=ms, other=0.0)
        cs_last = tl.load(cs_ptr + row_base + last)
        xs = tl.load(x_ptr + b * s_x_b + h * s_x_h + offs_s[:, None] * s_x_l
                     + offs_p[None, :] * s_x_p, mask=msp, other=0.0)

        dx_acc = tl.zeros((BLOCK_S, BLOCK_P), dtype=tl.float32)
        ddt_acc = tl.zeros((BLOCK_S,), dtype=tl.float32)
        w_diag = tl.zeros((BLOCK_S,), dtype=tl.float32)
        dcsw_row = dcsw_ptr + ((pid_k * BATCH + b) * H + h) * LP
        for t0 in tl.range(s0, c_end, BLOCK_S, disable_licm=True):
            offs_t = t0 + offs_b
            mt = offs_t < c_end
            mtp = mt[:, None] & mask_p[None, :]
            cs_t = tl.load(cs_ptr + row_base + offs_t, mask=mt, other=0.0)
            seq_t = _seq_vec(seq_base, offs_t * s_seq_l, mt, HAS_SEQ)
            Ct = tl.load(C_base + offs_t[:, None] * s_C_l + offs_n[None, :] * s_C_n,
                         mask=mt[:, None] & mask_n[None, :], other=0.0)
            dyt = tl.load(dy_ptr + b * s_dy_b + h * s_dy_h + offs_t[:, None] * s_dy_l
                          + offs_p[None, :] * s_dy_p, mask=mtp, other=0.0)
            zt = dyt
            if HAS_Z:
                zt = tl.load(z_ptr + b * s_z_b + h * s_z_h + offs_t[:, None] * s_z_l
                             + offs_p[None, :] * s_z_p, mask=mtp, other=0.0)
            gt = _lp(_gate_grad_in(dyt, zt, HAS_Z), DOT)
            cbT = _dot(Bs, tl.trans(Ct), DOT)  # (s, t)
            dmT = _dot(xs, tl.trans(gt), DOT)  # (s, t)
            keep = ((offs_t[None, :] >= offs_s[:, None]) & (seq_t[None, :] == seq_s[:, None])
                    & mt[None, :] & ms[:, None])
            LT = tl.exp(tl.where(keep, cs_t[None, :] - cs_s[:, None], float("-inf")))
            dx_acc += _dot(cbT * LT, gt, DOT)
            dmL = dmT * LT
            dB_acc += _dot(dmL * dt_s[:, None], Ct, DOT)
            wT = dmL * cbT
            ddt_acc += tl.sum(wT, axis=1)
            col = tl.sum(wT * dt_s[:, None], axis=0)  # row half of d cs at the steps t
            diag = offs_t < s0 + BLOCK_S  # all or none of the block: the diagonal tile
            w_diag = tl.where(diag, col, w_diag)
            tl.store(dcsw_row + offs_t, col, mask=mt & (~diag))

        # this block's own rows of g (loaded here, after the walk, to keep them out of its
        # registers)
        dys = tl.load(dy_ptr + b * s_dy_b + h * s_dy_h + offs_s[:, None] * s_dy_l
                      + offs_p[None, :] * s_dy_p, mask=msp, other=0.0)
        zs = dys
        if HAS_Z:
            zs = tl.load(z_ptr + b * s_z_b + h * s_z_h + offs_s[:, None] * s_z_l
                         + offs_p[None, :] * s_z_p, mask=msp, other=0.0)
        gs = _gate_grad_in(dys, zs, HAS_Z)
        # the chunk state's gradient dHout: S = sum_s exp(cs_last - cs_s) dt_s x_s B_s^T
        dH = tl.load(dhout_ptr + ((b * NC + c) * H + h) * P * N + pn_off, mask=mask_pn, other=0.0)
        wst = tl.exp(tl.where(ms & (seq_s == seq_last), cs_last - cs_s, float("-inf")))
        bdh = _dot(Bs, tl.trans(dH), DOT)  # (s, p)
        xdh = _dot(xs, dH, DOT)  # (s, n)
        xsf = xs.to(tl.float32)
        ddt_acc += wst * tl.sum(xsf * bdh, axis=1)
        dx = dt_s[:, None] * (dx_acc + wst[:, None] * bdh)
        dB_acc += (wst * dt_s)[:, None] * xdh
        if HAS_D:
            if D_PER_P:
                Dv = tl.load(D_ptr + h * P + offs_p, mask=mask_p, other=0.0).to(tl.float32)
                dx += Dv[None, :] * gs
            else:
                dx += tl.load(D_ptr + h).to(tl.float32) * gs
            tl.store(dDp_ptr + (((b * NC + c) * NSB + pid_k) * H + h) * P + offs_p,
                     tl.sum(gs * xsf, axis=0), mask=mask_p)
        tl.store(dx_ptr + (((b * L + offs_s[:, None]) * H + h) * P + offs_p[None, :]),
                 dx.to(dx_ptr.dtype.element_ty), mask=msp)
        tl.store(ddt_ptr + row_base + offs_s, ddt_acc, mask=ms)
        own = w_diag - dt_s * ddt_acc
        if last < s0 + BLOCK_S:  # this block holds the chunk's last step: d cs_last += <dHout, H_c>
            hc = tl.load(hin_ptr + ((b * (NC + 1) + c + 1) * H + h) * P * N + pn_off,
                         mask=mask_pn, other=0.0)
            own += tl.where(offs_s == last, tl.sum(tl.sum(dH * hc, axis=1), axis=0), 0.0)
        tl.store(dcsw_row + offs_s, own, mask=ms)
        if HAS_Z:  # dz = dy * ypre * silu'(z), ypre laid out like dx
            yp = tl.load(ypre_ptr + (((b * L + offs_s[:, None]) * H + h) * P + offs_p[None, :]),
                         mask=msp, other=0.0).to(tl.float32)
            zf = zs.to(tl.float32)
            sg = 1.0 / (1.0 + tl.exp(-zf))
            dz = dys.to(tl.float32) * yp * sg * (1.0 + zf * (1.0 - sg))
            tl.store(dz_ptr + b * s_dz_b + h * s_dz_h + offs_s[:, None] * s_dz_l
                     + offs_p[None, :] * s_dz_p, dz.to(dz_ptr.dtype.element_ty), mask=msp)

    tl.store(dBp_ptr + (((split * BATCH + b) * L + offs_s[:, None]) * G + grp) * N
             + offs_n[None, :], dB_acc, mask=ms[:, None] & mask_n[None, :])


@triton.jit
def _ssd_bwd_row_kernel(
    x_ptr, dy_ptr, z_ptr, B_ptr, C_ptr, seq_ptr, dtp_ptr, cs_ptr, hin_ptr,
    dCp_ptr, dcso_ptr,
    L, H, P, N, G, NC, LP, HPG, HPS, NSPLIT, BATCH,
    s_x_b, s_x_l, s_x_h, s_x_p,
    s_dy_b, s_dy_l, s_dy_h, s_dy_p,
    s_z_b, s_z_l, s_z_h, s_z_p,
    s_B_b, s_B_l, s_B_g, s_B_n,
    s_C_b, s_C_l, s_C_g, s_C_n,
    s_seq_b, s_seq_l,
    HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, DOT: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bc = tl.program_id(1)
    pid_gs = tl.program_id(2)
    b = (pid_bc // NC).to(tl.int64)
    c = pid_bc % NC
    grp = pid_gs // NSPLIT
    split = pid_gs % NSPLIT
    c0 = c * CHUNK
    t_start = c0 + pid_m * BLOCK_M
    if t_start >= L:
        return
    offs_t = t_start + tl.arange(0, BLOCK_M)
    mt = offs_t < L
    offs_p = tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    mtp = mt[:, None] & mask_p[None, :]
    mask_pn = mask_p[:, None] & mask_n[None, :]
    pn_off = offs_p[:, None] * N + offs_n[None, :]

    seq_base = seq_ptr + b * s_seq_b
    seq_t = _seq_vec(seq_base, offs_t * s_seq_l, mt, HAS_SEQ)
    seq_in = _seq_at(seq_base, tl.maximum(c0 - 1, 0) * s_seq_l, HAS_SEQ)
    B_base = B_ptr + b * s_B_b + grp * s_B_g
    Ct = tl.load(C_ptr + b * s_C_b + grp * s_C_g + offs_t[:, None] * s_C_l
                 + offs_n[None, :] * s_C_n, mask=mt[:, None] & mask_n[None, :], other=0.0)
    dC_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    s_hi = tl.minimum(t_start + BLOCK_M, L)

    h_lo = grp * HPG + split * HPS
    h_hi = tl.minimum(h_lo + HPS, (grp + 1) * HPG)
    for h in tl.range(h_lo, h_hi, disable_licm=True):
        row_base = (b * H + h) * LP
        cs_t = tl.load(cs_ptr + row_base + offs_t, mask=mt, other=0.0)
        dyt = tl.load(dy_ptr + b * s_dy_b + h * s_dy_h + offs_t[:, None] * s_dy_l
                      + offs_p[None, :] * s_dy_p, mask=mtp, other=0.0)
        zt = dyt
        if HAS_Z:
            zt = tl.load(z_ptr + b * s_z_b + h * s_z_h + offs_t[:, None] * s_z_l
                         + offs_p[None, :] * s_z_p, mask=mtp, other=0.0)
        gt = _lp(_gate_grad_in(dyt, zt, HAS_Z), DOT)
        # inter-chunk term y_t = exp(cs_t) C_t Hin^T
        hin = tl.load(hin_ptr + ((b * (NC + 1) + c) * H + h) * P * N + pn_off, mask=mask_pn,
                      other=0.0)
        e = tl.exp(tl.where(mt & (seq_t == seq_in), cs_t, float("-inf")))
        gh = _dot(gt, hin, DOT)  # (t, n)
        tl.store(dcso_ptr + row_base + offs_t, e * tl.sum(Ct.to(tl.float32) * gh, axis=1),
                 mask=mt)
        dC_acc += e[:, None] * gh
        x_base = x_ptr + b * s_x_b + h * s_x_h
        for s0 in tl.range(c0, s_hi, BLOCK_K, disable_licm=True):
            offs_s = s0 + offs_k
            ms = offs_s < s_hi
            cs_s = tl.load(cs_ptr + row_base + offs_s, mask=ms, other=0.0)
            dt_s = tl.load(dtp_ptr + row_base + offs_s, mask=ms, other=0.0)
            seq_s = _seq_vec(seq_base, offs_s * s_seq_l, ms, HAS_SEQ)
            xs = tl.load(x_base + offs_s[:, None] * s_x_l + offs_p[None, :] * s_x_p,
                         mask=ms[:, None] & mask_p[None, :], other=0.0)
            Bs = tl.load(B_base + offs_s[:, None] * s_B_l + offs_n[None, :] * s_B_n,
                         mask=ms[:, None] & mask_n[None, :], other=0.0)
            dm = _dot(gt, tl.trans(xs), DOT)  # (t, s)
            keep = ((offs_s[None, :] <= offs_t[:, None]) & (seq_s[None, :] == seq_t[:, None])
                    & ms[None, :] & mt[:, None])
            Lm = tl.exp(tl.where(keep, cs_t[:, None] - cs_s[None, :], float("-inf")))
            dC_acc += _dot(dm * Lm * dt_s[None, :], Bs, DOT)

    tl.store(dCp_ptr + (((split * BATCH + b) * L + offs_t[:, None]) * G + grp) * N
             + offs_n[None, :], dC_acc, mask=mt[:, None] & mask_n[None, :])
