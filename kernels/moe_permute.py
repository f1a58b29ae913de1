"""Token permutation for mixture-of-experts: sort token-slots by expert, and back.

Notation: x (N, d) tokens; ``indices`` (N, k) int64 the expert of each token-slot, values in
[0, E] where E (one past the last expert) marks a dropped slot; ``weights`` (N, k) the combine
weights. Slot s = n * k + j (token-major).

    order, counts, inv = sort_by_expert(indices, E)
        order (N*k,) int64   stable argsort of indices.reshape(-1): slot order[r] is row r of the
                             permuted layout; rows are grouped by expert, dropped slots last
        counts (E + 1,)      rows per expert (counts[E] = dropped slots)
        inv (N*k,) int64     the inverse permutation: inv[order[r]] = r
    x_perm = permute(x, order, inv, k)          x_perm[r] = x[order[r] // k]
    y = unpermute(y_perm, order, inv, weights)   y[n] = sum_j weights[n, j] * y_perm[inv[n*k + j]]

``permute``/``unpermute`` are gathers in both directions: since ``order`` is a permutation, the
backward of a gather by ``order`` is a gather by ``inv`` (plus a sum over the k slots of a token),
so neither pass needs a scatter with atomics (``index_add``); the weighted sum over the k slots is
one batched (N, 1, k) x (N, k, d) product. ``permute_ref``/``unpermute_ref`` are the plain
definitions (fancy indexing, index_add) used by the tests.
"""
from __future__ import annotations

import torch


def sort_by_expert(indices: torch.Tensor, n_experts: int):
    """(order, counts, inv) of the token-slots of ``indices`` (N, k); see the module docstring."""
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts + 1)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    return order, counts, inv


class _GatherRows(torch.autograd.Function):
    """y = x[idx] where idx hits every row of x exactly ``group`` times and ``inv`` lists, for
    each row of x, its ``group`` positions in y (row-major (rows, group)). Backward is the gather
    grad_x = grad_y[inv].view(rows, group, d).sum(1), no scatter."""

    @staticmethod
    def forward(ctx, x, idx, inv, group):
        ctx.save_for_backward(inv)
        ctx.group = group
        return x.index_select(0, idx)

    @staticmethod
    def backward(ctx, grad_y):
        (inv,) = ctx.saved_tensors
        g = grad_y.index_select(0, inv)
        if ctx.group > 1:
            g = g.view(-1, ctx.group, g.shape[-1]).sum(1)
        return g, None, None, None


def permute(x: torch.Tensor, order: torch.Tensor, inv: torch.Tensor, top_k: int) -> torch.Tensor:
    """x_perm (N*k, d) with x_perm[r] = x[order[r] // k]."""
    return _GatherRows.apply(x, torch.div(order, top_k, rounding_mode="floor"), inv, top_k)


def unpermute(y_perm: torch.Tensor, order: torch.Tensor, inv: torch.Tensor,
              weights: torch.Tensor) -> torch.Tensor:
    """y (N, d) in y_perm's dtype: y[n] = sum_j weights[n, j] * y_perm[inv[n*k + j]]."""
    n, k = weights.shape
    slots = _GatherRows.apply(y_perm, inv, order, 1).view(n, k, y_perm.shape[-1])
    if k == 1:
        return slots[:, 0] * weights.to(slots.dtype)
    return torch.bmm(weights.to(slots.dtype).unsqueeze(1), slots).squeeze(1)


def permute_ref(x: torch.Tensor, order: torch.Tensor, top_k: int) -> torch.Tensor:
    return x[order // top_k]


def unpermute_ref(y_perm: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    n, k = weights.shape
    acc = torch.promote_types(y_perm.dtype, torch.float32)
    w = weights.reshape(-1)[order].to(acc)
    out = torch.zeros(n, y_perm.shape[-1], dtype=acc, device=y_perm.device)
    out.index_add_(0, order // k, y_perm.to(acc) * w[:, None])
    return out.to(y_perm.dtype)
