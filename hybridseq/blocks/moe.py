"""Sparse mixture-of-experts block (kind ``moe``): router, routed experts, shared experts.

    y = sum_j w_j(x) * expert_{i_j(x)}(x)  +  sum_s shared_s(x)

Spec keys (defaults in ``hybridseq.config.schema.BLOCK_DEFAULTS["moe"]``):
- ``n_experts`` E, ``top_k`` k, ``d_ff`` (None: like ``mlp``: SwiGLU round_up(8/3 d_model, 8),
  GELU 4 d_model), ``activation`` swiglu|gelu.
- ``router`` softmax|sigmoid|sinkhorn, ``renormalize``, ``bias_update_rate``: see
  ``moe_router.py``. Router math is fp32 and the router weight itself is kept in fp32
  (``_keep_fp32``; it is not excluded from weight decay).
- ``capacity_factor``: None (default) is dropless: every token reaches its k experts, and a
  token's output depends on that token only (batch-independent, causal). A number cf gives each
  expert capacity = ceil(cf * N * k / E) token-slots per forward (N tokens in the batch); slots
  beyond it are dropped in token order (slot n*k + j before slot n'*k + j' when n < n', or n = n'
  and j < j'), contribute nothing, and are counted in ``metrics["dropped"]``. Capacity mode is
  NOT batch-independent: whether a token is dropped depends on the other tokens of the batch,
  including later positions.
- ``aux_loss_coef``, ``z_loss_coef``: ``self.aux_loss = aux_loss_coef * load_balancing_loss +
  z_loss_coef * z_loss`` (scalar fp32 tensor, set by every forward; the model sums it into
  ``out.aux_loss``).
- ``shared_experts`` S, ``shared_d_ff`` (None: d_ff): S always-on experts of the same activation,
  summed; stored fused as one dense MLP of hidden size S * shared_d_ff (the same function).
- ``ep_size``: expert parallelism (``moe_parallel.py``; the group comes from the ``ep_group``
  argument, ``set_expert_parallel_group(group)`` or consecutive world ranks).
- ``impl`` (``moe_experts.py``): ``loop`` (reference), ``grouped`` (permute by expert, one grouped
  GEMM per projection: on CUDA bf16 the expert MLP is one autograd op over torch._grouped_mm with
  the fused Triton SwiGLU, plus the fused Triton (un)permutation; padded bmm on CPU; no host
  synchronisation when dropless on CUDA), ``megablocks`` (``moe_megablocks.py``,
  optional), ``auto`` (= grouped, see ``resolve_impl``). Capacity mode costs one host
  synchronisation per forward (the kept row count).

Sigmoid router bias (aux-loss-free balancing): the per-expert selection bias is updated once per
training forward+backward: a gradient hook on the router logits applies
b_i += rate * sign(mean_load - load_i) with the load of that forward, when the backward reaches
this layer. So it never changes between a forward and its activation-checkpoint recomputation,
and it does not move in eval mode or under ``torch.no_grad``. Under expert parallelism the loads
are summed over the EP group first, so every rank of that group keeps the same bias; data-parallel
replicas outside the EP group each update their own copy (the bias is a persistent buffer,
``router.expert_bias``, saved in checkpoints; DDP's buffer broadcast re-syncs it, DeepSpeed does
not).

``self.metrics`` after a forward (detached tensors, no host synchronisation): ``load`` (E,) the
fraction of token-slots routed to each expert (before drops), ``entropy`` the mean routing
entropy (nats), ``dropped`` dropped token-slots, ``aux_loss`` and ``z_loss`` (unscaled).

Parameters: ``router.weight`` (E, d_model) fp32; ``w_in`` (E_local, d_model, n_in * d_ff) with
n_in = 2 for SwiGLU (gate columns first, then up), 1 for GELU; ``w_out`` (E_local, d_ff, d_model);
``shared_w_in`` (d_model, n_in * S * shared_d_ff), ``shared_w_out`` (S * shared_d_ff, d_model).
E_local = E / ep_size.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from hybridseq.errors import ConfigError

from hybridseq.kernels.moe.grouped_mlp import DEFAULT_LAYOUT
from hybridseq.kernels.moe.permute import argsort_experts, histogram
from hybridseq.kernels.activations.swiglu import swiglu

from .base import Block
from .moe_experts import expert_activation, experts_grouped, experts_loop
from .moe_parallel import (expert_parallel_experts, get_expert_parallel_group,  # noqa: F401
                           resolve_ep_group, set_expert_parallel_group)
from .moe_router import Router, load_balancing_from_sums, load_balancing_loss, routing_entropy, z_loss

try:  # the config package's shared rule; the inline copy below is the same rule
    from hybridseq.config import resolve_ffn_dim as _resolve_ffn_dim
except Exception:  # pragma: no cover - only while hybridseq.config is incomplete
    _resolve_ffn_dim = None

IMPLS = ("auto", "grouped", "megablocks", "loop")


def _moe_defaults() -> dict:
    from hybridseq.config.schema import BLOCK_DEFAULTS

    return dict(BLOCK_DEFAULTS["moe"])


def ffn_dim(d_model: int, d_ff, activation: str) -> int:
    """The expert hidden size: d_ff, or the ``mlp`` default when None."""
    if _resolve_ffn_dim is not None:
        return int(_resolve_ffn_dim(d_model, d_ff, activation))
    if d_ff is not None:
        return int(d_ff)
    if activation == "swiglu":
        return int(math.ceil(8 * d_model / 3 / 8) * 8)
    return 4 * d_model


def resolve_moe_spec(d_model: int, spec: Mapping[str, Any]) -> dict:
    """Defaults filled in, d_ff resolved, shapes checked (ConfigError naming the key)."""
    s = _moe_defaults()
    s.update({k: v for k, v in dict(spec).items() if k != "kind"})
    if not isinstance(s["n_experts"], int) or s["n_experts"] < 1:
        raise ConfigError(f"n_experts must be a positive integer, got {s['n_experts']!r}", key="moe.n_experts")
    if not isinstance(s["top_k"], int) or not 1 <= s["top_k"] <= s["n_experts"]:
        raise ConfigError(f"top_k must be in [1, n_experts={s['n_experts']}], got {s['top_k']!r}", key="moe.top_k")
    if s["activation"] not in ("swiglu", "gelu"):
        raise ConfigError(f"activation must be swiglu or gelu, got {s['activation']!r}", key="moe.activation")
    if s["impl"] not in IMPLS:
        raise ConfigError(f"impl must be one of {'|'.join(IMPLS)}, got {s['impl']!r}", key="moe.impl")
    cf = s["capacity_factor"]
    if cf is not None and not (isinstance(cf, (int, float)) and cf > 0):
        raise ConfigError(f"capacity_factor must be null or a positive number, got {cf!r}", key="moe.capacity_factor")
    ep = s["ep_size"]
    if not isinstance(ep, int) or ep < 1 or s["n_experts"] % ep:
        raise ConfigError(f"ep_size must be a positive divisor of n_experts={s['n_experts']}, got {ep!r}", key="moe.ep_size")
    if not isinstance(s["shared_experts"], int) or s["shared_experts"] < 0:
        raise ConfigError(f"shared_experts must be an integer >= 0, got {s['shared_experts']!r}", key="moe.shared_experts")
    s["d_ff"] = ffn_dim(d_model, s["d_ff"], s["activation"])
    s["shared_d_ff"] = s["d_ff"] if s["shared_d_ff"] is None else int(s["shared_d_ff"])
    return s


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


def megablocks_available() -> bool:
    from .moe_megablocks import megablocks_available as _avail

    return _avail()


def resolve_impl(impl: str, device: torch.device | str | None = None) -> str:
    """``auto`` -> ``grouped`` on every device: on CUDA it runs torch._grouped_mm and the fused
    Triton permutation; on CPU the padded bmm, measured 1.3-8x faster than the loop (fwd+bwd, d_model 64-128,
    4-16 experts, 2048-4096 tokens, on the shared 2-core CPU). ``megablocks`` is never picked by
    ``auto``: it could not be built on our GPU machine, so it was never measured against
    ``grouped``. ``device`` is accepted for callers that ask per device (``hybridseq doctor``);
    the answer is the same on every device."""
    if impl == "auto":
        return "grouped"
    return impl


def describe_moe_backend(spec: Mapping[str, Any], device=None) -> tuple[str, str]:
    """(backend, why) that a ``moe`` block of ``spec`` uses on ``device`` (for ``hybridseq doctor``)."""
    impl = resolve_impl(dict(spec).get("impl", "auto"))
    dev = torch.device(device) if device is not None else torch.device("cpu")
    mb = "megablocks installed" if megablocks_available() else "megablocks not installed"
    if impl == "grouped":
        if dev.type == "cuda":
            why = ("tokens sorted by expert (Triton counting sort), the expert MLP as one op over "
                   "torch._grouped_mm with the fused Triton SwiGLU (bf16; padded bmm for other dtypes), "
                   "Triton (un)permutation, router logits and softmax/top-k with the loss sums "
                   "(fp32 math), no host synchronisation")
        else:
            why = "tokens sorted by expert, one padded bmm per projection (faster than the loop on CPU)"
    elif impl == "loop":
        why = "reference: one matmul pair per expert"
    else:
        why = "MegaBlocks gather/scatter + grouped_gemm"
    return impl, f"{why}; {mb}"


class MoEBlock(Block):
    kind = "moe"

    def __init__(self, d_model: int, spec: Mapping[str, Any], *, layer_idx: int = 0, n_layers: int = 1,
                 ep_group=None):
        s = resolve_moe_spec(d_model, spec)
        super().__init__(d_model, s, layer_idx=layer_idx, n_layers=n_layers)
        self.n_experts, self.top_k, self.d_ff = s["n_experts"], s["top_k"], s["d_ff"]
        self.activation = s["activation"]
        self.n_in = 2 if self.activation == "swiglu" else 1
        self.capacity_factor = s["capacity_factor"]
        self.impl = s["impl"]
        # grouped backend knobs (benchmarks sweep them; the defaults are the measured choice):
        self.permute_impl = "auto"  # auto (Triton on CUDA) | torch | triton
        self.mlp_impl = "auto"      # auto (fused on CUDA bf16) | fused | autograd: moe_experts.py
        self.act_impl = "auto"      # fused SwiGLU kernel: auto (Triton on CUDA) | torch | triton
        self.gemm_layout = DEFAULT_LAYOUT  # kernels.grouped_mlp.LAYOUTS
        self.mlp_gemm = "torch"     # fused path GEMMs: torch (_grouped_mm) | loop (cuBLAS per expert, 1 sync)
        if self.impl == "megablocks":
            if not megablocks_available():
                raise ConfigError(
                    "impl 'megablocks' needs the megablocks and grouped_gemm packages (pip install "
                    "--no-deps megablocks; see hybridseq/blocks/moe_megablocks.py), not importable here",
                    key="moe.impl")
            if self.capacity_factor is not None:
                raise ConfigError("impl 'megablocks' is dropless: capacity_factor must be null",
                                  key="moe.capacity_factor")
        self.router = Router(d_model, self.n_experts, self.top_k, s["router"], bool(s["renormalize"]),
                             float(s["bias_update_rate"]))
        self.ep_size = s["ep_size"]
        self.ep_group = None
        self.ep_rank = 0
        if self.ep_size > 1:
            self.ep_group, self.ep_rank = resolve_ep_group(self.ep_size, ep_group)
        self.n_local_experts = self.n_experts // self.ep_size
        self.w_in = nn.Parameter(torch.empty(self.n_local_experts, d_model, self.n_in * self.d_ff))
        self.w_out = nn.Parameter(torch.empty(self.n_local_experts, self.d_ff, d_model))
        if self.ep_size > 1:
            for p in (self.w_in, self.w_out):
                p._expert_parallel = True  # sharded over the EP group: not all-reduced over it
        self.n_shared = s["shared_experts"]
        if self.n_shared:
            hs = self.n_shared * s["shared_d_ff"]
            self.shared_d_ff = s["shared_d_ff"]
            self.shared_w_in = nn.Parameter(torch.empty(d_model, self.n_in * hs))
            self.shared_w_out = nn.Parameter(torch.empty(hs, d_model))
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

    def residual_out_params(self) -> list[nn.Parameter]:
        out = [self.w_out]
        if self.n_shared:
            out.append(self.shared_w_out)
        return out

    def set_expert_parallel_group(self, group) -> None:
        """Use ``group`` (a torch.distributed process group of size ep_size) for the all-to-all."""
        self.ep_group, rank = resolve_ep_group(self.ep_size, group)
        if rank != self.ep_rank:
            raise ValueError(f"the new EP group gives this process rank {rank}, but its experts were "
                             f"built for EP rank {self.ep_rank}")

    # --- accounting ---------------------------------------------------------------------------
    @staticmethod
    def param_count(d_model: int, spec: Mapping[str, Any]) -> tuple[int, int]:
        """(total, active): router E*d; experts E*(n_in+1)*d*d_ff (active: top_k of them);
        shared S*(n_in+1)*d*shared_d_ff (always active). Totals are for the whole layer (all EP
        ranks)."""
        s = resolve_moe_spec(d_model, spec)
        n_in = 2 if s["activation"] == "swiglu" else 1
        router = s["n_experts"] * d_model
        expert = (n_in + 1) * d_model * s["d_ff"]
        shared = s["shared_experts"] * (n_in + 1) * d_model * s["shared_d_ff"]
        return router + s["n_experts"] * expert + shared, router + s["top_k"] * expert + shared

    @staticmethod
    def flops_per_token(d_model: int, spec: Mapping[str, Any], seq_len: int) -> float:
        """Forward matmul FLOPs per token (2 per multiply-add): router + top_k experts + shared
        (dropless; elementwise ops not counted)."""
        s = resolve_moe_spec(d_model, spec)
        n_in = 2 if s["activation"] == "swiglu" else 1
        router = 2 * s["n_experts"] * d_model
        expert = 2 * (n_in + 1) * d_model * s["d_ff"]
        shared = s["shared_experts"] * 2 * (n_in + 1) * d_model * s["shared_d_ff"]
        return float(router + s["top_k"] * expert + shared)

    # --- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, state=None, offset: int = 0) -> torch.Tensor:
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
        if self.ep_size > 1:
            y = expert_parallel_experts(xc, indices, w, self.w_in.to(dt), self.w_out.to(dt),
                                        self.activation, self.n_experts, self.ep_group,
                                        impl=resolve_impl(self.impl),
                                        may_drop=self.capacity_factor is not None)
        else:
            y = self._experts(xc, indices, w, self.w_in.to(dt), self.w_out.to(dt))
        if self.n_shared:
            h = xc @ self.shared_w_in.to(dt)
            if self.activation == "swiglu" and h.is_cuda:
                h = swiglu(h, self.act_impl)  # the fused Triton SwiGLU (one pass each way)
            else:
                h = expert_activation(h, self.activation)
            y = y + h @ self.shared_w_out.to(dt)

        self._losses_and_metrics(r, dropped)
        return y.view(*shape[:-1], shape[-1])

    def _experts(self, x, indices, weights, w_in, w_out):
        impl = resolve_impl(self.impl)
        if impl == "loop":
            return experts_loop(x, indices, weights, w_in, w_out, self.activation)
        if impl == "grouped":
            return experts_grouped(x, indices, weights, w_in, w_out, self.activation,
                                   may_drop=self.capacity_factor is not None,
                                   permute_impl=self.permute_impl, mlp_impl=self.mlp_impl,
                                   act_impl=self.act_impl, layout=self.gemm_layout,
                                   mlp_gemm=self.mlp_gemm)
        from .moe_megablocks import experts_megablocks

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
        self.aux_loss = torch.add(lb * float(s["aux_loss_coef"]), zl, alpha=float(s["z_loss_coef"]))
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
