"""Sparse mixture-of-experts block (kind ``moe``; keys and closed forms in ``spec.py``).

    y = sum_j w_j(x) * expert_{i_j(x)}(x)  +  g(x) * sum_s shared_s(x)

``g(x) = sigmoid(x W_g)`` with ``shared_expert_gate`` (``shared_gate.weight``, (1, d_model)),
else 1; the combine weights w are multiplied by ``routed_scale`` (1 by default). Both run in the
block's own PyTorch code, whatever the expert backend.

The router (``router.py``) is fp32 math with an fp32 weight (``_keep_fp32``; it is not excluded
from weight decay). Dropless by default: every token reaches its k experts, so a token's output
depends on that token only (batch-independent, causal). With ``capacity_factor`` cf each expert
takes ceil(cf * N * k / E) token-slots per forward; slots beyond it are dropped in token order
(slot n*k + j before n'*k + j' when n < n', or n = n' and j < j'), contribute nothing, and are
counted in ``metrics["dropped"]``; whether a token is dropped then depends on the other tokens of
the batch.

``self.aux_loss = aux_loss_coef * load_balancing_loss + z_loss_coef * z_loss`` (scalar fp32, set
by every forward; the model sums it into ``out.aux_loss``). ``self.metrics`` after a forward
(detached tensors, no host synchronisation): ``load`` (E,) the fraction of token-slots per
expert (before drops), ``entropy`` the mean routing entropy (nats), ``dropped``, ``aux_loss`` and
``z_loss`` (unscaled).

Sigmoid router bias (aux-loss-free balancing): the per-expert selection bias is updated once per
training forward+backward by a gradient hook on the router logits, b_i += rate * sign(mean_load -
load_i), with the load of that forward: it never changes between a forward and its
activation-checkpoint recomputation, and does not move in eval mode or under ``torch.no_grad``.
Under expert parallelism the loads are summed over the EP group first.

Parameters: ``router.weight`` (E, d_model) fp32; ``w_in`` (E, d_model, n_in * d_ff), n_in = 2 for
SwiGLU (gate columns first, then up), 1 for GELU; ``w_out`` (E, d_ff, d_model); ``shared_w_in``
(d_model, n_in * S * shared_d_ff), ``shared_w_out`` (S * shared_d_ff, d_model) (the S shared
experts fused into one dense MLP: the same function).

The module is single-device. Expert parallelism is applied to a built block from outside
(``parallel.apply_expert_parallel``): it keeps this rank's slice of ``w_in`` / ``w_out`` and sets
the group the all-to-all runs over. Kernel choices (``MoEKernels``) are a constructor argument;
the defaults are the measured fastest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import ConfigError
from ...kernels.activations import swiglu
from ...kernels.moe.grouped_mlp import DEFAULT_LAYOUT
from ...kernels.moe.permute import argsort_experts, histogram
from ..base import Block
from .experts import expert_activation, experts_grouped, experts_loop
from .router import Router, load_balancing_from_sums, load_balancing_loss, routing_entropy, z_loss
from .spec import MoESpec


@dataclass(frozen=True)
class MoEKernels:
    """Kernel choices of one MoE block (benchmarks sweep them; the defaults are the measured
    choice). ``permute``: auto (Triton on CUDA) | torch | triton; ``mlp``: auto (the fused expert
    MLP op on CUDA bf16) | fused | autograd (``experts.py``); ``act``: the SwiGLU kernel, auto |
    torch | triton; ``layout``: the grouped GEMMs' operand layouts (``kernels.moe.grouped_mlp.
    LAYOUTS``); ``gemm``: torch (torch._grouped_mm) | loop (one cuBLAS mm per expert, one host
    synchronisation); ``router_logits``, ``router_topk``: the router's kernels (``router.py``)."""

    permute: str = "auto"
    mlp: str = "auto"
    act: str = "auto"
    layout: str = DEFAULT_LAYOUT
    gemm: str = "torch"
    router_logits: str = "auto"
    router_topk: str = "auto"


