"""Optional ``megablocks`` expert backend: MegaBlocks' dropless-MoE (dMoE) grouped path on our weights.

It runs what ``megablocks.layers.dmoe.ParallelDroplessMLP`` does with ``mlp_impl="grouped"``:
MegaBlocks' fused gather (``megablocks.ops.gather``) of the token-slots sorted by expert, two
grouped GEMMs from the ``grouped_gemm`` package (CUTLASS; ``gmm(a, b, batch_sizes)`` with the
per-expert row counts on the host), the activation, and MegaBlocks' fused weighted scatter
(``megablocks.ops.scatter``, with its weight gradient). It reads the layer's own stacked weights
(``w_in`` (E, d, n_in * d_ff), ``w_out`` (E, d_ff, d)) as they are, so the same weights give the
same outputs as the ``loop`` and ``grouped`` backends. The sorting and counting use torch ops.

Installing (CUDA machine with nvcc): megablocks pins ``torch==2.7.0`` on PyPI, so install it
without its dependencies and build ``grouped_gemm`` against the torch you have::

    pip install --no-deps megablocks
    pip install --no-build-isolation grouped_gemm    # needs nvcc and CUTLASS (fetched by its build)

(``stanford-stk`` is only needed by MegaBlocks' block-sparse path, which this backend does not
use.) megablocks' own CUDA extension does not compile with CUDA 13, and neither package has
wheels; where either is not importable the backend is absent (``impl: megablocks`` is a
ConfigError) and ``impl: auto`` never picks it. It is dropless only (capacity_factor must be null).
"""
from __future__ import annotations

import importlib.util

import torch

from hybridseq.kernels.moe.permute import histogram

from .experts import expert_activation


def megablocks_available() -> bool:
    """Whether ``megablocks`` and ``grouped_gemm`` are both importable (checked without importing)."""
    return all(importlib.util.find_spec(m) is not None for m in ("megablocks", "grouped_gemm"))


def experts_megablocks(x, indices, weights, w_in, w_out, activation, may_drop=False):
    """Same contract as ``experts.experts_grouped`` (dropless only; CUDA tensors)."""
    if may_drop:
        raise ValueError("the megablocks backend is dropless: use capacity_factor: null")
    import megablocks.ops as mb_ops
    from grouped_gemm import ops as gg_ops

    n, k = indices.shape
    n_experts = w_in.shape[0]
    flat = indices.reshape(-1)
    bin_ids, order = torch.sort(flat.int(), stable=True)
    counts = histogram(flat, n_experts)
    bins = torch.cumsum(counts, 0).int()
    order = order.int()
    x_sorted = mb_ops.gather(x.contiguous(), order, bin_ids, bins, k)
    batch_sizes = counts.cpu()
    h = expert_activation(gg_ops.gmm(x_sorted, w_in.contiguous(), batch_sizes), activation)
    y_sorted = gg_ops.gmm(h, w_out.contiguous(), batch_sizes)
    return mb_ops.scatter(y_sorted, order, bin_ids, weights.reshape(-1).to(x.dtype), bins, k)
