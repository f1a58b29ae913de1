"""Triton causal depthwise conv1d (forward + backward) and its one-token decoding update.

Same contract as ``ref.py`` (channel-last x (b, l, d), weight (d, w), bias (d,),
states (b, w-1, d) = the previous w-1 inputs, oldest first). Let ``xc`` be the state followed by x
along time (index i = 0 .. l+w-2; ``xc[i] = initial_state[i]`` for i < w-1, else
``x[i - (w-1)]``). Then

    pre[t] = bias + sum_k weight[:, k] * xc[t + k],     y[t] = silu(pre[t]) or pre[t]

Backward, with ``g[t] = dy[t] * silu'(pre[t])`` (``dy`` without SiLU; pre is recomputed, nothing
but the inputs is saved):

    dxc[i]       = sum_k weight[:, k] * g[i - k]          (0 <= i - k < l)
    dweight[:, k] = sum_{b, t} g[t] * xc[t + k],            dbias = sum_{b, t} g[t]

``dxc`` gives dx (i >= w-1) and d initial_state (i < w-1) in one pass. The final state is sliced
from (initial_state, x) with PyTorch ops, so autograd differentiates it without a kernel.

Packed documents (HAS_SEQ_IDX, seq_idx (b, l) integer): the pair (xc[i], output t) counts only
when xc[i]'s token is in t's document, seq_idx[i - (w-1)] == seq_idx[t], where the state's
positions (i < w-1) read seq_idx[0] (the initial state reaches the first document only). The
forward drops the other taps from its loads; the backward drops the same pairs from pre, dweight
(the xc tiles are masked against each row's output token) and dxc (g[i - k] is masked against
xc[i]'s document). The final state's inputs before the last document's start are zeroed with
PyTorch ops. Without seq_idx none of this is compiled in.

Tiles are (rows of time) x (channels); channels are the contiguous axis, so every load is a
coalesced row. The w shifted loads of one tile overlap and are served by L1/L2. Measured on an
H100 (bf16 B8 D4096 L2048 W4 + SiLU, CUDA graphs): forward 0.0986 ms, a device copy of
the same bytes 0.0909 (``_conv_fwd_kernel`` gives what each of its choices is worth).
There is no separate unmasked interior-tile path: one measured 5% slower (see
``_conv_fwd_kernel``). The forward tile can be pinned with HYBRIDSEQ_CONV_FWD=BL,BD,WARPS
(``hybridseq bench conv --sweep`` times candidates; none beat the autotuned default on the H100).
The tiles load each input row w times rather than walking a program's rows in order with the
last w-1 input rows in registers (each input row loaded once): that order measured slower on the
H100 (0.129-0.149 ms against 0.110 for the tile kernel).

``causal_conv1d_fwd`` / ``causal_conv1d_bwd``: the kernels without autograd, for fused callers
(the Mamba block's conv + projections node); the backward can write dx into a given strided
buffer (the x half of the in_proj gradient).

Under ``torch.compile`` the launches run as the custom ops ``hybridseq::causal_conv1d_fwd``
(with its autograd), ``causal_conv1d_bwd``, ``causal_conv1d_bwd_into`` (dx written into a given
buffer) and ``causal_conv1d_update`` (``kernels._ops``).

Backward: one fused kernel, one pass over x and dy, one write of dx. A program owns a chunk of
``BWD_CHUNK_ROWS`` rows of xc and walks it in tiles. g is computed once per row and shifted
across the tile's rows with ``tl.gather`` (tiles overlap by w-1 rows), or, in the other
autotuned variant and for w > 4, recomputed at each of the w shifts. dweight/dbias are
accumulated element-wise in registers over the whole chunk and reduced across rows once per
program into fp32 partials (b * n_chunks, w, d), summed in PyTorch: deterministic, no atomics.
Measured on an H100 (same shape, no state): backward kernel 0.354 ms; the byte floor (x, dy
read, dx written) is 1.5 device copies, about 0.16 ms.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._launch import launch
from .._ops import compiling, custom_op
from ..backend import interpreting
from .._utils import check_causal_conv1d_args, check_causal_conv1d_update_args

__all__ = ["causal_conv1d_triton", "causal_conv1d_update_triton", "causal_conv1d_fwd",
           "causal_conv1d_bwd"]

_INTERPRET = interpreting()  # Triton read the same variable when it decorated the kernels


def _alloc(shape, dtype, device):
    """Uninitialised output buffer (tests replace this to poison outputs with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


# The forward computes in-batch offsets in int32 while they stay below this (tests lower it to run
# the int64 path at small sizes).
I32_LIMIT = 2 ** 31
# Rows of time reduced by one backward program (dweight/dbias partials are per chunk). A multiple
# of every BL below. Tests lower it to exercise several chunks at small sizes.
BWD_CHUNK_ROWS = 256


@triton.jit
def _seq_at(q_base, t, L, sql):
    """seq_idx (this batch row: q_base) at token indices ``t`` clamped into [0, L): the initial
    state's positions (t < 0) read token 0's document."""
    return tl.load(q_base + tl.minimum(tl.maximum(t, 0), L - 1) * sql)


@triton.jit
def _load_xc(x_base, s_base, i, c, cmask, L, sxl, sxd, ssl, ssd,
             W: tl.constexpr, HAS_STATE: tl.constexpr, q_base, q_out, sql,
             HAS_SEQ_IDX: tl.constexpr):
    """fp32 tile of xc at time indices ``i`` (BL,) and channels ``c`` (BD,); 0 outside.
    HAS_SEQ_IDX: also 0 on the rows whose token's document is not q_out (BL,), the document of
    the output token each row feeds."""
    ix = i - (W - 1)
    mx = (ix >= 0) & (ix < L)
    if HAS_SEQ_IDX:
        same = _seq_at(q_base, ix, L, sql) == q_out
        mx = mx & same
    v = tl.load(x_base + ix.to(tl.int64)[:, None] * sxl + c[None, :] * sxd,
                mask=mx[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    if HAS_STATE:
        ms = (i >= 0) & (i < W - 1)
        if HAS_SEQ_IDX:
            ms = ms & same
        v += tl.load(s_base + i[:, None] * ssl + c[None, :] * ssd,
                     mask=ms[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    return v


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, s_ptr, q_ptr, y_ptr,
                     L, D,
                     sxb, sxl, sxd, swd, swk, ssb, ssl, ssd, sqb, sql, syb, syl, syd,
                     W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr,
                     HAS_SEQ_IDX: tl.constexpr,
                     SILU: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr,
                     EVEN_D: tl.constexpr, EVEN_L: tl.constexpr, I32: tl.constexpr):
    """y rows [pid_l*BL, +BL) x channels [pid_d*BD, +BD) of batch pid_b: one load per tap.

    EVEN_D (BD divides D): no channel mask. EVEN_L (BL divides L): every row of every tile is
    inside [0, L), so the loads test only the causal lower edge and the store no row. I32: the
    offsets inside one batch row fit in int32 (the launcher checks), so they are computed in
    32 bits (0.0996 against 0.1020 ms in one H100 run, equal in another). The
    output goes out with evict_first (streamed, not re-read), and the SiLU is
    acc / (1 + 2^(-acc log2 e)) with the approximate division (div.full.f32, 2 ulp).
    Measured on an H100 (B8 D4096 L2048 W4 bf16 + SiLU, CUDA graphs, three alternating
    rounds): these together 0.0986 ms against 0.1036 with IEEE division and every mask, a copy
    of the same bytes 0.0909; the lower-edge-only row mask alone was worth about 2%, the
    division about 2.5%. (An unmasked interior-tile branch measured 5% slower; the SiLU through
    inline-PTX ex2/rcp 10% slower.)
    HAS_SEQ_IDX: each tap's loads also skip the rows whose input lies in an earlier document than
    the row's output token (the state's rows count as token 0's document)."""
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    t = pid_l * BL + tl.arange(0, BL)
    c = pid_d * BD + tl.arange(0, BD)
    if EVEN_D:
        cmask = tl.full((BD,), 1, tl.int1)
    else:
        cmask = c < D
    x_base = x_ptr + pid_b * sxb
    s_base = s_ptr + pid_b * ssb
    if HAS_SEQ_IDX:
        q_base = q_ptr + pid_b * sqb
        q_t = _seq_at(q_base, t, L, sql)  # the document of each output row
    acc = tl.zeros((BL, BD), dtype=tl.float32)
    for k in tl.static_range(W):
        wk = tl.load(w_ptr + c * swd + k * swk, mask=cmask, other=0.0).to(tl.float32)
        ix = t + (k - (W - 1))
        if EVEN_L:
            mx = ix >= 0
        else:
            mx = (ix >= 0) & (ix < L)
        if HAS_SEQ_IDX and k < W - 1:  # only inputs of the output token's own document (tap
            # w-1 reads the output token itself)
            same = _seq_at(q_base, ix, L, sql) == q_t
            mx = mx & same
        if I32:
            rows = ix
        else:
            rows = ix.to(tl.int64)
        xv = tl.load(x_base + rows[:, None] * sxl + c[None, :] * sxd,
                     mask=mx[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        if HAS_STATE:
            i = t + k
            ms = i < W - 1
            if HAS_SEQ_IDX and k < W - 1:
                ms = ms & same
            xv += tl.load(s_base + i[:, None] * ssl + c[None, :] * ssd,
                          mask=ms[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        acc += xv * wk[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if SILU:
        acc = tl.fdiv(acc, 1.0 + tl.exp2(acc * -1.4426950408889634), ieee_rounding=False)
    if I32:
        y_ptrs = y_ptr + pid_b * syb + t[:, None] * syl + c[None, :] * syd
    else:
        y_ptrs = y_ptr + pid_b * syb + t.to(tl.int64)[:, None] * syl + c[None, :] * syd
    if EVEN_L:
        ymask = tl.full((BL, 1), 1, tl.int1) & cmask[None, :]
    else:
        ymask = (t < L)[:, None] & cmask[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=ymask, eviction_policy="evict_first")


@triton.jit
def _silu_grad(dy, pre, FAST: tl.constexpr):
    """dy * silu'(pre), silu'(p) = sig(p) * (1 + p * (1 - sig(p))).

    FAST (compiled GPU code only): sig from the flush-to-zero approximate ex2 and rcp (two
    instructions instead of about ten with the denormal/range fix-ups of ``tl.exp`` and ``/``;
    relative error about 1e-7). The backward evaluates w sigmoids per element, so this matters.
    """
    if FAST:
        e = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f",
                                      [pre * -1.4426950408889634], dtype=tl.float32,
                                      is_pure=True, pack=1)
        sig = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [1.0 + e],
                                        dtype=tl.float32, is_pure=True, pack=1)
    else:
        sig = 1.0 / (1.0 + tl.exp(-pre))
    return dy * sig * (1.0 + pre * (1.0 - sig))


@triton.jit
def _load_dy(g_base, t, c, cmask, L, sgl, sgd):
    """fp32 tile of dy at output times ``t`` (BL,); 0 where t is outside [0, l)."""
    return tl.load(g_base + t.to(tl.int64)[:, None] * sgl + c[None, :] * sgd,
                   mask=((t >= 0) & (t < L))[:, None] & cmask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _load_w(w_ptr, c, cmask, k, swd, swk):
    """fp32 (BD,) column k of the weight."""
    return tl.load(w_ptr + c * swd + k * swk, mask=cmask, other=0.0).to(tl.float32)


@triton.jit
def _g_generic(x_base, s_base, g_base, w_ptr, bias, t, c, cmask, L, sxl, sxd, ssl, ssd, sgl, sgd,
               swd, swk, W: tl.constexpr, HAS_STATE: tl.constexpr, SILU: tl.constexpr,
               FAST: tl.constexpr, q_base, q_t, sql, HAS_SEQ_IDX: tl.constexpr):
    """g at output times ``t``, any width: dy times silu'(pre), pre recomputed from xc
    (HAS_SEQ_IDX: from the inputs of each time's document q_t only)."""
    g = _load_dy(g_base, t, c, cmask, L, sgl, sgd)
    if SILU:
        pre = tl.zeros(g.shape, dtype=tl.float32) + bias[None, :]
        for m in tl.static_range(W):
            pre += _load_w(w_ptr, c, cmask, m, swd, swk)[None, :] * _load_xc(
                x_base, s_base, t + m, c, cmask, L, sxl, sxd, ssl, ssd, W, HAS_STATE,
                q_base, q_t, sql, HAS_SEQ_IDX)
        g = _silu_grad(g, pre, FAST)
    return g


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, b_ptr, s_ptr, q_ptr, dy_ptr, dx_ptr, ds_ptr, dw_ptr, db_ptr,
                     L, D, CHUNK,
                     sxb, sxl, sxd, swd, swk, ssb, ssl, ssd, sqb, sql, sgb, sgl, sgd,
                     sdxb, sdxl, sdxd, sdsb, sdsl, sdsd,
                     W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr,
                     HAS_SEQ_IDX: tl.constexpr,
                     SILU: tl.constexpr, W_P2: tl.constexpr, FAST: tl.constexpr,
                     BL: tl.constexpr, BD: tl.constexpr, GATHER: tl.constexpr):
    """dxc rows [pid_ch*CHUNK, +CHUNK) x channels [pid_d*BD, +BD) of batch pid_b, and this
    program's dweight/dbias partials. Programs are independent: no scratch, no barrier.

    dxc at rows i needs g at times i - k (k < w). GATHER (w <= 4): a tile of BL rows computes g
    once per row and takes g[i - k] from row r - k of the same tile (tl.gather); consecutive
    tiles overlap by w-1 rows and each stores only the rows it owns. Otherwise (GATHER=0, or
    w > 4) g at each shift is recomputed from the cached inputs (w sigmoids per element; for
    w <= 4 the 2w-1 input tiles are loaded once and shared). g at times i also feeds dbias and
    dweight: taps 0..3 are accumulated element-wise in registers over the whole chunk and
    reduced across rows once at the end; taps >= 4 (widths above 4) are reduced per tile.

    HAS_SEQ_IDX: the xc tiles at rows i + j are masked against the document of output time i
    (so pre and dweight see only same-document pairs), and g[i - k] enters dxc[i] only when
    time i - k is in xc[i]'s document. Without GATHER the g at the shifts i - k comes from the
    recomputing path (the cached tiles were masked for time i, not i - k).
    """
    pid_ch = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2)
    n_chunks = tl.num_programs(0)
    pid_b64 = pid_b.to(tl.int64)
    c = pid_d * BD + tl.arange(0, BD)
    cmask = c < D
    x_base = x_ptr + pid_b64 * sxb
    s_base = s_ptr + pid_b64 * ssb
    g_base = dy_ptr + pid_b64 * sgb
    q_base = q_ptr + pid_b64 * sqb
    if HAS_BIAS:
        bias = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BD,), dtype=tl.float32)
    # loop-invariant taps (those past w are never used)
    w0 = _load_w(w_ptr, c, cmask, 0, swd, swk)
    w1 = w0
    w2 = w0
    w3 = w0
    if W > 1:
        w1 = _load_w(w_ptr, c, cmask, 1, swd, swk)
    if W > 2:
        w2 = _load_w(w_ptr, c, cmask, 2, swd, swk)
    if W > 3:
        w3 = _load_w(w_ptr, c, cmask, 3, swd, swk)
    acc0 = tl.zeros((BL, BD), dtype=tl.float32)  # sum over t of g[t] * xc[t + k], k = 0..3
    acc1 = tl.zeros((BL, BD), dtype=tl.float32)
    acc2 = tl.zeros((BL, BD), dtype=tl.float32)
    acc3 = tl.zeros((BL, BD), dtype=tl.float32)
    accb = tl.zeros((BL, BD), dtype=tl.float32)  # sum over t of g[t]
    kk = tl.arange(0, W_P2)
    dw_tail = tl.zeros((W_P2, BD), dtype=tl.float32)  # taps >= 4, reduced per tile
    n_rows = L + W - 1
    start = pid_ch * CHUNK
    end = tl.minimum(start + CHUNK, n_rows)
    # GATHER (w <= 4): tiles overlap by HALO = w-1 rows; g is computed once per tile row and
    # shifted across rows with tl.gather (warp shuffles); a tile owns its last BL - HALO rows.
    SHIFT: tl.constexpr = GATHER * (W <= 4)
    HALO: tl.constexpr = (W - 1) * SHIFT
    # without GATHER, g at the shifts i - k from the cached tiles (w <= 4, no seq_idx), else
    # recomputed
    CACHED: tl.constexpr = (W <= 4) * (1 - HAS_SEQ_IDX)
    r = tl.arange(0, BL)
    for i0 in range(start, end, BL - HALO):
        i = i0 - HALO + r
        if HAS_SEQ_IDX:
            q_i = _seq_at(q_base, i, L, sql)  # the document of output time i
            q_x = _seq_at(q_base, i - (W - 1), L, sql)  # the document of xc[i]
        else:
            q_i = i  # not read
        # xc tiles at rows i + j; those of j >= 0 are kept for dweight
        x0 = _load_xc(x_base, s_base, i, c, cmask, L, sxl, sxd, ssl, ssd, W, HAS_STATE,
                      q_base, q_i, sql, HAS_SEQ_IDX)
        x1 = x0
        x2 = x0
        x3 = x0
        if W > 1:
            x1 = _load_xc(x_base, s_base, i + 1, c, cmask, L, sxl, sxd, ssl, ssd, W, HAS_STATE,
                          q_base, q_i, sql, HAS_SEQ_IDX)
        if W > 2:
            x2 = _load_xc(x_base, s_base, i + 2, c, cmask, L, sxl, sxd, ssl, ssd, W, HAS_STATE,
                          q_base, q_i, sql, HAS_SEQ_IDX)
        if W > 3:
            x3 = _load_xc(x_base, s_base, i + 3, c, cmask, L, sxl, sxd, ssl, ssd, W, HAS_STATE,
                          q_base, q_i, sql, HAS_SEQ_IDX)
        # k = 0: g at times t = i (each time of the chunk once; 0 past l)
        g = _load_dy(g_base, i, c, cmask, L, sgl, sgd)
        if SILU:
            pre = w0[None, :] * x0 + bias[None, :]
            if W > 1:
                pre += w1[None, :] * x1
            if W > 2:
                pre += w2[None, :] * x2
            if W > 3:
                pre += w3[None, :] * x3
            for m in tl.static_range(4, W):
                pre += _load_w(w_ptr, c, cmask, m, swd, swk)[None, :] * _load_xc(
                    x_base, s_base, i + m, c, cmask, L, sxl, sxd, ssl, ssd, W, HAS_STATE,
                    q_base, q_i, sql, HAS_SEQ_IDX)
            g = _silu_grad(g, pre, FAST)
        if SHIFT:
            own = (r >= HALO) & (i < end)  # rows of this tile that no other tile counts
            go = tl.where(own[:, None], g, 0.0)
        else:
            go = g  # the tile lies inside the chunk (CHUNK is a multiple of BL)
        accb += go
        acc0 += go * x0
        if W > 1:
            acc1 += go * x1
        if W > 2:
            acc2 += go * x2
        if W > 3:
            acc3 += go * x3
        for m in tl.static_range(4, W):
            xm = _load_xc(x_base, s_base, i + m, c, cmask, L, sxl, sxd, ssl, ssd, W, HAS_STATE,
                          q_base, q_i, sql, HAS_SEQ_IDX)
            dw_tail += tl.where((kk == m)[:, None], tl.sum(go * xm, axis=0)[None, :], 0.0)
        # dxc[i] = sum_k weight[:, k] * g[i - k]. With seq_idx, g[i - k] counts when time i - k
        # is in xc[i]'s document; for k = w-1, time i - k is xc[i]'s own token: no test.
        if HAS_SEQ_IDX and W > 1:
            dxc = w0[None, :] * tl.where((q_x == q_i)[:, None], g, 0.0)
        else:
            dxc = w0[None, :] * g
        if SHIFT:  # g[i - k] is row r - k of this tile (rows r < HALO are not stored)
            zi = tl.zeros((BL, BD), dtype=tl.int32)
            if W > 1:
                g1 = tl.gather(g, tl.maximum(r - 1, 0)[:, None] + zi, 0)
                if HAS_SEQ_IDX and W > 2:
                    g1 = tl.where((_seq_at(q_base, i - 1, L, sql) == q_x)[:, None], g1, 0.0)
                dxc += w1[None, :] * g1
            if W > 2:
                g2 = tl.gather(g, tl.maximum(r - 2, 0)[:, None] + zi, 0)
                if HAS_SEQ_IDX and W > 3:
                    g2 = tl.where((_seq_at(q_base, i - 2, L, sql) == q_x)[:, None], g2, 0.0)
                dxc += w2[None, :] * g2
            if W > 3:  # k = 3 = w-1 (SHIFT needs w <= 4)
                dxc += w3[None, :] * tl.gather(g, tl.maximum(r - 3, 0)[:, None] + zi, 0)
        elif CACHED:
            if W > 1:
                xm1 = _load_xc(x_base, s_base, i - 1, c, cmask, L, sxl, sxd, ssl, ssd, W,
                               HAS_STATE, q_base, q_i, sql, HAS_SEQ_IDX)
                g1 = _load_dy(g_base, i - 1, c, cmask, L, sgl, sgd)
                if SILU:  # pre[i - 1] = bias + sum_m w_m xc[i - 1 + m]
                    pre = w0[None, :] * xm1 + bias[None, :] + w1[None, :] * x0
                    if W > 2:
                        pre += w2[None, :] * x1
                    if W > 3:
                        pre += w3[None, :] * x2
                    g1 = _silu_grad(g1, pre, FAST)
                dxc += w1[None, :] * g1
            if W > 2:
                xm2 = _load_xc(x_base, s_base, i - 2, c, cmask, L, sxl, sxd, ssl, ssd, W,
                               HAS_STATE, q_base, q_i, sql, HAS_SEQ_IDX)
                g2 = _load_dy(g_base, i - 2, c, cmask, L, sgl, sgd)
                if SILU:
                    pre = w0[None, :] * xm2 + bias[None, :] + w1[None, :] * xm1 + w2[None, :] * x0
                    if W > 3:
                        pre += w3[None, :] * x1
                    g2 = _silu_grad(g2, pre, FAST)
                dxc += w2[None, :] * g2
            if W > 3:
                xm3 = _load_xc(x_base, s_base, i - 3, c, cmask, L, sxl, sxd, ssl, ssd, W,
                               HAS_STATE, q_base, q_i, sql, HAS_SEQ_IDX)
                g3 = _load_dy(g_base, i - 3, c, cmask, L, sgl, sgd)
                if SILU:
                    pre = (w0[None, :] * xm3 + bias[None, :] + w1[None, :] * xm2
                           + w2[None, :] * xm1 + w3[None, :] * x0)
                    g3 = _silu_grad(g3, pre, FAST)
                dxc += w3[None, :] * g3
        else:
            for k in tl.static_range(1, W):
                if HAS_SEQ_IDX:
                    q_k = _seq_at(q_base, i - k, L, sql)  # the document of time i - k
                else:
                    q_k = i  # not read
                gk = _g_generic(x_base, s_base, g_base, w_ptr, bias, i - k, c, cmask, L, sxl,
                                sxd, ssl, ssd, sgl, sgd, swd, swk, W, HAS_STATE, SILU, FAST,
                                q_base, q_k, sql, HAS_SEQ_IDX)
                if HAS_SEQ_IDX and k < W - 1:  # time i - k sees xc[i] within one document
                    gk = tl.where((q_k == q_x)[:, None], gk, 0.0)
                dxc += _load_w(w_ptr, c, cmask, k, swd, swk)[None, :] * gk
        ix = i - (W - 1)
        mx = (ix >= 0) & (ix < L)
        if SHIFT:
            mx = mx & own
        tl.store(dx_ptr + pid_b64 * sdxb + ix.to(tl.int64)[:, None] * sdxl + c[None, :] * sdxd,
                 dxc.to(dx_ptr.dtype.element_ty), mask=mx[:, None] & cmask[None, :])
        if HAS_STATE:
            ms = (i >= 0) & (i < W - 1)
            if SHIFT:
                ms = ms & own
            tl.store(ds_ptr + pid_b64 * sdsb + i[:, None] * sdsl + c[None, :] * sdsd,
                     dxc.to(ds_ptr.dtype.element_ty), mask=ms[:, None] & cmask[None, :])
    part = (pid_b * n_chunks + pid_ch).to(tl.int64)
    dw_base = dw_ptr + part * W * D + c
    tl.store(dw_base, tl.sum(acc0, axis=0), mask=cmask)
    if W > 1:
        tl.store(dw_base + D, tl.sum(acc1, axis=0), mask=cmask)
    if W > 2:
        tl.store(dw_base + 2 * D, tl.sum(acc2, axis=0), mask=cmask)
    if W > 3:
        tl.store(dw_base + 3 * D, tl.sum(acc3, axis=0), mask=cmask)
    if W > 4:
        tl.store(dw_base + kk[:, None] * D, dw_tail,
                 mask=((kk >= 4) & (kk < W))[:, None] & cmask[None, :])
    tl.store(db_ptr + part * D + c, tl.sum(accb, axis=0), mask=cmask)


@triton.jit
def _conv_update_kernel(x_ptr, s_ptr, w_ptr, b_ptr, y_ptr, ns_ptr,
                        D,
                        sxb, sxd, ssb, ssl, ssd, swd, swk, syb, syd, snb, snl, snd,
                        W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                        BD: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BD + tl.arange(0, BD)
    cmask = c < D
    xv = tl.load(x_ptr + pid_b * sxb + c * sxd, mask=cmask, other=0.0)
    acc = xv.to(tl.float32) * tl.load(w_ptr + c * swd + (W - 1) * swk, mask=cmask,
                                      other=0.0).to(tl.float32)
    for k in tl.static_range(W - 1):
        sk = tl.load(s_ptr + pid_b * ssb + k * ssl + c * ssd, mask=cmask, other=0.0)
        acc += sk.to(tl.float32) * tl.load(w_ptr + c * swd + k * swk, mask=cmask,
                                           other=0.0).to(tl.float32)
        if k >= 1:
            tl.store(ns_ptr + pid_b * snb + (k - 1) * snl + c * snd, sk, mask=cmask)
    if W >= 2:
        tl.store(ns_ptr + pid_b * snb + (W - 2) * snl + c * snd,
                 xv.to(ns_ptr.dtype.element_ty), mask=cmask)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))
    tl.store(y_ptr + pid_b * syb + c * syd, acc.to(y_ptr.dtype.element_ty), mask=cmask)


# Candidate block shapes, autotuned per _TUNE_KEY (below) on the first call. The forward
# list is the best five of a sweep on an H100 (bf16 B8 D4096 L2048 W4 + SiLU:
# BL32 BD128 w4 0.104 ms, BL16 BD256 0.109, BL64 BD128 0.117, BL32 BD256 0.117, BL64 BD64 w2 0.120;
# taller tiles and 8 warps were slower, 0.13-0.18 ms). ``hybridseq bench conv --sweep`` redoes it.
FWD_CONFIGS = [
    triton.Config({"BL": bl, "BD": bd}, num_warps=nw)
    for bl, bd, nw in ((32, 128, 4), (16, 256, 4), (64, 128, 4), (32, 256, 4), (64, 64, 2))
]
# Backward, two variants (for w <= 4; wider kernels always recompute), both autotuned:
# GATHER=1 computes g once per row and shifts it with tl.gather, on tiles that overlap by w-1
# rows; GATHER=0 recomputes g at the w shifts (fewer registers per row, more arithmetic).
# Measured on an H100 (triton 3.6, bf16 B8 D4096 L2048 W4 + SiLU, autotuner's
# kernel times): without a state GATHER=0 wins (BL16 BD64 w4 0.354 ms, BL8 BD128 w4 0.356;
# GATHER=1 0.387 to 0.489 here, 0.58 to 0.65 for BL32 BD64 w8/w16, left out of the list);
# with an initial state the autotuner picked GATHER=1 BL16 BD64 w4.
BWD_CONFIGS = [
    triton.Config({"BL": bl, "BD": bd, "GATHER": gather}, num_warps=nw)
    for bl, bd, nw, gather in ((16, 64, 4, 0), (8, 128, 4, 0), (32, 32, 4, 1), (16, 64, 8, 1),
                               (16, 64, 4, 1))
]
# EVEN_D / EVEN_L (BD divides D / BL divides L: fewer masks) follow from each config's tile; the
# same rules serve the autotuner's wrapper and the direct launch of a tuned config (_launch_fwd)
_FWD_HEUR = {"EVEN_D": lambda a: a["D"] % a["BD"] == 0, "EVEN_L": lambda a: a["L"] % a["BL"] == 0}
_conv_fwd_heur = triton.heuristics(_FWD_HEUR)(_conv_fwd_kernel)
_TUNE_KEY = ["D", "W", "HAS_STATE", "HAS_SEQ_IDX", "SILU"]
_conv_fwd_tuned = triton.autotune(FWD_CONFIGS, key=_TUNE_KEY)(_conv_fwd_heur)
_conv_bwd_tuned = triton.autotune(BWD_CONFIGS, key=_TUNE_KEY)(_conv_bwd_kernel)
# Under the interpreter (CPU tests) one small tile, no autotuning.
_INTERP_META = {"BL": 32, "BD": 32, "num_warps": 1}
_INTERP_BWD = {"GATHER": 1}  # the backward's variant under the interpreter (tests set both)
# Autotuned choices, so that later launches skip the autotuner's Python overhead:
# (kind, D, W, HAS_STATE, SILU, dtypes, device[, "seq_idx"]) -> (config kwargs, num_warps).
_TUNED: dict = {}
# Forward tiles that ``hybridseq bench conv --sweep`` times one by one (a superset of
# FWD_CONFIGS: taller tiles, 2 and 8 warps), (BL, BD, warps).
SWEEP_FWD_CONFIGS = [(32, 128, 4), (16, 256, 4), (64, 128, 4), (32, 256, 4), (64, 64, 2),
                     (32, 128, 2), (64, 128, 8), (128, 128, 8), (64, 256, 8)]
FWD_PIN_ENV = "HYBRIDSEQ_CONV_FWD"


def parse_fwd_pin(text):
    """``"BL,BD,NUM_WARPS"`` (``x`` also separates), powers of two -> (BL, BD, num_warps); None
    for an empty string."""
    if not text:
        return None
    parts = text.replace("x", ",").split(",")
    if len(parts) == 4:  # the old "BL,BD,NUM_WARPS,roll" form
        raise ValueError(f"{FWD_PIN_ENV}={text!r}: the 4th field is no longer accepted (the roll "
                         "forward variant was removed); expected BL,BD,NUM_WARPS, e.g. 32,128,4")
    try:
        if len(parts) != 3:
            raise ValueError
        bl, bd, nw = (int(v) for v in parts)
    except ValueError:
        raise ValueError(f"{FWD_PIN_ENV}={text!r}: expected BL,BD,NUM_WARPS, e.g. 32,128,4"
                         ) from None
    if any(v < 1 or v & (v - 1) for v in (bl, bd, nw)):
        raise ValueError(f"{FWD_PIN_ENV}={text!r}: BL, BD and NUM_WARPS must be powers of two")
    return bl, bd, nw


# The forward tile pinned by the environment (no autotuning), or None: autotune FWD_CONFIGS.
FWD_PIN = parse_fwd_pin(os.environ.get(FWD_PIN_ENV, ""))


def _launch(kernel, tuned, grid_fn, args, consts, key, heur=None):
    """Launch ``kernel`` (a @triton.jit function) with the tuned config for ``key`` (autotune
    on the first call, through ``tuned``); ``heur(meta)``: constexprs that follow from the
    config (what a triton.heuristics wrapper in ``tuned`` computes)."""
    hit = _TUNED.get(key)
    if hit is not None:
        meta, nw = hit
        extra = heur(meta) if heur is not None else {}
        launch(kernel, grid_fn(meta), args, {**consts, **meta, **extra}, num_warps=nw)
        return
    tuned[grid_fn](*args, **consts)
    cfg = tuned.best_config
    _TUNED[key] = (dict(cfg.kwargs), cfg.num_warps)


def fwd_key(x, weight, state, silu, seq_idx=None):
    """The key under which the forward's tuned config is cached (see ``_TUNED``)."""
    key = ("fwd", x.shape[2], weight.shape[1], state is not None, bool(silu), x.dtype,
           weight.dtype, x.device)
    return key + ("seq_idx",) if seq_idx is not None else key


def _seq_args(seq_idx, dummy):
    """The kernels' (q_ptr, sqb, sql): seq_idx and its strides, or a dummy pointer (never read)
    and zeros."""
    if seq_idx is None:
        return dummy, 0, 0
    return seq_idx, seq_idx.stride(0), seq_idx.stride(1)


def _launch_fwd(x, weight, bias, state, silu, seq_idx=None):
    b, l, d = x.shape
    w = weight.shape[1]
    y = _alloc((b, l, d), dtype=x.dtype, device=x.device)
    if b == 0 or l == 0 or d == 0:
        return y
    s = state if state is not None else x  # dummy pointer, never read
    q, sqb, sql = _seq_args(seq_idx, x)
    args = (x, weight, bias if bias is not None else weight, s, q, y, l, d,
            *x.stride(), *weight.stride(),
            *(state.stride() if state is not None else (0, 0, 0)), sqb, sql, *y.stride())
    # I32: every in-batch offset the kernel forms (rows up to l + BL, channels up to d + BD) fits
    # in int32 for x and y (the state's offsets are tiny)
    reach = lambda t: (l + 256) * abs(t.stride(1)) + (d + 1024) * abs(t.stride(2))  # noqa: E731
    consts = dict(W=w, HAS_BIAS=bias is not None, HAS_STATE=state is not None,
                  HAS_SEQ_IDX=seq_idx is not None, SILU=silu,
                  I32=max(reach(x), reach(y)) < I32_LIMIT)
    grid_fn = lambda META: (triton.cdiv(l, META["BL"]), triton.cdiv(d, META["BD"]), b)  # noqa: E731
    if _INTERPRET:
        _conv_fwd_heur[grid_fn(_INTERP_META)](*args, **consts, **_INTERP_META)
        return y
    key = fwd_key(x, weight, state, silu, seq_idx)
    if FWD_PIN is not None and key not in _TUNED:
        _TUNED[key] = ({"BL": FWD_PIN[0], "BD": FWD_PIN[1]}, FWD_PIN[2])
    _launch(_conv_fwd_kernel, _conv_fwd_tuned, grid_fn, args, consts, key,
            heur=lambda meta: {k: rule({"D": d, "L": l, **meta}) for k, rule in _FWD_HEUR.items()})
    return y


def _launch_bwd(x, weight, bias, state, dy, silu, dx_out=None, seq_idx=None):
    b, l, d = x.shape
    w = weight.shape[1]
    dx = _alloc((b, l, d), dtype=x.dtype, device=x.device) if dx_out is None else dx_out
    ds = (_alloc((b, w - 1, d), dtype=state.dtype, device=x.device)
          if state is not None else None)
    chunk = BWD_CHUNK_ROWS
    n_chunks = triton.cdiv(l + w - 1, chunk)
    dw_part = _alloc((b * n_chunks, w, d), dtype=torch.float32, device=x.device)
    db_part = _alloc((b * n_chunks, d), dtype=torch.float32, device=x.device)
    s = state if state is not None else x
    q, sqb, sql = _seq_args(seq_idx, x)
    args = (x, weight, bias if bias is not None else weight, s, q, dy, dx,
            ds if ds is not None else dx, dw_part, db_part, l, d, chunk,
            *x.stride(), *weight.stride(),
            *(state.stride() if state is not None else (0, 0, 0)), sqb, sql, *dy.stride(),
            *dx.stride(), *(ds.stride() if ds is not None else (0, 0, 0)))
    consts = dict(W=w, HAS_BIAS=bias is not None, HAS_STATE=state is not None,
                  HAS_SEQ_IDX=seq_idx is not None, SILU=silu,
                  W_P2=triton.next_power_of_2(w), FAST=not _INTERPRET)  # FAST: inline PTX
    grid_fn = lambda META: (n_chunks, triton.cdiv(d, META["BD"]), b)  # noqa: E731
    if _INTERPRET:
        if chunk % _INTERP_META["BL"]:
            raise ValueError(f"BWD_CHUNK_ROWS={chunk} must be a multiple of {_INTERP_META['BL']}")
        _conv_bwd_kernel[grid_fn(_INTERP_META)](*args, **consts, **_INTERP_META, **_INTERP_BWD)
    else:
        key = ("bwd", d, w, state is not None, silu, x.dtype, weight.dtype, dy.dtype, x.device)
        if seq_idx is not None:
            key += ("seq_idx",)
        _launch(_conv_bwd_kernel, _conv_bwd_tuned, grid_fn, args, consts, key)
    dweight = dw_part.sum(0).t().to(weight.dtype)
    dbias = db_part.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias, ds


def causal_conv1d_fwd(x, weight, bias=None, silu=False, seq_idx=None):
    """The forward kernel alone, no autograd (for fused callers such as the Mamba block):
    y (b, l, d) new contiguous tensor in x's dtype. x may be a strided view (channel stride 1
    for speed); no initial state; ``seq_idx`` (b, l): packed documents."""
    if not _conv_args_plain(x, weight, bias, "silu" if silu else None, None, seq_idx):
        check_causal_conv1d_args("causal_conv1d_fwd", x, weight, bias, None, None, seq_idx)
    if compiling():
        return _fwd_op(x, weight, bias, None, bool(silu), seq_idx)
    return _launch_fwd(x, weight, bias, None, bool(silu), seq_idx)


def causal_conv1d_bwd(x, weight, bias, dy, silu=False, dx_out=None, seq_idx=None):
    """The backward kernel alone, no autograd: (dx, dweight, dbias) of ``causal_conv1d_fwd``
    for the output gradient dy (b, l, d). ``dx_out``: an optional (b, l, d) buffer in x's dtype,
    any strides (e.g. the x-half of a (b, l, 2d) projection gradient), written in full and
    returned as dx, so the caller needs no copy. dbias is None without a bias. ``seq_idx``: the
    forward's."""
    b, l, d = x.shape
    if dx_out is not None and (dx_out.shape != x.shape or dx_out.dtype != x.dtype
                               or dx_out.device != x.device):
        raise ValueError(f"causal_conv1d_bwd: dx_out must be {tuple(x.shape)} {x.dtype} on "
                         f"{x.device}, got {tuple(dx_out.shape)} {dx_out.dtype} on {dx_out.device}")
    if dy.shape != x.shape:
        raise ValueError(f"causal_conv1d_bwd: dy must have x's shape {tuple(x.shape)}, got "
                         f"{tuple(dy.shape)}")
    if b == 0 or l == 0 or d == 0:
        dx = dx_out if dx_out is not None else torch.zeros_like(x)
        return dx, torch.zeros_like(weight), (torch.zeros_like(bias) if bias is not None else None)
    if compiling():
        if dx_out is None:
            dx, dweight, dbias, _ = _bwd_op(x, weight, bias, None, dy, bool(silu), seq_idx)
            return dx, dweight, (dbias if bias is not None else None)
        dweight, dbias = _bwd_into_op(x, weight, bias, dy, bool(silu), dx_out, seq_idx)
        return dx_out, dweight, (dbias if bias is not None else None)
    dx, dweight, dbias, _ = _launch_bwd(x, weight, bias, None, dy, bool(silu), dx_out=dx_out,
                                        seq_idx=seq_idx)
    return dx, dweight, dbias


class _CausalConv1dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, state, silu, seq_idx):
        ctx.silu = silu
        ctx.save_for_backward(x, weight, bias, state, seq_idx)
        return _launch_fwd(x, weight, bias, state, silu, seq_idx)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, state, seq_idx = ctx.saved_tensors
        b, l, d = x.shape
        if b == 0 or l == 0 or d == 0:
            dw = torch.zeros_like(weight)
            return (torch.zeros_like(x), dw, torch.zeros_like(bias) if bias is not None else None,
                    torch.zeros_like(state) if state is not None else None, None, None)
        dx, dweight, dbias, ds = _launch_bwd(x, weight, bias, state, dy, ctx.silu,
                                             seq_idx=seq_idx)
        return dx, dweight, dbias, ds, None, None


# ------------------------------------------------------------------ compiled: the custom ops
def _zero_grads(x, weight, bias, state):
    """Zero (dx, dweight, dbias, dstate), contiguous, the layout the ops return (stand-ins for
    an absent bias or state)."""
    z = lambda t: t.new_zeros(t.shape)  # noqa: E731
    return (z(x), z(weight), z(bias) if bias is not None else x.new_empty(0),
            z(state) if state is not None else x.new_empty(0))


@custom_op("causal_conv1d_fwd")
def _fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            state: torch.Tensor | None, silu: bool, seq_idx: torch.Tensor | None) -> torch.Tensor:
    """y (b, l, d) contiguous, x's dtype."""
    return _launch_fwd(x, weight, bias, state, silu, seq_idx)


@_fwd_op.register_fake
def _(x, weight, bias, state, silu, seq_idx):
    return x.new_empty(x.shape)


@custom_op("causal_conv1d_bwd")
def _bwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            state: torch.Tensor | None, dy: torch.Tensor, silu: bool,
            seq_idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                  torch.Tensor]:
    """(dx, dweight, dbias, dstate); empty stand-ins for an absent bias or state."""
    b, l, d = x.shape
    if b == 0 or l == 0 or d == 0:
        return _zero_grads(x, weight, bias, state)
    dx, dw, db, ds = _launch_bwd(x, weight, bias, state, dy, silu, seq_idx=seq_idx)
    return (dx, dw.contiguous(), db if db is not None else x.new_empty(0),
            ds if ds is not None else x.new_empty(0))


