"""The softmax router's selection in one op: probs, top-k weights and indices, and logsumexp.

    probs, weights, indices, lse = softmax_topk(logits, k, renormalize, impl)

logits (N, E) fp32 -> probs = softmax(logits) (N, E); indices (N, k) int64, the k largest probs
per row in descending order; weights (N, k) = probs at those indices, divided by their sum when
``renormalize`` (and k > 1); lse (N,) = logsumexp(logits) (the z-loss's input). Differentiable in
probs, weights and lse.

- ``softmax_topk_ref``: torch.softmax, torch.topk, torch.logsumexp (autograd); the reference.
- ``impl="triton"`` (``router_topk_triton.py``): one Triton kernel forward and one backward, for
  E <= ``MAX_E``; ``auto`` takes it for CUDA tensors when Triton imports, else the reference.
  Ties between equal probs go to the lower expert index in the Triton kernel; torch.topk does
  not specify its order for ties.
"""
from __future__ import annotations

import torch

from . import triton_available, triton_interpreting

SOFTMAX_TOPK_IMPLS = ("auto", "torch", "triton")
MAX_E = 256
_BLOCK_N = 16


def softmax_topk_ref(logits: torch.Tensor, k: int, renormalize: bool):
    probs = torch.softmax(logits, dim=-1)
    weights, indices = torch.topk(probs, k, dim=-1)
    if renormalize and k > 1:
        weights = weights / weights.sum(-1, keepdim=True)
    return probs, weights, indices, torch.logsumexp(logits, dim=-1)


def _triton_ok(logits: torch.Tensor) -> bool:
    if logits.shape[-1] > MAX_E or logits.dim() != 2 or not triton_available():
        return False
    return logits.is_cuda or triton_interpreting()


def _block_e(e: int) -> int:
    import triton

    return max(2, triton.next_power_of_2(e))


class _SoftmaxTopk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, k, renormalize):
        import triton

        from .router_topk_triton import _softmax_topk_fwd_kernel

        logits = logits.float().contiguous()
        n, e = logits.shape
        probs = torch.empty_like(logits)
        weights = torch.empty(n, k, dtype=torch.float32, device=logits.device)
        indices = torch.empty(n, k, dtype=torch.int64, device=logits.device)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        renorm = bool(renormalize) and k > 1
        if n:
            _softmax_topk_fwd_kernel[(triton.cdiv(n, _BLOCK_N),)](
                logits, probs, weights, indices, lse, n, e, K=k, RENORM=renorm,
                BLOCK_N=_BLOCK_N, BLOCK_E=_block_e(e))
        ctx.save_for_backward(probs, weights, indices)
        ctx.cfg = (k, renorm)
        ctx.mark_non_differentiable(indices)
        return probs, weights, indices, lse

    @staticmethod
    def backward(ctx, dprobs, dweights, _dindices, dlse):
        import triton

        from .router_topk_triton import _softmax_topk_bwd_kernel

        probs, weights, indices = ctx.saved_tensors
        k, renorm = ctx.cfg
        n, e = probs.shape
        dl = torch.empty_like(probs)
        if n:
            dummy = probs
            _softmax_topk_bwd_kernel[(triton.cdiv(n, _BLOCK_N),)](
                probs, weights, indices,
                dprobs.float().contiguous() if dprobs is not None else dummy,
                dweights.float().contiguous() if dweights is not None else dummy,
                dlse.float().contiguous() if dlse is not None else dummy,
                dl, n, e, K=k, RENORM=renorm, HAS_DP=dprobs is not None,
                HAS_DW=dweights is not None, HAS_DLSE=dlse is not None,
                BLOCK_N=_BLOCK_N, BLOCK_E=_block_e(e))
        return dl, None, None


def softmax_topk(logits: torch.Tensor, k: int, renormalize: bool = True, impl: str = "auto"):
    """(probs, weights, indices, lse) of the module docstring; logits (N, E) fp32."""
    if impl not in SOFTMAX_TOPK_IMPLS:
        raise ValueError(f"softmax_topk impl must be one of {'|'.join(SOFTMAX_TOPK_IMPLS)}, got {impl!r}")
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"softmax_topk: k must be in [1, {logits.shape[-1]}], got {k}")
    use = impl == "triton" or (impl == "auto" and logits.is_cuda)
    if use and _triton_ok(logits) and logits.dtype != torch.float64:
        return _SoftmaxTopk.apply(logits, k, renormalize)
    if impl == "triton" and not _triton_ok(logits):
        raise ValueError(f"softmax_topk impl 'triton' needs 2-D logits with at most {MAX_E} experts "
                         f"on CUDA (or TRITON_INTERPRET=1), got {tuple(logits.shape)} on {logits.device}")
    return softmax_topk_ref(logits, k, renormalize)
