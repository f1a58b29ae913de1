"""Triton forward kernel of the SSD output: the chunk scan.

Within chunk c (steps c Q .. c Q + Q - 1), per head, with cs the chunk-local cumulative sum of
a = dt A and Hin the state entering the chunk (triton_state.py):

    y_t = exp(cs_t) C_t Hin^T                                          (inter-chunk)
        + sum_{s <= t, same document} (C_t . B_s) exp(cs_t - cs_s) dt_s x_s   (intra-chunk)
        + D x_t,                      then y *= silu(z_t) when z is given.

The inter-chunk term reaches only steps in the document of the incoming state (the document of
the step before the chunk; for the first chunk the first document).

Tiling. One program computes a (BLOCK_M, BLOCK_P) tile of y: BLOCK_M steps of one chunk and
head, BLOCK_P of headdim. It loads C_t (BLOCK_M x dstate) once; the inter-chunk term is one
product C_t @ Hin^T (dstate contraction); then for each block of BLOCK_K source steps s up to
the tile's last step it forms the score tile C_t @ B_s^T (BLOCK_M x BLOCK_K, dstate
contraction), applies the masked decay exp(cs_t - cs_s) dt_s (argument -inf outside the causal,
same-document square: exp gives 0) and accumulates score @ x_s (BLOCK_K x BLOCK_P) on the tensor
cores, all in float32 accumulators. The whole dstate (padded to a power of two) is one operand
of each product. C B^T is recomputed per head (B and C are shared by the heads of a group):
this costs dstate / headdim times the score @ x product but needs no (chunk, Q, Q) buffer.

With z (and gradients wanted) the kernel also stores y before the gate, ``ypre``, which the
backward needs for dz.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import _dot, _seq_at, _seq_vec


@triton.jit
def _ssd_chunk_scan_fwd_kernel(
    x_ptr, z_ptr, B_ptr, C_ptr, D_ptr, seq_ptr, dtp_ptr, cs_ptr, hin_ptr,
    y_ptr, ypre_ptr,
    L, H, P, N, NC, LP, HPG,
    s_x_b, s_x_l, s_x_h, s_x_p,
    s_z_b, s_z_l, s_z_h, s_z_p,
    s_B_b, s_B_l, s_B_g, s_B_n,
    s_C_b, s_C_l, s_C_g, s_C_n,
    s_seq_b, s_seq_l,
    s_y_b, s_y_l, s_y_h, s_y_p,
    HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr,
    STORE_YPRE: tl.constexpr, DOT: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    N_MB: tl.constexpr = CHUNK // BLOCK_M
    pid0 = tl.program_id(0)
    pid_m = pid0 % N_MB
    pid_p = pid0 // N_MB
    pid_bc = tl.program_id(1)
    h = tl.program_id(2)
    b = (pid_bc // NC).to(tl.int64)
    c = pid_bc % NC
    c0 = c * CHUNK
    t_start = c0 + pid_m * BLOCK_M
    if t_start >= L:  # the last chunk is partial: nothing of this tile exists
        return
    grp = h // HPG
    offs_t = t_start + tl.arange(0, BLOCK_M)
    mt = offs_t < L
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    row_base = (b * H + h) * LP

    seq_base = seq_ptr + b * s_seq_b
    seq_t = _seq_vec(seq_base, offs_t * s_seq_l, mt, HAS_SEQ)
    seq_in = _seq_at(seq_base, tl.maximum(c0 - 1, 0) * s_seq_l, HAS_SEQ)  # incoming state's doc
    cs_t = tl.load(cs_ptr + row_base + offs_t, mask=mt, other=0.0)
    Ct = tl.load(C_ptr + b * s_C_b + grp * s_C_g + offs_t[:, None] * s_C_l
                 + offs_n[None, :] * s_C_n, mask=mt[:, None] & mask_n[None, :], other=0.0)

    # inter-chunk term: exp(cs_t) C_t Hin^T
    hin_off = ((b * (NC + 1) + c) * H + h) * P * N
    hin = tl.load(hin_ptr + hin_off + offs_p[:, None] * N + offs_n[None, :],
                  mask=mask_p[:, None] & mask_n[None, :], other=0.0)
    scale = tl.exp(tl.where(mt & (seq_t == seq_in), cs_t, float("-inf")))
    acc = _dot(Ct, tl.trans(hin), DOT) * scale[:, None]

    # intra-chunk term over the source blocks up to this tile's last step
    x_base = x_ptr + b * s_x_b + h * s_x_h
    B_base = B_ptr + b * s_B_b + grp * s_B_g
    s_hi = tl.minimum(t_start + BLOCK_M, L)
    for s0 in tl.range(c0, s_hi, BLOCK_K, disable_licm=True):
        offs_s = s0 + offs_k
        ms = offs_s < s_hi
        cs_s = tl.load(cs_ptr + row_base + offs_s, mask=ms, other=0.0)
        dt_s = tl.load(dtp_ptr + row_base + offs_s, mask=ms, other=0.0)
        seq_s = _seq_vec(seq_base, offs_s * s_seq_l, ms, HAS_SEQ)
        Bs = tl.load(B_base + offs_s[:, None] * s_B_l + offs_n[None, :] * s_B_n,
                     mask=ms[:, None] & mask_n[None, :], other=0.0)
        xs = tl.load(x_base + offs_s[:, None] * s_x_l + offs_p[None, :] * s_x_p,
                     mask=ms[:, None] & mask_p[None, :], other=0.0)
        cb = _dot(Ct, tl.trans(Bs), DOT)  # (BLOCK_M, BLOCK_K)
        keep = ((offs_s[None, :] <= offs_t[:, None]) & (seq_s[None, :] == seq_t[:, None])
                & ms[None, :] & mt[:, None])
        decay = tl.exp(tl.where(keep, cs_t[:, None] - cs_s[None, :], float("-inf")))
        acc += _dot(cb * decay * dt_s[None, :], xs, DOT)

    mtp = mt[:, None] & mask_p[None, :]
    if HAS_D:
        xt = tl.load(x_base + offs_t[:, None] * s_x_l + offs_p[None, :] * s_x_p, mask=mtp,
                     other=0.0).to(tl.float32)
        if D_PER_P:
            Dv = tl.load(D_ptr + h * P + offs_p, mask=mask_p, other=0.0).to(tl.float32)
            acc += Dv[None, :] * xt
        else:
            acc += tl.load(D_ptr + h).to(tl.float32) * xt
    y_off = b * s_y_b + h * s_y_h + offs_t[:, None] * s_y_l + offs_p[None, :] * s_y_p
    if STORE_YPRE:  # same layout as y
        tl.store(ypre_ptr + y_off, acc.to(ypre_ptr.dtype.element_ty), mask=mtp)
    if HAS_Z:
        zt = tl.load(z_ptr + b * s_z_b + h * s_z_h + offs_t[:, None] * s_z_l
                     + offs_p[None, :] * s_z_p, mask=mtp, other=0.0).to(tl.float32)
        acc = acc * zt / (1.0 + tl.exp(-zt))
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=mtp)