@_bwd_op.register_fake
def _(x, weight, bias, state, dy, silu, seq_idx):
    return _zero_grads(x, weight, bias, state)


@custom_op("causal_conv1d_bwd_into", mutates_args=("dx_out",))
def _bwd_into_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 dy: torch.Tensor, silu: bool, dx_out: torch.Tensor,
                 seq_idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dweight, dbias) with dx written into ``dx_out`` (any strides): ``causal_conv1d_bwd``'s
    ``dx_out`` form, for the Mamba block's fused node. An empty stand-in without a bias."""
    _, dw, db, _ = _launch_bwd(x, weight, bias, None, dy, silu, dx_out=dx_out, seq_idx=seq_idx)
    return dw.contiguous(), (db if db is not None else x.new_empty(0))


@_bwd_into_op.register_fake
def _(x, weight, bias, dy, silu, dx_out, seq_idx):
    return weight.new_empty(weight.shape), (bias.new_empty(bias.shape) if bias is not None
                                            else x.new_empty(0))


def _setup(ctx, inputs, output):
    x, weight, bias, state, silu, seq_idx = inputs
    ctx.save_for_backward(x, weight, bias, state, seq_idx)
    ctx.silu = bool(silu)


def _backward(ctx, dy):
    x, weight, bias, state, seq_idx = ctx.saved_tensors
    dx, dw, db, ds = _bwd_op(x, weight, bias, state, dy, ctx.silu, seq_idx)
    return (dx, dw, db if bias is not None else None, ds if state is not None else None,
            None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup)


