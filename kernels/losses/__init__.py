"""Losses: the LM head fused with its cross-entropy.

    loss = linear_cross_entropy(h, weight, labels, ignore_index=-100, chunk_size=None,
                                impl="auto")

the mean of ``F.cross_entropy(F.linear(h, weight).float(), labels, ignore_index)`` without the
(N, V) float32 logits (nor any (N, V) tensor): chunked over tokens, each chunk's logits in the
compute dtype with a float32 logsumexp; the backward recomputes each chunk and accumulates dh
and dweight. Files: ``ref.py`` (the reference), ``chunked.py`` (the chunked autograd op, the main
path on every device; its elementwise parts as torch ops or) ``triton_ce.py`` (one Triton kernel
each way), ``ops.py`` (the custom ops ``torch.compile`` traces). ``impl``: ``torch`` (torch
elementwise ops), ``triton`` (the Triton kernels: CUDA, or CPU under the interpreter), ``auto``
(triton on CUDA when it imports), ``ref`` (the unfused reference).
"""
from __future__ import annotations

import torch

from .._ops import compiling
from ..backend import resolve
from .ref import linear_cross_entropy_ref


def _check(h, weight, labels, ignore_index, chunk_size) -> None:
    fn = "linear_cross_entropy"
    for name, t in (("h", h), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not h.dtype.is_floating_point or not weight.dtype.is_floating_point:
        raise TypeError(f"{fn}: h and weight must be floating point, got {h.dtype} and "
                        f"{weight.dtype}")
    if h.dim() < 1 or weight.dim() != 2 or weight.shape[1] != h.shape[-1]:
        raise ValueError(f"{fn}: h must be (..., d) and weight (V, d), got {tuple(h.shape)} and "
                         f"{tuple(weight.shape)}")
    if labels.dtype not in (torch.int64, torch.int32) or tuple(labels.shape) != tuple(h.shape[:-1]):
        raise ValueError(f"{fn}: labels must be an int64 tensor of shape {tuple(h.shape[:-1])} "
                         f"(h's leading dims), got {labels.dtype} {tuple(labels.shape)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{fn}: ignore_index must be an int, got {ignore_index!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"{fn}: chunk_size must be None or a positive int, got {chunk_size!r}")
    if h.device != weight.device or h.device != labels.device:
        raise ValueError(f"{fn}: h, weight and labels must be on one device, got {h.device}, "
                         f"{weight.device} and {labels.device}")


def compute_dtype(h, weight) -> torch.dtype:
    """The dtype the logits are computed in: autocast's when it is on for h's device (as an
    unfused ``F.linear`` under autocast), else the promotion of h's and weight's."""
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(h.dtype, weight.dtype)


def linear_cross_entropy(h, weight, labels, ignore_index=-100, chunk_size=None, impl="auto"):
    """Mean cross-entropy of the logits ``h @ weight^T`` against ``labels`` over the labels that
    are not ``ignore_index`` (NaN when all are, with zero gradients, as F.cross_entropy).

    h (..., d) float; weight (V, d) (the LM head, or the tied embedding); labels (...) int64 in
    [0, V) or ``ignore_index``. The logits are computed in the compute dtype (autocast's, or
    h's and weight's promotion) ``chunk_size`` tokens at a time (default
    ``chunked.auto_chunk_size``: one chunk's logits within 2^27 elements) and their logsumexp in
    float32. Returns a 0-d float32 tensor, differentiable in h and weight (dh in h's dtype,
    dweight accumulated in float32, returned in weight's dtype)."""
    _check(h, weight, labels, ignore_index, chunk_size)
    which = resolve("linear_cross_entropy", impl, h)
    if which == "ref":
        return linear_cross_entropy_ref(h, weight, labels, ignore_index)
    from .chunked import auto_chunk_size

    labels = labels.long()
    n = labels.numel()
    chunk = chunk_size if chunk_size is not None else auto_chunk_size(n, weight.shape[0])
    ct = compute_dtype(h, weight)
    if compiling():
        from .ops import linear_cross_entropy_op as fn
    else:
        from .chunked import linear_cross_entropy_chunked as fn
    return fn(h, weight, labels, ignore_index, chunk, which == "triton", ct)


__all__ = ["linear_cross_entropy", "linear_cross_entropy_ref"]
