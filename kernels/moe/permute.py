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

Two implementations (``impl``): ``torch``: gathers in both directions: since ``order`` is a
permutation, the backward of a gather by ``order`` is a gather by ``inv`` (plus a sum over the k
slots of a token), so no pass needs a scatter with atomics (``index_add``); the weighted sum over
the k slots is an elementwise product and a sum (a batched (N,1,k) x (N,k,d) bmm was several times
slower on CPU). ``triton`` (``permute_triton.py``, the ``auto`` choice on CUDA): the
permutation (a row gather), the un-permute forward, its backward and the permute backward are each
one fused pass that reads and writes every row once, without materialising the (N, k, d) slot
tensor; the sort is a counting sort (``sort_triton.py``, three launches). ``permute_ref`` /
``unpermute_ref`` are the plain definitions (fancy indexing, index_add) for the tests. Under
``torch.compile`` the Triton paths run as the custom ops ``hybridseq::moe_sort_by_bin``,
``moe_permute`` and ``moe_unpermute`` (``permute_triton.py``, ``sort_triton.py``).
"""
from __future__ import annotations

import torch

from .._ops import compiling
from ..backend import resolve

def histogram(values: torch.Tensor, n_bins: int) -> torch.Tensor:
    """counts[b] = #{values == b} for int values in [0, n_bins), int64. Unlike ``torch.bincount``
    it does not synchronise with the host on CUDA (bincount reads the max to size its output)."""
    flat = values.reshape(-1)
    counts = torch.zeros(n_bins, dtype=torch.int64, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int64))


def _key_dtype(n_experts: int) -> torch.dtype:
    """The narrowest integer dtype holding 0..n_experts: the radix sort runs one pass per key
    byte (int64 keys: 8 passes, 16 kernel launches on CUDA; uint8: 1)."""
    if n_experts < 256:
        return torch.uint8
    if n_experts < 32768:
        return torch.int16
    return torch.int32


def argsort_experts(flat: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Stable argsort (int64) of expert ids ``flat`` in [0, n_experts], on the narrowest key."""
    return torch.argsort(flat.to(_key_dtype(n_experts)), stable=True)


def sort_by_expert(indices: torch.Tensor, n_experts: int, impl: str = "auto"):
    """(order, counts, inv) of the token-slots of ``indices`` (N, k); see the module docstring.
    impl: ``torch`` (a radix argsort, a histogram, an index_put), ``triton``
    (``sort_triton``: a counting sort in three launches; up to 511 experts) or ``auto``
    (triton on CUDA when Triton imports and the expert count fits)."""
    flat = indices.reshape(-1)
    if _use_triton(flat, impl) and flat.numel() < 2 ** 31:
        from .sort_triton import MAX_BINS, sort_by_bin_triton

        if n_experts + 1 <= MAX_BINS:
            if compiling():
                from .sort_triton import sort_by_bin_op

                return sort_by_bin_op(flat, n_experts + 1)
            return sort_by_bin_triton(flat, n_experts + 1)
    order = argsort_experts(flat, n_experts)
    counts = histogram(flat, n_experts + 1)
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


class _PermuteTriton(torch.autograd.Function):
    """x_perm = x[order // k] (a Triton row gather: ``gather_sum`` with one slot per row; 83.4 us
    against 87.3 for index_select, H100, 32768 rows of 2048 bf16); backward
    grad_x[n] = sum_j grad[inv[n*k + j]] in one Triton pass."""

    @staticmethod
    def forward(ctx, x, src, inv, k):
        from .permute_triton import gather_sum

        ctx.save_for_backward(inv)
        ctx.k = k
        return gather_sum(x, src, 1)

    @staticmethod
    def backward(ctx, grad):
        from .permute_triton import gather_sum

        (inv,) = ctx.saved_tensors
        return gather_sum(grad, inv, ctx.k), None, None, None


class _UnpermuteTriton(torch.autograd.Function):
    """y[n] = sum_j w[n, j] * y_perm[inv[n*k + j]] and its backward, one Triton pass each."""

    @staticmethod
    def forward(ctx, y_perm, inv, weights):
        from .permute_triton import gather_sum

        ctx.save_for_backward(y_perm, inv, weights)
        return gather_sum(y_perm, inv, weights.shape[1], weights.reshape(-1))

    @staticmethod
    def backward(ctx, grad):
        from .permute_triton import scatter_scale_dot

        y_perm, inv, weights = ctx.saved_tensors
        g_y, g_w = scatter_scale_dot(grad, y_perm, inv, weights.reshape(-1))
        return g_y, None, g_w.view_as(weights).to(weights.dtype)


def _use_triton(t: torch.Tensor, impl: str) -> bool:
    return resolve("moe permute", impl, t, choices=("auto", "torch", "triton")) == "triton"


def permute(x: torch.Tensor, order: torch.Tensor, inv: torch.Tensor, top_k: int,
            impl: str = "auto") -> torch.Tensor:
    """x_perm (N*k, d) with x_perm[r] = x[order[r] // k]. impl: auto (Triton backward on CUDA
    when Triton imports) | torch | triton."""
    src = torch.div(order, top_k, rounding_mode="floor")
    if _use_triton(x, impl):
        if compiling():
            from .permute_triton import permute_op

            return permute_op(x, src, inv, top_k)
        return _PermuteTriton.apply(x, src, inv, top_k)
    return _GatherRows.apply(x, src, inv, top_k)


def unpermute(y_perm: torch.Tensor, order: torch.Tensor, inv: torch.Tensor,
              weights: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """y (N, d) in y_perm's dtype: y[n] = sum_j weights[n, j] * y_perm[inv[n*k + j]]
    (products and sum in fp32 on the Triton path, in y_perm's dtype on the torch path)."""
    n, k = weights.shape
    if _use_triton(y_perm, impl):
        if compiling():
            from .permute_triton import unpermute_op

            return unpermute_op(y_perm, inv, weights)
        return _UnpermuteTriton.apply(y_perm, inv, weights)
    slots = _GatherRows.apply(y_perm, inv, order, 1).view(n, k, y_perm.shape[-1])
    w = weights.to(slots.dtype).unsqueeze(-1)
    if k == 1:
        return slots[:, 0] * w[:, 0]
    return (slots * w).sum(1)


def permute_ref(x: torch.Tensor, order: torch.Tensor, top_k: int) -> torch.Tensor:
    return x[order // top_k]


def unpermute_ref(y_perm: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    n, k = weights.shape
    acc = torch.promote_types(y_perm.dtype, torch.float32)
    w = weights.reshape(-1)[order].to(acc)
    out = torch.zeros(n, y_perm.shape[-1], dtype=acc, device=y_perm.device)
    out.index_add_(0, order // k, y_perm.to(acc) * w[:, None])
    return out.to(y_perm.dtype)
