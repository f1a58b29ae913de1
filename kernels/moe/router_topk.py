"""The softmax router's selection in one op: probs, top-k weights and indices, and logsumexp.

    probs, weights, indices, lse = softmax_topk(logits, k, renormalize, impl)

logits (N, E) fp32 -> probs = softmax(logits) (N, E); indices (N, k) int64, the k largest probs
per row in descending order; weights (N, k) = probs at those indices, divided by their sum when
``renormalize`` (and k > 1); lse (N,) = logsumexp(logits) (the z-loss's input). Differentiable in
probs, weights and lse.

    probs, weights, indices, lse, stats = softmax_topk_stats(logits, k, renormalize, impl)

adds ``RoutingStats`` (per-expert sums of probs and slot counts, sum of lse^2, summed entropy):
what the MoE load-balancing loss, z-loss and metrics need, from the same Triton kernel.

- ``softmax_topk_ref``: torch.softmax, torch.topk, torch.logsumexp (autograd); the reference.
- ``impl="triton"`` (``router_topk_triton.py``): one Triton kernel forward and one backward, for
  E <= ``MAX_E``; ``auto`` takes it for CUDA tensors when Triton imports, else the reference.
  Ties between equal probs go to the lower expert index in the Triton kernel; torch.topk does
  not specify its order for ties.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .._ops import compiling
from ..backend import resolve

SOFTMAX_TOPK_IMPLS = ("auto", "torch", "triton")
MAX_E = 256
STATS_MAX_SLOTS = 2 ** 24  # the kernel's counts are sums of fp32 partials: exact below this
_BLOCK_N = 16


def softmax_topk_ref(logits: torch.Tensor, k: int, renormalize: bool):
    probs = torch.softmax(logits, dim=-1)
    weights, indices = torch.topk(probs, k, dim=-1)
    if renormalize and k > 1:
        weights = weights / weights.sum(-1, keepdim=True)
    return probs, weights, indices, torch.logsumexp(logits, dim=-1)


def _block_e(e: int) -> int:
    import triton

    return max(2, triton.next_power_of_2(e))


def _fwd_launch(logits, k, renormalize, stats):
    """The forward kernel: (probs, weights, indices, lse, psum, lsq, counts, ent), the last four
    None without ``stats`` (``_SoftmaxTopk``)."""
    import triton

    from .router_topk_triton import _softmax_topk_fwd_kernel

    logits = logits.float().contiguous()
    n, e = logits.shape
    be = _block_e(e)
    probs = torch.empty_like(logits)
    weights = torch.empty(n, k, dtype=torch.float32, device=logits.device)
    indices = torch.empty(n, k, dtype=torch.int64, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    renorm = bool(renormalize) and k > 1
    n_prog = triton.cdiv(n, _BLOCK_N)
    # every program writes its whole row of partial sums; no rows: one row of zeros
    part = (torch.empty if n else torch.zeros)(2 * be + 2, max(n_prog, 1) if stats else 1,
                                               dtype=torch.float32, device=logits.device)
    if n:
        _softmax_topk_fwd_kernel[(n_prog,)](
            logits, probs, weights, indices, lse, part, n, e, K=k, RENORM=renorm, STATS=stats,
            BLOCK_N=_BLOCK_N, BLOCK_E=be)
    if not stats:
        return probs, weights, indices, lse, None, None, None, None
    tot = part.sum(1)  # (an inner-dimension sum: one fast reduction)
    counts = tot[be:be + e].to(torch.int64)  # integer sums, exact below 2^24 slots
    return probs, weights, indices, lse, tot[:e], tot[2 * be], counts, tot[2 * be + 1]


def _bwd_launch(probs, weights, indices, lse, k, renorm, dprobs, dweights, dlse, dpsum, dlsq):
    """The backward kernel: dlogits (N, E) fp32 from the gradients that exist (None: absent)."""
    import triton

    from .router_topk_triton import _softmax_topk_bwd_kernel

    n, e = probs.shape
    dl = torch.empty_like(probs)

    def arg(t):
        return t.float().contiguous() if t is not None else probs  # (an unused pointer)

    if n:
        _softmax_topk_bwd_kernel[(triton.cdiv(n, _BLOCK_N),)](
            probs, weights, indices, arg(dprobs), arg(dweights), arg(dlse), dl, lse,
            arg(dpsum), arg(dlsq), n, e, K=k, RENORM=renorm, HAS_DP=dprobs is not None,
            HAS_DW=dweights is not None, HAS_DLSE=dlse is not None, HAS_DPS=dpsum is not None,
            HAS_DLSQ=dlsq is not None, BLOCK_N=_BLOCK_N, BLOCK_E=_block_e(e))
    return dl


class _SoftmaxTopk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, k, renormalize, stats):
        out = _fwd_launch(logits, k, renormalize, stats)
        probs, weights, indices, lse = out[:4]
        ctx.save_for_backward(probs, weights, indices, lse)
        ctx.cfg = (k, bool(renormalize) and k > 1)
        ctx.set_materialize_grads(False)  # outputs nothing used get None, not a zero-filled tensor
        ctx.mark_non_differentiable(indices)
        if stats:
            ctx.mark_non_differentiable(indices, out[6], out[7])
        return out

    @staticmethod
    def backward(ctx, dprobs, dweights, _dindices, dlse, dpsum, dlsq, _dcounts, _dent):
        probs, weights, indices, lse = ctx.saved_tensors
        k, renorm = ctx.cfg
        return _bwd_launch(probs, weights, indices, lse, k, renorm, dprobs, dweights, dlse, dpsum,
                           dlsq), None, None, None


def _apply(logits, k, renormalize, stats):
    """``_SoftmaxTopk``, or its custom op while ``torch.compile`` traces."""
    if compiling():
        from .router_topk_triton import softmax_topk_op

        return softmax_topk_op(logits, k, renormalize, stats)
    return _SoftmaxTopk.apply(logits, k, renormalize, stats)


class RoutingStats(NamedTuple):
    """Sums over the N rows that the MoE losses and metrics need (``softmax_topk_stats``)."""
    prob_sum: torch.Tensor     # (E,) fp32 sum_n probs[n, e]; differentiable (load-balancing loss)
    lse_sq_sum: torch.Tensor   # () fp32 sum_n lse[n]^2; differentiable (z-loss)
    counts: torch.Tensor       # (E,) int64 slots routed to each expert (the top-k choices)
    entropy_sum: torch.Tensor  # () fp32 sum_n -sum_e p log p (a metric; no gradient)


def _check(logits: torch.Tensor, k: int, impl: str) -> bool:
    """Whether the Triton op runs (ValueError for a bad impl or k; float64 logits take the
    reference, which is what the tests compare with)."""
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"softmax_topk: k must be in [1, {logits.shape[-1]}], got {k}")
    if impl == "triton" and logits.dtype == torch.float64:
        impl = "torch"
    fits = logits.dim() == 2 and logits.shape[-1] <= MAX_E
    return resolve("softmax_topk", impl, logits, fits=fits, choices=SOFTMAX_TOPK_IMPLS,
                   limits=f"2-D logits with at most {MAX_E} experts") == "triton"


def softmax_topk(logits: torch.Tensor, k: int, renormalize: bool = True, impl: str = "auto"):
    """(probs, weights, indices, lse) of the module docstring; logits (N, E) fp32."""
    if _check(logits, k, impl):
        return _apply(logits, k, renormalize, False)[:4]
    return softmax_topk_ref(logits, k, renormalize)


def stats_ref(probs: torch.Tensor, indices: torch.Tensor, lse: torch.Tensor) -> RoutingStats:
    """``RoutingStats`` from the outputs of ``softmax_topk_ref`` (torch ops, autograd)."""
    from .permute import histogram

    counts = histogram(indices, probs.shape[-1])
    with torch.no_grad():
        ent = torch.special.entr(probs).sum()
    return RoutingStats(probs.sum(0), lse.pow(2).sum(), counts, ent)


def softmax_topk_stats(logits: torch.Tensor, k: int, renormalize: bool = True, impl: str = "auto"):
    """(probs, weights, indices, lse, ``RoutingStats``). On the Triton path the stats come out of
    the same kernel (per-block partial sums, one reduction; their gradients folded into the
    backward kernel), replacing about 20 small launches of the losses and metrics per MoE layer
    and step; the reference computes them with torch ops."""
    if not _check(logits, k, impl):
        probs, weights, indices, lse = softmax_topk_ref(logits, k, renormalize)
    elif logits.shape[0] * k < STATS_MAX_SLOTS:
        probs, weights, indices, lse, psum, lsq, counts, ent = _apply(logits, k, renormalize, True)
        return probs, weights, indices, lse, RoutingStats(psum, lsq, counts, ent)
    else:
        probs, weights, indices, lse = _apply(logits, k, renormalize, False)[:4]
    return probs, weights, indices, lse, stats_ref(probs, indices, lse)
