"""MoE routers and their losses; all routing math runs in float32.

A router maps tokens x (N, d_model) to
    logits  (N, E) fp32      x @ W^T, W the router weight (E, d_model)
    probs   (N, E) fp32      the distribution the load-balancing loss and entropy use
    indices (N, k) int64     the chosen experts of each token (slot j = its j-th choice)
    weights (N, k) fp32      the combine weights: y = sum_j weights[n, j] * expert_{indices[n, j]}(x_n)

Router kinds (spec key ``router``):
- ``softmax`` (Switch / Mixtral): probs = softmax(logits); top-k of probs; weights = the top-k
  probs, renormalised to sum to 1 when ``renormalize`` (Mixtral), raw otherwise (Switch). One op
  with the logsumexp the z-loss needs (``kernels.router_topk``: a Triton kernel each way on CUDA;
  ties between equal probs go to the lower expert index there).
- ``sigmoid`` (DeepSeek-V3, aux-loss-free balancing): scores = sigmoid(logits); the top-k is taken
  over scores + b, b a per-expert bias buffer used only for *selection*; weights = the selected
  scores (without b), renormalised when ``renormalize``. probs = scores / sum(scores) (for the
  aux loss and entropy). The bias is updated by ``update_bias`` with the rule
  b_i += rate * sign(mean_load - load_i) (no gradient); see ``MoEBlock`` for when it is called.
- ``sinkhorn`` (BlackMamba / Megatron): in training, the experts are chosen by the top-k of the
  Sinkhorn-balanced assignment matrix (rows of exp(logits) alternately normalised to sum to 1 and
  columns to N/E), which spreads tokens evenly over experts whatever the logits; at inference
  (``training=False``) by the plain top-k of the logits. weights = softmax(logits) at the chosen
  experts (sigmoid(logit) when top_k == 1, as Megatron), renormalised when ``renormalize`` and
  top_k > 1. The Sinkhorn matrix carries no gradient; the weights do.

Losses (each a scalar fp32 tensor; MoEBlock multiplies by the YAML coefficients):
- ``load_balancing_loss`` (Switch Transformer eq. 4, generalised to top-k):
  E * sum_i f_i * P_i, f_i = fraction of the N*k token-slots routed to expert i (before any
  capacity drop), P_i = mean over tokens of probs[:, i]. It is 1 under perfect balance
  (f = P = 1/E) and E under total collapse.
- ``z_loss`` (ST-MoE): mean over tokens of logsumexp(logits)^2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from hybridseq.kernels.moe.permute import histogram
from hybridseq.kernels.moe.router_logits import router_logits_tap
from hybridseq.kernels.moe.router_topk import RoutingStats, softmax_topk_stats

ROUTER_KINDS = ("softmax", "sigmoid", "sinkhorn")


@dataclass
class RouterOutput:
    logits: torch.Tensor   # (N, E) fp32
    probs: torch.Tensor    # (N, E) fp32
    indices: torch.Tensor  # (N, k) int64
    weights: torch.Tensor  # (N, k) fp32
    lse: torch.Tensor | None = None  # (N,) fp32 logsumexp(logits) when the router computed it
    # the router's input as its experts should read it (``kernels.router_logits_tap``: x itself,
    # or a view whose gradient the router's backward adds into its own dx); None: use x
    x: torch.Tensor | None = None
    # sums over the tokens for the losses and metrics when the router computed them with its
    # selection (``kernels.router_topk.softmax_topk_stats``: the softmax router); None: from probs
    stats: RoutingStats | None = None


def load_balancing_loss(probs: torch.Tensor, indices: torch.Tensor, n_experts: int,
                        counts: torch.Tensor | None = None) -> torch.Tensor:
    """Switch load-balancing loss E * sum_i f_i * P_i (see the module docstring); ``counts`` (E,)
    the token-slots per expert when already computed."""
    n_slots = indices.numel()
    if counts is None:
        counts = histogram(indices, n_experts)
    # E * sum_i (counts_i / n_slots) (sum_n probs[n, i] / N) as one dot: 4 kernels forward
    # instead of 6 (a few microseconds each on the GPU, per MoE layer and step)
    scale = n_experts / (max(n_slots, 1) * max(probs.shape[0], 1))
    return torch.dot(counts.to(torch.float32), probs.float().sum(dim=0)) * scale


def load_balancing_from_sums(counts: torch.Tensor, prob_sum: torch.Tensor, n_slots: int,
                             n_tokens: int) -> torch.Tensor:
    """``load_balancing_loss`` from counts (E,) slots per expert and prob_sum (E,) = sum over the
    n_tokens rows of probs: E * sum_i (counts_i / n_slots) * (prob_sum_i / n_tokens)."""
    scale = counts.shape[0] / (max(n_slots, 1) * max(n_tokens, 1))
    return torch.dot(counts.to(torch.float32), prob_sum) * scale


def z_loss(logits: torch.Tensor, lse: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss: mean(logsumexp(logits, -1) ** 2); ``lse`` = that logsumexp when already
    computed (the fused softmax router returns it)."""
    if lse is None:
        lse = torch.logsumexp(logits.float(), dim=-1)
    return lse.pow(2).mean()


