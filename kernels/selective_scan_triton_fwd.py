"""Triton forward kernel of the selective scan (Mamba-1 S6), channel-last layout.

Math (DESIGN.md), per batch b, channel d, state index n, time t:

    dt_t = softplus(delta_t + delta_bias)          (or delta_t + delta_bias)
    a_t  = exp(dt_t * A[d, n])                     b_t = dt_t * u_t * B_t[n]
    h_t  = a_t * h_{t-1} + b_t                     (float32, h_{-1} = initial_state or 0)
    y_t  = sum_n C_t[n] h_t[n] + D[d] u_t          y_t *= silu(z_t) when z is given

Kernel design. The grid is (batch, dim blocks). One program owns a (BLOCK_D, BLOCK_N) tile of the
state in registers and walks time in chunks of BLOCK_T steps. Each chunk loads (BLOCK_T, BLOCK_D)
tiles of u / delta / z (contiguous along dim: coalesced in our (b, l, d) layout) and (BLOCK_T,
BLOCK_N) tiles of B / C, forms (a_t, b_t) on a (BLOCK_T, BLOCK_D, BLOCK_N) tile and solves the
linear recurrence with ``tl.associative_scan`` along time, combine
(a1, b1), (a2, b2) -> (a1 a2, a2 b1 + b2), then h_t = A_t h_carry + B_t. The carry for the next
chunk is the last row. Steps past the sequence end get a = 1, b = 0 so that the carry passes
through unchanged; padded state columns (n >= dstate) and channels (d >= dim) stay zero.

When gradients are needed the kernel also writes the state at the start of every chunk,
``ckpt`` (batch, n_chunks, dim, dstate) float32, which the backward kernel recomputes from: the
saved activations stay O(batch * seqlen * dim * dstate / BLOCK_T), never (b, l, d, n).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _softplus(x):
    """log(1 + exp(x)), stable: max(x, 0) + log(1 + exp(-|x|))."""
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _linrec_combine(a1, b1, a2, b2):
    """Compose two steps of h -> a h + b: first (a1, b1), then (a2, b2)."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
    y_ptr, hlast_ptr, ckpt_ptr,
    L, DIM, NSTATE, D_PER_G, n_chunks,
    s_u_b, s_u_l, s_u_d,
    s_dt_b, s_dt_l, s_dt_d,
    s_z_b, s_z_l, s_z_d,
    s_B_b, s_B_l, s_B_g, s_B_n,
    s_C_b, s_C_l, s_C_g, s_C_n,
    s_y_b, s_y_l, s_y_d,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_H0: tl.constexpr, STORE_HLAST: tl.constexpr,
    STORE_CKPT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    d0 = pid_d * BLOCK_D
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = d0 + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < DIM
    mask_n = offs_n < NSTATE
    mask_dn = mask_d[:, None] & mask_n[None, :]
    grp = d0 // D_PER_G  # the host picks BLOCK_D so that a block never straddles two groups

    A = tl.load(A_ptr + offs_d[:, None] * NSTATE + offs_n[None, :], mask=mask_dn, other=0.0)
    A = A.to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)

    state_off = offs_d[:, None] * NSTATE + offs_n[None, :]
    if HAS_H0:
        h = tl.load(h0_ptr + pid_b * DIM * NSTATE + state_off, mask=mask_dn, other=0.0)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)

    u_p = u_ptr + pid_b * s_u_b + offs_t[:, None] * s_u_l + offs_d[None, :] * s_u_d
    dt_p = delta_ptr + pid_b * s_dt_b + offs_t[:, None] * s_dt_l + offs_d[None, :] * s_dt_d
    z_p = z_ptr + pid_b * s_z_b + offs_t[:, None] * s_z_l + offs_d[None, :] * s_z_d
    y_p = y_ptr + pid_b * s_y_b + offs_t[:, None] * s_y_l + offs_d[None, :] * s_y_d
    B_p = B_ptr + pid_b * s_B_b + grp * s_B_g + offs_t[:, None] * s_B_l + offs_n[None, :] * s_B_n
    C_p = C_ptr + pid_b * s_C_b + grp * s_C_g + offs_t[:, None] * s_C_l + offs_n[None, :] * s_C_n
    ck_p = ckpt_ptr + pid_b * n_chunks * DIM * NSTATE + state_off

    last = offs_t[:, None, None] == BLOCK_T - 1
    for c in range(0, n_chunks):
        if STORE_CKPT:
            tl.store(ck_p, h, mask=mask_dn)
            ck_p += DIM * NSTATE
        t = c * BLOCK_T + offs_t
        mask_t = t < L
        mask_td = mask_t[:, None] & mask_d[None, :]
        mask_tn = mask_t[:, None] & mask_n[None, :]
        u = tl.load(u_p, mask=mask_td, other=0.0).to(tl.float32)
        dt = tl.load(dt_p, mask=mask_td, other=0.0).to(tl.float32)
        Bt = tl.load(B_p, mask=mask_tn, other=0.0).to(tl.float32)
        Ct = tl.load(C_p, mask=mask_tn, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt = dt + bias[None, :]
        if SOFTPLUS:
            dt = _softplus(dt)
        dt = tl.where(mask_td, dt, 0.0)  # a = 1, b = 0 past the end: the carry passes through

        a = tl.exp(dt[:, :, None] * A[None, :, :])
        bx = (dt * u)[:, :, None] * Bt[:, None, :]
        sa, sb = tl.associative_scan((a, bx), 0, _linrec_combine)
        hs = sa * h[None, :, :] + sb
        y = tl.sum(hs * Ct[:, None, :], axis=2)
        h = tl.sum(tl.where(last, hs, 0.0), axis=0)

        if HAS_D:
            y += Dv[None, :] * u
        if HAS_Z:
            zz = tl.load(z_p, mask=mask_td, other=0.0).to(tl.float32)
            y *= zz / (1.0 + tl.exp(-zz))
            z_p += BLOCK_T * s_z_l
        tl.store(y_p, y.to(y_ptr.dtype.element_ty), mask=mask_td)
        u_p += BLOCK_T * s_u_l
        dt_p += BLOCK_T * s_dt_l
        y_p += BLOCK_T * s_y_l
        B_p += BLOCK_T * s_B_l
        C_p += BLOCK_T * s_C_l

    if STORE_HLAST:
        tl.store(hlast_ptr + pid_b * DIM * NSTATE + state_off, h, mask=mask_dn)
