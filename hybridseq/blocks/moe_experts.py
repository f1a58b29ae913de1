"""Expert backends of the MoE layer: the routed experts applied to tokens and combined.

The experts of a layer are stacked: ``w_in`` (E, d_model, n_in * d_ff) (SwiGLU: n_in = 2, the
gate in columns [:d_ff] and the up projection in [d_ff:]; GELU: n_in = 1) and ``w_out``
(E, d_ff, d_model). Expert e maps a token row x to act(x @ w_in[e]) @ w_out[e], with
act(a) = silu(a[:, :d_ff]) * a[:, d_ff:] (SwiGLU) or gelu(a) (GELU, exact erf form).

Every backend computes, for x (N, d), indices (N, k) in [0, E] (E: a dropped slot) and
weights (N, k) fp32,
    y[n] = sum_{j: indices[n, j] < E} weights[n, j] * expert_{indices[n, j]}(x[n])
in x's dtype (weights stay fp32: the loop and the Triton un-permute combine in fp32, the torch
un-permute in x's dtype).

- ``loop``: the reference: for each expert, pick its token-slots (nonzero), run it, index_add the
  weighted result (accumulated in fp32, or fp64 for fp64 inputs). One host synchronisation per expert.
- ``grouped``: sort the token-slots by expert (``kernels.moe_permute``), one grouped GEMM per
  projection (``kernels.grouped_gemm``: ``torch._grouped_mm`` on CUDA bf16, a padded bmm
  elsewhere), un-permute with the weighted sum over the k slots (gathers only, no atomics).
- ``megablocks``: see ``moe_megablocks.py`` (optional dependency).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridseq.kernels.grouped_gemm import grouped_mm
from hybridseq.kernels.moe_permute import permute, sort_by_expert, unpermute


def expert_activation(a: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "swiglu":
        gate, up = a.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(a)


def experts_loop(x, indices, weights, w_in, w_out, activation):
    """Reference: one expert at a time (see the module docstring)."""
    n_experts = w_in.shape[0]
    acc = torch.promote_types(x.dtype, torch.float32)
    out = torch.zeros(x.shape[0], w_out.shape[-1], dtype=acc, device=x.device)
    for e in range(n_experts):
        tok, slot = (indices == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        h = expert_activation(x[tok] @ w_in[e], activation)
        y = h @ w_out[e]
        out = out.index_add(0, tok, y.to(acc) * weights[tok, slot].to(acc)[:, None])
    return out.to(x.dtype)


def run_sorted_experts(x_sorted, counts, w_in, w_out, activation, gemm_impl="auto"):
    """Experts on rows already grouped by expert: counts (E,) rows per expert, in order."""
    h = expert_activation(grouped_mm(x_sorted, w_in, counts, impl=gemm_impl), activation)
    return grouped_mm(h, w_out, counts, impl=gemm_impl)


def experts_grouped(x, indices, weights, w_in, w_out, activation, gemm_impl="auto",
                    may_drop=False, permute_impl="auto"):
    """Permute -> grouped GEMMs -> weighted un-permute. ``may_drop``: some indices equal E
    (capacity mode); their rows are cut before the GEMMs (one host synchronisation).
    ``permute_impl``: auto|torch|triton (``kernels.moe_permute``)."""
    n, k = indices.shape
    n_experts = w_in.shape[0]
    order, counts, inv = sort_by_expert(indices, n_experts)
    x_perm = permute(x, order, inv, k, impl=permute_impl)
    n_kept = int(counts[:n_experts].sum().item()) if may_drop else n * k
    if n_kept < n * k:  # (a no-op slice would still cost a zero-fill + copy in its backward)
        x_perm = x_perm[:n_kept]
    y = run_sorted_experts(x_perm, counts[:n_experts], w_in, w_out, activation, gemm_impl)
    if n_kept < n * k:
        y = torch.cat([y, y.new_zeros(n * k - n_kept, y.shape[-1])], 0)
    return unpermute(y, order, inv, weights, impl=permute_impl)
