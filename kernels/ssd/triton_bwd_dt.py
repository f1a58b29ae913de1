"""Triton backward kernel of the SSD step sizes: from the gradients of the chunk-local cumulative
sum cs and the direct gradient of dt to the gradients of dt (raw), A and dt_bias.

Per chunk and head, cs_t = sum_{r <= t} a_r with a_r = dt_r A, so

    d a_r = sum_{t >= r, same chunk} d cs_t        (a reverse cumulative sum)
    d dt_r (effective) = ddt_r + A d a_r,           dA += sum_r dt_r d a_r,

and the effective dt = clamp(softplus(dt_raw + dt_bias), lo, hi) passes the gradient through the
clamp where lo <= value <= hi (torch.clamp's rule) and through softplus as sigmoid(dt_raw +
dt_bias); d dt_bias is the sum of d dt_raw. d cs_t is the sum of the column kernel's slices
(``dcsw`` (NSB, batch, nheads, LP): slice k holds the terms computed by source block k, written
for the steps of blocks >= k only) and the row kernel's inter-chunk part (``dcso``); ``ddt`` is
the column kernel's direct part (triton_bwd_chunk.py).

One program per (batch, chunk, block of BLOCK_H heads) holds a (CHUNK, BLOCK_H) tile. dA and
d dt_bias leave as float32 partials per (batch, chunk), (batch * n_chunks, nheads), that the host
sums (deterministic).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import _dt_eff, _sigmoid


@triton.jit
def _ssd_bwd_dt_kernel(
    dt_ptr, A_ptr, bias_ptr, ddt_ptr, dcsw_ptr, dcso_ptr,
    ddt_out_ptr, dAp_ptr, dbp_ptr,
    L, H, NC, LP, BATCH, lo, hi,
    s_dt_b, s_dt_l, s_dt_h,
    s_do_b, s_do_l, s_do_h,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
    CHUNK: tl.constexpr, NSB: tl.constexpr, BLOCK_H: tl.constexpr,
):
    BLOCK_SC: tl.constexpr = CHUNK // NSB  # the column kernel's block of steps
    pid_bc = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = (pid_bc // NC).to(tl.int64)
    c = pid_bc % NC
    offs_q = tl.arange(0, CHUNK)
    offs_t = c * CHUNK + offs_q
    mt = offs_t < L
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mh = offs_h < H
    m2 = mt[:, None] & mh[None, :]
    off2 = (b * H + offs_h[None, :]) * LP + offs_t[:, None]

    ddt = tl.load(ddt_ptr + off2, mask=m2, other=0.0)
    dcs = tl.load(dcso_ptr + off2, mask=m2, other=0.0)
    blk = (offs_q // BLOCK_SC)[:, None]
    for k in tl.static_range(NSB):
        dcs += tl.load(dcsw_ptr + k * BATCH * H * LP + off2, mask=m2 & (blk >= k), other=0.0)
    da = tl.cumsum(dcs, axis=0, reverse=True)

    A = tl.load(A_ptr + offs_h, mask=mh, other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_H,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_h, mask=mh, other=0.0).to(tl.float32)
    raw = tl.load(dt_ptr + b * s_dt_b + offs_t[:, None] * s_dt_l + offs_h[None, :] * s_dt_h,
                  mask=m2, other=0.0).to(tl.float32)
    dtv = _dt_eff(raw, bias[None, :], m2, lo, hi, HAS_BIAS, False, False)  # before softplus
    if SOFTPLUS:
        sp = _dt_eff(raw, bias[None, :], m2, lo, hi, HAS_BIAS, True, False)
    else:
        sp = dtv
    dt_eff = sp
    if HAS_LIMIT:
        dt_eff = tl.minimum(tl.maximum(sp, lo), hi)
    tl.store(dAp_ptr + pid_bc * H + offs_h, tl.sum(tl.where(m2, da * dt_eff, 0.0), axis=0),
             mask=mh)

    g = ddt + da * A[None, :]
    if HAS_LIMIT:
        g = tl.where((sp >= lo) & (sp <= hi), g, 0.0)
    if SOFTPLUS:
        g = g * _sigmoid(dtv)
    g = tl.where(m2, g, 0.0)
    tl.store(ddt_out_ptr + b * s_do_b + offs_t[:, None] * s_do_l + offs_h[None, :] * s_do_h,
             g.to(ddt_out_ptr.dtype.element_ty), mask=m2)
    if HAS_BIAS:
        tl.store(dbp_ptr + pid_bc * H + offs_h, tl.sum(g, axis=0), mask=mh)