@custom_op("causal_conv1d_update")
def _update_op(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None, silu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y (b, d), new_state (b, w-1, d)) of one decoding token (``causal_conv1d_update``)."""
    return _launch_update(x, conv_state, weight, bias, silu)


@_update_op.register_fake
def _(x, conv_state, weight, bias, silu):
    b, d = x.shape
    return x.new_empty((b, d)), conv_state.new_empty((b, weight.shape[1] - 1, d))


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ACTS = (None, "silu", "swish")


def _plain(t, shape, device) -> bool:
    return t.dtype in _FLOATS and t.shape == shape and t.device == device


def _conv_args_plain(x, weight, bias, activation, initial_state, seq_idx=None) -> bool:
    """A quick check that the arguments are valid (the full check, slower, only names the
    problem when this says no). With seq_idx: the full check."""
    if activation not in _ACTS or x.dim() != 3 or weight.dim() != 2 or x.dtype not in _FLOATS:
        return False
    b, _, d = x.shape
    w = weight.shape[1]
    dev = x.device
    return (seq_idx is None and w >= 1 and _plain(weight, (d, w), dev)
            and (bias is None or _plain(bias, (d,), dev))
            and (initial_state is None or _plain(initial_state, (b, w - 1, d), dev)))


def _update_args_plain(x, conv_state, weight, bias, activation) -> bool:
    if activation not in _ACTS or x.dim() != 2 or weight.dim() != 2 or x.dtype not in _FLOATS:
        return False
    b, d = x.shape
    w = weight.shape[1]
    dev = x.device
    return (w >= 1 and _plain(weight, (d, w), dev) and _plain(conv_state, (b, w - 1, d), dev)
            and (bias is None or _plain(bias, (d,), dev)))


def _final_state(x, initial_state, w, seq_idx=None):
    """The last w-1 inputs of (initial_state, x), as a new (b, w-1, d) tensor (autograd-visible);
    with seq_idx those before the last document's start are zero (the state's positions count
    as token 0's document)."""
    b, l, d = x.shape
    if l >= w - 1:
        last = x[:, l - (w - 1):, :]
        if seq_idx is None or w == 1:
            return last.clone(memory_format=torch.contiguous_format)
        keep = seq_idx[:, l - (w - 1):] == seq_idx[:, -1:]
        return torch.where(keep[:, :, None], last, 0.0).contiguous()
    prev = (initial_state.to(x.dtype) if initial_state is not None
            else x.new_zeros(b, w - 1, d))
    last = torch.cat([prev[:, l:, :], x], dim=1)
    if seq_idx is None or l == 0:
        return last
    sq = torch.cat([seq_idx[:, :1].expand(b, w - 1 - l), seq_idx], dim=1)
    return torch.where((sq == seq_idx[:, -1:])[:, :, None], last, 0.0)


