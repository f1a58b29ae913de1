"""Expert backends of the MoE layer: the routed experts applied to tokens and combined.

The experts of a layer are stacked: ``w_in`` (E, d_model, n_in * d_ff) (SwiGLU: n_in = 2, the
gate in columns [:d_ff] and the up projection in [d_ff:]; GELU: n_in = 1) and ``w_out``
(E, d_ff, d_model). Expert e maps a token row x to act(x @ w_in[e]) @ w_out[e], with
act(a) = silu(a[:, :d_ff]) * a[:, d_ff:] (SwiGLU), gelu(a) (GELU, exact erf form) or relu(a)^2
(relu2; the fused grouped MLP op has no relu2, so it runs the per-projection path everywhere).

Every backend computes, for x (N, d), indices (N, k) in [0, E] (E: a dropped slot) and
weights (N, k) fp32,
    y[n] = sum_{j: indices[n, j] < E} weights[n, j] * expert_{indices[n, j]}(x[n])
in x's dtype (weights stay fp32: the loop and the Triton un-permute combine in fp32, the torch
un-permute in x's dtype).

- ``loop``: the reference: for each expert, pick its token-slots (nonzero), run it, index_add the
  weighted result (accumulated in fp32, or fp64 for fp64 inputs). One host synchronisation per expert.
- ``grouped``: sort the token-slots by expert (``kernels.moe_permute``), one grouped GEMM per
  projection, un-permute with the weighted sum over the k slots (gathers only, no atomics). On
  CUDA bf16 the expert MLP is one autograd op (``kernels.grouped_mlp``: torch._grouped_mm for the
  six GEMMs, the fused Triton SwiGLU forward/backward of ``kernels.swiglu``, operand layouts
  selectable); elsewhere ``kernels.grouped_gemm`` per projection (a padded bmm on CPU) with
  autograd through the activation.
- ``megablocks``: see ``megablocks.py`` (optional dependency).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridseq.kernels.moe.grouped_gemm import grouped_mm
from hybridseq.kernels.moe.grouped_mlp import DEFAULT_LAYOUT, grouped_mlp, grouped_mlp_supported
from hybridseq.kernels.moe.permute import permute, sort_by_expert, unpermute


def expert_activation(a: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "swiglu":
        gate, up = a.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "relu2":
        return F.relu(a).square()
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


MLP_IMPLS = ("auto", "fused", "autograd")


def use_fused_mlp(x, w_in, w_out, mlp_impl: str = "auto") -> bool:
    """``fused``: ``kernels.grouped_mlp`` (one autograd op: explicit grouped GEMMs, fused SwiGLU);
    ``autograd``: ``grouped_mm`` per projection and autograd through the activation; ``auto``:
    fused where its torch._grouped_mm path runs (CUDA bf16, aligned sizes), else autograd."""
    if mlp_impl not in MLP_IMPLS:
        raise ValueError(f"moe mlp impl must be one of {'|'.join(MLP_IMPLS)}, got {mlp_impl!r}")
    if mlp_impl == "autograd":
        return False
    ok = grouped_mlp_supported(x, w_in, w_out)
    if mlp_impl == "fused" and not ok:
        raise ValueError("moe mlp impl 'fused' needs CUDA bf16 tensors with sizes that are multiples of 8 "
                         f"(got {x.device} {x.dtype}, d_model {x.shape[-1]}, d_ff {w_out.shape[-2]})")
    return ok


def run_sorted_experts(x_sorted, counts, w_in, w_out, activation, gemm_impl="auto", *,
                       mlp_impl="auto", act_impl="auto", layout=DEFAULT_LAYOUT, mlp_gemm="torch"):
    """Experts on rows already grouped by expert: counts (E,) rows per expert, in order.
    ``mlp_impl`` (see ``use_fused_mlp``), ``act_impl`` (SwiGLU kernel: auto|torch|triton),
    ``layout`` (``kernels.grouped_mlp.LAYOUTS``) and ``mlp_gemm`` (torch: torch._grouped_mm, no
    host sync | loop: one cuBLAS mm per expert, one host sync) apply to the fused path;
    ``gemm_impl`` to the autograd path (``kernels.grouped_gemm``)."""
    if activation == "relu2" and mlp_impl == "fused":
        raise ValueError("moe mlp impl 'fused' supports swiglu and gelu, not relu2")
    if activation != "relu2" and use_fused_mlp(x_sorted, w_in, w_out, mlp_impl):
        return grouped_mlp(x_sorted, counts, w_in, w_out, activation, act_impl=act_impl, layout=layout,
                           gemm=mlp_gemm)
    h = expert_activation(grouped_mm(x_sorted, w_in, counts, impl=gemm_impl), activation)
    return grouped_mm(h, w_out, counts, impl=gemm_impl)


def experts_grouped(x, indices, weights, w_in, w_out, activation, gemm_impl="auto",
                    may_drop=False, permute_impl="auto", *, mlp_impl="auto", act_impl="auto",
                    layout=DEFAULT_LAYOUT, mlp_gemm="torch"):
    """Permute -> grouped GEMMs -> weighted un-permute. ``may_drop``: some indices equal E
    (capacity mode); their rows are cut before the GEMMs (one host synchronisation).
    ``permute_impl``: auto|torch|triton (``kernels.moe_permute``); ``mlp_impl``, ``act_impl``,
    ``layout``, ``mlp_gemm``: see ``run_sorted_experts``."""
    n, k = indices.shape
    n_experts = w_in.shape[0]
    order, counts, inv = sort_by_expert(indices, n_experts)
    x_perm = permute(x, order, inv, k, impl=permute_impl)
    n_kept = int(counts[:n_experts].sum().item()) if may_drop else n * k
    if n_kept < n * k:  # (a no-op slice would still cost a zero-fill + copy in its backward)
        x_perm = x_perm[:n_kept]
    y = run_sorted_experts(x_perm, counts[:n_experts], w_in, w_out, activation, gemm_impl,
                           mlp_impl=mlp_impl, act_impl=act_impl, layout=layout, mlp_gemm=mlp_gemm)
    if n_kept < n * k:
        y = torch.cat([y, y.new_zeros(n * k - n_kept, y.shape[-1])], 0)
    return unpermute(y, order, inv, weights, impl=permute_impl)