def capacity_of(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
    return int(math.ceil(capacity_factor * n_tokens * top_k / n_experts))


def apply_capacity(indices: torch.Tensor, weights: torch.Tensor, n_experts: int, capacity: int):
    """Drop the token-slots beyond ``capacity`` per expert, in token order (slot s = n*k + j).

    Returns (indices with dropped slots set to E, weights with them set to 0, keep mask (N, k)).
    """
    flat = indices.reshape(-1)
    order = argsort_experts(flat, n_experts)
    counts = histogram(flat, n_experts)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(flat)
    rank[order] = torch.arange(flat.numel(), device=flat.device) - start[flat[order]]
    keep = (rank < capacity).view_as(indices)
    return (torch.where(keep, indices, torch.full_like(indices, n_experts)),
            torch.where(keep, weights, torch.zeros_like(weights)), keep)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class MoEBlock(Block):
    spec_class = MoESpec

    def __init__(self, d_model: int, spec, *, layer_idx: int = 0, n_layers: int = 1,
                 kernels: MoEKernels | None = None):
        super().__init__(d_model, spec, layer_idx=layer_idx, n_layers=n_layers)
        s = self.spec
        self.kernels = kernels or MoEKernels()
        self.n_experts, self.top_k, self.d_ff = s.n_experts, s.top_k, s.hidden(d_model)
        self.activation = s.activation
        self.n_in = s.n_in
        self.capacity_factor = s.capacity_factor
        self.impl = s.resolved_impl()
        if self.impl == "megablocks":
            from .megablocks import megablocks_available

            if not megablocks_available():
                raise ConfigError(
                    "impl 'megablocks' needs the megablocks and grouped_gemm packages (pip install "
                    "--no-deps megablocks; see hybridseq/blocks/moe/megablocks.py), not importable here",
                    key="moe.impl")
        self.router = Router(d_model, self.n_experts, self.top_k, s.router, bool(s.renormalize),
                             float(s.bias_update_rate), logits_impl=self.kernels.router_logits,
                             topk_impl=self.kernels.router_topk)
        # expert parallelism, set by parallel.apply_expert_parallel: this rank holds experts
        # [ep_rank * E / ep_size, (ep_rank + 1) * E / ep_size)
        self.ep_size, self.ep_rank, self.ep_group = 1, 0, None
        self.n_local_experts = self.n_experts
        self.w_in = nn.Parameter(torch.empty(self.n_experts, d_model, self.n_in * self.d_ff))
        self.w_out = nn.Parameter(torch.empty(self.n_experts, self.d_ff, d_model))
        self.n_shared = s.shared_experts
        if self.n_shared:
            self.shared_d_ff = s.shared_hidden(d_model)
            hs = self.n_shared * self.shared_d_ff
            self.shared_w_in = nn.Parameter(torch.empty(d_model, self.n_in * hs))
            self.shared_w_out = nn.Parameter(torch.empty(hs, d_model))
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if s.shared_expert_gate else None
        self.routed_scale = float(s.routed_scale)
        self.reset_parameters()
        self.aux_loss = torch.zeros(())
        self.metrics: dict = {}

    # --- init --------------------------------------------------------------------------------
    def reset_parameters(self, std: float = 0.02) -> None:
        self.router.reset_parameters(std)
        for p in (self.w_in, self.w_out):
            nn.init.normal_(p, std=std)
        if self.n_shared:
            nn.init.normal_(self.shared_w_in, std=std)
            nn.init.normal_(self.shared_w_out, std=std)
        if self.shared_gate is not None:
            nn.init.normal_(self.shared_gate.weight, std=std)

    def residual_out_params(self) -> list[nn.Parameter]:
        out = [self.w_out]
        if self.n_shared:
            out.append(self.shared_w_out)
        return out

    def shard_experts(self, group) -> None:
        """Keep this rank's experts and route through ``group`` (``parallel.shard_experts``)."""
        from .parallel import shard_experts

        shard_experts(self, group)

    def graph_blocker(self, device, dtype) -> str | None:
        if self.capacity_factor is not None:
            return "capacity_factor drops tokens with a host synchronisation"
        if self.ep_group is not None:
            return "expert parallelism (all-to-all) is not captured"
        if self.impl in ("loop", "megablocks"):
            return f"impl {self.impl!r} synchronises with the host"
        if str(getattr(device, "type", device)).startswith("cuda") and dtype != torch.bfloat16:
            return f"the grouped GEMM reads group sizes on the host outside bfloat16 (activations are {dtype})"
        return None

    # --- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, state=None, offset: int = 0, doc_ids=None) -> torch.Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        n_tokens = xf.shape[0]
        r = self.router(xf)
        indices, weights = r.indices, r.weights
        dropped = torch.zeros((), dtype=torch.long, device=x.device)
        if self.capacity_factor is not None:
            cap = capacity_of(n_tokens, self.top_k, self.n_experts, self.capacity_factor)
            indices, weights, keep = apply_capacity(indices, weights, self.n_experts, cap)
            dropped = (~keep).sum()

        dt = compute_dtype(x)
        xc = (r.x if r.x is not None else xf).to(dt)  # r.x: x through the router's logits op
        w = weights  # fp32 combine weights; each backend applies them in fp32 or its compute dtype
        if self.routed_scale != 1.0:
            w = w * self.routed_scale
        if self.ep_group is not None:
            from .parallel import expert_parallel_experts

            y = expert_parallel_experts(xc, indices, w, self.w_in.to(dt), self.w_out.to(dt),
                                        self.activation, self.n_experts, self.ep_group,
                                        impl=self.impl, may_drop=self.capacity_factor is not None)
        else:
            y = self._experts(xc, indices, w, self.w_in.to(dt), self.w_out.to(dt))
        if self.n_shared:
            h = xc @ self.shared_w_in.to(dt)
            if self.activation == "swiglu" and h.is_cuda:
                h = swiglu(h, self.kernels.act)  # the fused Triton SwiGLU (one pass each way)
            else:
                h = expert_activation(h, self.activation)
            shared = h @ self.shared_w_out.to(dt)
            if self.shared_gate is not None:
                shared = torch.sigmoid(xc @ self.shared_gate.weight.to(dt).t()) * shared
            y = y + shared

        self._losses_and_metrics(r, dropped)
        return y.view(*shape[:-1], shape[-1])

    def _experts(self, x, indices, weights, w_in, w_out):
        if self.impl == "loop":
            return experts_loop(x, indices, weights, w_in, w_out, self.activation)
        if self.impl == "grouped":
            k = self.kernels
            return experts_grouped(x, indices, weights, w_in, w_out, self.activation,
                                   may_drop=self.capacity_factor is not None,
                                   permute_impl=k.permute, mlp_impl=k.mlp, act_impl=k.act,
                                   layout=k.layout, mlp_gemm=k.gemm)
        from .megablocks import experts_megablocks

        return experts_megablocks(x, indices, weights, w_in, w_out, self.activation,
                                  may_drop=self.capacity_factor is not None)

    def _losses_and_metrics(self, r, dropped) -> None:
        s = self.spec
        n_tok = max(r.probs.shape[0], 1)
        if r.stats is not None:  # sums from the router's own kernel (softmax router)
            counts = r.stats.counts
            lb = load_balancing_from_sums(counts, r.stats.prob_sum, r.indices.numel(), n_tok)
            zl = r.stats.lse_sq_sum / n_tok
            entropy = r.stats.entropy_sum / n_tok
        else:
            counts = histogram(r.indices, self.n_experts)
            lb = load_balancing_loss(r.probs, r.indices, self.n_experts, counts=counts)
            zl = z_loss(r.logits, r.lse)
            entropy = None
        self.aux_loss = torch.add(lb * float(s.aux_loss_coef), zl, alpha=float(s.z_loss_coef))
        with torch.no_grad():
            self.metrics = {
                "load": counts / max(r.indices.numel(), 1),  # int64 / number: float32
                "entropy": (entropy if entropy is not None else routing_entropy(r.probs)).detach(),
                "dropped": dropped.detach(),
                "aux_loss": lb.detach(),
                "z_loss": zl.detach(),
            }
        if (self.router.kind == "sigmoid" and self.training and torch.is_grad_enabled()
                and r.logits.requires_grad):
            r.logits.register_hook(self._bias_update_hook(counts))

    def _bias_update_hook(self, counts: torch.Tensor):
        def hook(grad):
            load = counts.float()
            if self.ep_group is not None:
                import torch.distributed as dist

                load = load.clone()
                dist.all_reduce(load, group=self.ep_group)
            self.router.update_bias(load)
            return None

        return hook

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_experts={self.n_experts}, top_k={self.top_k}, d_ff={self.d_ff}, "
                f"activation={self.activation}, router={self.router.kind}, impl={self.impl}, "
                f"shared={self.n_shared}, ep_size={self.ep_size}")