def causal_conv1d_triton(x, weight, bias=None, activation=None, initial_state=None,
                         return_final_state=False, seq_idx=None):
    """Triton causal depthwise conv1d; see ``causal_conv1d_ref`` for the contract (``seq_idx``
    (b, l) integer: packed documents).

    Gradients flow to x, weight, bias and initial_state (and through the final state). Any
    seqlen (0 included) and any width >= 1; x may be a strided view (its channel stride should be
    1 for speed). Output y is a new contiguous (b, l, d) tensor in x's dtype.
    """
    if not _conv_args_plain(x, weight, bias, activation, initial_state, seq_idx):
        check_causal_conv1d_args("causal_conv1d_triton", x, weight, bias, activation,
                                 initial_state, seq_idx)  # raises the precise error
    w = weight.shape[1]
    silu = activation is not None
    if compiling():
        y = _fwd_op(x, weight, bias, initial_state, silu, seq_idx)
    elif torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
            or (initial_state is not None and initial_state.requires_grad)):
        y = _CausalConv1dFn.apply(x, weight, bias, initial_state, silu, seq_idx)
    else:  # inference: skip autograd's bookkeeping (launch overhead matters at small sizes)
        y = _launch_fwd(x, weight, bias, initial_state, silu, seq_idx)
    if return_final_state:
        return y, _final_state(x, initial_state, w, seq_idx)
    return y


