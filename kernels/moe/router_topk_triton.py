"""Triton kernels of the softmax router's selection (``router_topk.py`` holds the reference and the
autograd op), fp32 throughout, one pass over (BLOCK_N rows, all E experts) each way.

Forward, per row of logits l (E,):
    m = max(l), s = sum(exp(l - m)), probs = exp(l - m) / s, lse = m + log(s)
    top-k of probs by k rounds of argmax (ties: the lower expert index), w_j = probs at i_j,
    renormalised to sum to 1 when RENORM
    STATS: per block p of rows, the partial sums the MoE losses and metrics need, in column p of
    a (2 BLOCK_E + 2, P) buffer that the caller sums over its rows: probs per expert, slots per
    expert, lse^2 and the routing entropy -sum_e p log p
Backward, from the gradients of probs (dP, may be absent), of the weights (dW), of lse (dL), of
the per-expert prob sums (dPS) and of sum lse^2 (dLSQ, a scalar):
    dp  = dP + dPS + scatter over j of (RENORM: (dW_j - sum_m dW_m w_m) / S, S = sum_m probs at
                                        i_m; else: dW_j)
    dl  = probs * (dp - sum(probs * dp)) + (dL + 2 lse dLSQ) * probs
Replaces torch's softmax, topk (two kernels), the renormalisation, the z-loss's logsumexp and their
backwards: about 15 small launches per MoE layer and step.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._ops import custom_op


@triton.jit
def _softmax_topk_fwd_kernel(l_ptr, p_ptr, w_ptr, i_ptr, lse_ptr, part_ptr, N, E,
                             K: tl.constexpr, RENORM: tl.constexpr, STATS: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < N
    cmask = cols < E
    mask = rmask[:, None] & cmask[None, :]
    l = tl.load(l_ptr + rows[:, None] * E + cols[None, :], mask=mask, other=float("-inf"))
    m = tl.max(l, axis=1)
    m = tl.where(rmask, m, 0.0)  # padded rows: no inf - inf
    e = tl.where(mask, tl.exp(l - m[:, None]), 0.0)
    s = tl.sum(e, axis=1)
    s = tl.where(rmask, s, 1.0)
    p = e / s[:, None]
    tl.store(p_ptr + rows[:, None] * E + cols[None, :], p, mask=mask)
    lse = m + tl.log(s)
    tl.store(lse_ptr + rows, lse, mask=rmask)
    # k rounds of argmax; chosen and padded columns drop to -1 (probs are >= 0)
    pm = tl.where(mask, p, -1.0)
    wsum = tl.zeros([BLOCK_N], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_E], dtype=tl.float32)
    for j in tl.static_range(K):
        wj = tl.max(pm, axis=1)
        ij = tl.min(tl.where(pm == wj[:, None], cols[None, :], BLOCK_E), axis=1)
        chosen = cols[None, :] == ij[:, None]
        pm = tl.where(chosen, -1.0, pm)
        wsum += wj
        tl.store(w_ptr + rows * K + j, wj, mask=rmask)
        tl.store(i_ptr + rows * K + j, ij.to(tl.int64), mask=rmask)
        if STATS:
            cnt += tl.sum(tl.where(chosen & rmask[:, None], 1.0, 0.0), axis=0)
    if STATS:  # this block's partial sums (column pid of part): probs per expert, slots per
        # expert, lse^2, entropy
        P = tl.num_programs(0)
        base = part_ptr + tl.program_id(0)
        pz = tl.where(mask, p, 0.0)
        tl.store(base + cols * P, tl.sum(pz, axis=0))
        tl.store(base + (BLOCK_E + cols) * P, cnt)
        tl.store(base + 2 * BLOCK_E * P, tl.sum(tl.where(rmask, lse * lse, 0.0), axis=0))
        ent = tl.where(pz > 0, -pz * tl.log(tl.where(pz > 0, pz, 1.0)), 0.0)
        tl.store(base + (2 * BLOCK_E + 1) * P, tl.sum(tl.sum(ent, axis=1), axis=0))
    if RENORM:
        wsum = tl.where(rmask, wsum, 1.0)
        for j in tl.static_range(K):
            wj = tl.load(w_ptr + rows * K + j, mask=rmask, other=0.0)
            tl.store(w_ptr + rows * K + j, wj / wsum, mask=rmask)


@triton.jit
def _softmax_topk_bwd_kernel(p_ptr, w_ptr, i_ptr, dp_ptr, dw_ptr, dlse_ptr, dl_ptr,
                             lse_ptr, dps_ptr, dlsq_ptr, N, E,
                             K: tl.constexpr, RENORM: tl.constexpr, HAS_DP: tl.constexpr,
                             HAS_DW: tl.constexpr, HAS_DLSE: tl.constexpr, HAS_DPS: tl.constexpr,
                             HAS_DLSQ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < N
    mask = rmask[:, None] & (cols < E)[None, :]
    offs = rows[:, None] * E + cols[None, :]
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    if HAS_DP:
        dp = tl.load(dp_ptr + offs, mask=mask, other=0.0)
    else:
        dp = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
    if HAS_DPS:  # gradient of the per-expert sum of probs over the rows
        dp += tl.load(dps_ptr + cols, mask=cols < E, other=0.0)[None, :]
    if HAS_DW:
        if RENORM:  # w_j = p_j / S: dp_j = (dW_j - sum_m dW_m w_m) / S, S = sum_m p at i_m
            dot = tl.zeros([BLOCK_N], dtype=tl.float32)
            S = tl.zeros([BLOCK_N], dtype=tl.float32)
            for j in tl.static_range(K):
                ij = tl.load(i_ptr + rows * K + j, mask=rmask, other=0)
                dot += tl.load(dw_ptr + rows * K + j, mask=rmask, other=0.0) * \
                    tl.load(w_ptr + rows * K + j, mask=rmask, other=0.0)
                S += tl.sum(tl.where(cols[None, :] == ij[:, None], p, 0.0), axis=1)
            S = tl.where(rmask, S, 1.0)
        for j in tl.static_range(K):
            ij = tl.load(i_ptr + rows * K + j, mask=rmask, other=0)
            g = tl.load(dw_ptr + rows * K + j, mask=rmask, other=0.0)
            if RENORM:
                g = (g - dot) / S
            dp += tl.where(cols[None, :] == ij[:, None], g[:, None], 0.0)
    dl = p * (dp - tl.sum(p * dp, axis=1)[:, None])
    if HAS_DLSE or HAS_DLSQ:
        g_lse = tl.zeros([BLOCK_N], dtype=tl.float32)
        if HAS_DLSE:
            g_lse += tl.load(dlse_ptr + rows, mask=rmask, other=0.0)
        if HAS_DLSQ:  # gradient of sum_n lse_n^2
            g_lse += 2.0 * tl.load(lse_ptr + rows, mask=rmask, other=0.0) * tl.load(dlsq_ptr)
        dl += g_lse[:, None] * p
    tl.store(dl_ptr + offs, dl, mask=mask)


# ------------------------------------------------------------------ compiled: the custom ops
# ``hybridseq::softmax_topk_fwd`` (with its autograd) and ``softmax_topk_bwd``
# (``kernels._ops``); the launches are ``router_topk._fwd_launch`` / ``_bwd_launch``, which the
# eager autograd op ``router_topk._SoftmaxTopk`` calls too.
def _e(ref):
    return ref.new_empty(0)


@custom_op("softmax_topk_fwd")
def _fwd_op(logits: torch.Tensor, k: int, renormalize: bool, stats: bool) -> list[torch.Tensor]:
    """[probs, weights, indices, lse, psum, lsq, counts, ent]; the last four empty stand-ins
    without ``stats`` (separate tensors: an op's outputs may not view one another)."""
    from .router_topk import _fwd_launch

    out = list(_fwd_launch(logits, k, renormalize, stats))
    if not stats:
        return out[:4] + [_e(out[0]), _e(out[0]), _e(out[2]), _e(out[0])]
    return out[:4] + [t.clone() for t in out[4:]]


@_fwd_op.register_fake
def _(logits, k, renormalize, stats):
    n, e = logits.shape
    f32 = dict(dtype=torch.float32)
    out = [logits.new_empty((n, e), **f32), logits.new_empty((n, k), **f32),
           logits.new_empty((n, k), dtype=torch.int64), logits.new_empty((n,), **f32)]
    if not stats:
        return out + [logits.new_empty(0, **f32), logits.new_empty(0, **f32),
                      logits.new_empty(0, dtype=torch.int64), logits.new_empty(0, **f32)]
    return out + [logits.new_empty((e,), **f32), logits.new_empty((), **f32),
                  logits.new_empty((e,), dtype=torch.int64), logits.new_empty((), **f32)]


@custom_op("softmax_topk_bwd")
def _bwd_op(probs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, lse: torch.Tensor,
            k: int, renorm: bool, dprobs: torch.Tensor | None, dweights: torch.Tensor | None,
            dlse: torch.Tensor | None, dpsum: torch.Tensor | None,
            dlsq: torch.Tensor | None) -> torch.Tensor:
    from .router_topk import _bwd_launch

    return _bwd_launch(probs, weights, indices, lse, k, renorm, dprobs, dweights, dlse, dpsum,
                       dlsq)


@_bwd_op.register_fake
def _(probs, weights, indices, lse, k, renorm, dprobs, dweights, dlse, dpsum, dlsq):
    return probs.new_empty(probs.shape)


def _setup(ctx, inputs, output):
    _, k, renormalize, stats = inputs
    ctx.save_for_backward(*output[:4])
    ctx.cfg = (k, bool(renormalize) and k > 1, bool(stats))


def _backward(ctx, *grads):
    if len(grads) == 1:  # a list output's gradients come as one list
        grads = grads[0]
    dprobs, dweights, _, dlse, dpsum, dlsq = grads[:6]
    probs, weights, indices, lse = ctx.saved_tensors
    k, renorm, stats = ctx.cfg
    if not stats:  # the stand-ins' gradients
        dpsum = dlsq = None
    return _bwd_op(probs, weights, indices, lse, k, renorm, dprobs, dweights, dlse, dpsum,
                   dlsq), None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup)


def softmax_topk_op(logits, k, renormalize, stats):
    """``router_topk._SoftmaxTopk.apply`` through the custom op (None for the stats it did not
    compute, as the autograd op)."""
    out = _fwd_op(logits, int(k), bool(renormalize), bool(stats))
    return tuple(out) if stats else tuple(out[:4]) + (None, None, None, None)