def routing_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the entropy (nats) of the router distribution (a metric: its
    gradient is infinite where a probability is exactly 0)."""
    return torch.special.entr(probs.float()).sum(-1).mean()  # entr(p) = -p log p, 0 at p = 0


def sinkhorn(logits: torch.Tensor, n_iters: int = 30) -> torch.Tensor:
    """Balanced assignment matrix of ``logits`` (N, E), in log space.

    Alternately normalises rows to sum to 1 and columns to sum to N / E, starting from exp(logits);
    ``n_iters`` fixed iterations (no host synchronisation). Returns log of the matrix (N, E), fp32.
    """
    n, e = logits.shape
    log_p = logits.float()
    log_col_target = math.log(n / e)
    for _ in range(n_iters):
        log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True) + log_col_target
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
    return log_p


class Router(nn.Module):
    """Linear router (no bias) with fp32 math; the weight itself is kept in fp32 (tagged
    ``_keep_fp32``; it still gets weight decay).

    forward(x (N, d_model)) -> RouterOutput. ``logits_impl``: auto (default: triton on CUDA, torch
    elsewhere) | torch | triton (``kernels.moe.router_logits``; the same fp32 math).
    ``topk_impl``: the softmax router's selection (``kernels.moe.router_topk``), auto | torch |
    triton.
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, kind: str = "softmax",
                 renormalize: bool = True, bias_update_rate: float = 0.001, *,
                 logits_impl: str = "auto", topk_impl: str = "auto"):
        super().__init__()
        if kind not in ROUTER_KINDS:
            raise ValueError(f"router must be one of {ROUTER_KINDS}, got {kind!r}")
        self.n_experts, self.top_k, self.kind = n_experts, top_k, kind
        self.renormalize = renormalize
        self.bias_update_rate = bias_update_rate
        self.weight = nn.Parameter(torch.empty(n_experts, d_model, dtype=torch.float32))
        self.weight._keep_fp32 = True
        # sigmoid router: selection-only bias (aux-loss-free balancing); saved with the model.
        self.register_buffer("expert_bias", torch.zeros(n_experts, dtype=torch.float32),
                             persistent=(kind == "sigmoid"))
        # logits kernel (``kernels.router_logits``): torch = F.linear(x.float(), W); triton = the
        # same fp32 math read straight from x, dx written in x's dtype (CPU only under
        # TRITON_INTERPRET=1); auto = triton on CUDA. On the H100 the torch path's fp32 copy of x,
        # SIMT fp32 GEMMs and the fp32 dx cast cost ~0.47 ms of GPU time per fwd+bwd at 16384
        # tokens x d_model 2048 (profiled), most of the MoE layer's non-GEMM time.
        self.logits_impl = logits_impl
        # softmax routers: softmax, top-k, renormalisation and logsumexp as one op
        # (``kernels.router_topk``): auto = one Triton kernel each way on CUDA, torch elsewhere
        self.topk_impl = topk_impl
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.weight, std=std)

    def _apply(self, fn, recurse=True):
        """Keep the weight and the bias in float32 through module-wide dtype casts."""
        out = super()._apply(fn, recurse)
        if self.weight.dtype != torch.float32:
            self.weight.data = self.weight.data.float()
        if self.expert_bias.dtype != torch.float32:
            self.expert_bias = self.expert_bias.float()
        return out

    def logits_and_input(self, x: torch.Tensor):
        """(logits (N, E) fp32, x_tap): x_tap is what the experts should read instead of x
        (``kernels.router_logits.router_logits_tap``: the router's backward then adds their
        gradient of x into its own dx in one kernel)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits, x_tap = router_logits_tap(x, self.weight, self.logits_impl)
        return logits, x_tap

    def forward(self, x: torch.Tensor) -> RouterOutput:
        logits, x_tap = self.logits_and_input(x)
        k = self.top_k
        lse = stats = None  # the softmax router's logsumexp and sums (losses, metrics)
        with torch.autocast(device_type=x.device.type, enabled=False):
            if self.kind == "softmax":
                probs, weights, indices, lse, stats = softmax_topk_stats(logits, k, self.renormalize,
                                                                         self.topk_impl)
            elif self.kind == "sigmoid":
                scores = torch.sigmoid(logits)
                _, indices = torch.topk(scores.detach() + self.expert_bias, k, dim=-1)
                weights = scores.gather(1, indices)
                if self.renormalize and k > 1:
                    weights = weights / weights.sum(-1, keepdim=True)
                probs = scores / scores.sum(-1, keepdim=True)
            else:  # sinkhorn
                probs = torch.softmax(logits, dim=-1)
                if self.training:
                    with torch.no_grad():
                        _, indices = torch.topk(sinkhorn(logits.detach()), k, dim=-1)
                else:
                    _, indices = torch.topk(logits.detach(), k, dim=-1)
                if k == 1:
                    weights = torch.sigmoid(logits).gather(1, indices)
                else:
                    weights = probs.gather(1, indices)
                    if self.renormalize:
                        weights = weights / weights.sum(-1, keepdim=True)
        return RouterOutput(logits=logits, probs=probs, indices=indices, weights=weights, lse=lse,
                            x=x_tap, stats=stats)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """Aux-loss-free balancing step: b_i += rate * sign(mean(load) - load_i).

        ``load`` (E,) token-slot counts (or fractions). Overloaded experts get a lower bias and so
        are chosen less; underloaded ones a higher bias.
        """
        load = load.to(self.expert_bias.device, torch.float32)
        self.expert_bias.add_(self.bias_update_rate * torch.sign(load.mean() - load))