def causal_conv1d_update_triton(x, conv_state, weight, bias=None, activation=None):
    """One decoding step; see ``causal_conv1d_update_ref``. Returns (y (b, d) in x's dtype,
    new_conv_state (b, w-1, d) in conv_state's dtype); conv_state is not modified. Inference
    only (no autograd)."""
    if not _update_args_plain(x, conv_state, weight, bias, activation):
        check_causal_conv1d_update_args("causal_conv1d_update_triton", x, conv_state, weight,
                                        bias, activation)  # raises the precise error
    silu = activation is not None
    if compiling():
        return _update_op(x, conv_state, weight, bias, silu)
    return _launch_update(x, conv_state, weight, bias, silu)


def _launch_update(x, conv_state, weight, bias, silu):
    b, d = x.shape
    w = weight.shape[1]
    y = _alloc((b, d), dtype=x.dtype, device=x.device)
    new_state = _alloc((b, w - 1, d), dtype=conv_state.dtype, device=x.device)
    if b == 0 or d == 0:
        return y, new_state
    bd = 16 if _INTERPRET else min(1024, triton.next_power_of_2(d))
    grid = (b, triton.cdiv(d, bd))
    _conv_update_kernel[grid](
        x, conv_state, weight, bias if bias is not None else weight, y, new_state, d,
        *x.stride(), *conv_state.stride(), *weight.stride(), *y.stride(), *new_state.stride(),
        W=w, HAS_BIAS=bias is not None, SILU=silu, BD=bd,
        num_warps=1 if _INTERPRET else 4)
    return y, new_state
