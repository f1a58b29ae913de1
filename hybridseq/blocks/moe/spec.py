"""The ``moe`` kind's keys, checks and closed forms: a sparse mixture of experts with a router,
routed experts and optional shared experts. The module is ``block.MoEBlock``.

    y = sum_j w_j(x) * expert_{i_j(x)}(x)  +  sum_s shared_s(x)

- ``n_experts`` E, ``top_k`` k, ``d_ff`` (None: like ``mlp``), ``activation`` swiglu|gelu|relu2
  (relu2: ``relu(x W_in)^2 W_out``, not gated; Nemotron-H).
- ``router`` softmax|sigmoid|sinkhorn, ``renormalize`` (the top-k weights renormalised to sum
  to 1), ``bias_update_rate`` (the sigmoid router's aux-loss-free balancing), ``routed_scale``
  (a constant factor on the combine weights, after any renormalisation; DeepSeek-V3's and
  Nemotron-H's routed_scaling_factor).
- ``capacity_factor``: None is dropless (a token's output depends on that token only); a number
  cf caps each expert at ceil(cf * N * k / E) token-slots per forward.
- ``aux_loss_coef``, ``z_loss_coef``: the load-balancing and z-loss coefficients.
- ``shared_experts`` S always-on experts of width ``shared_d_ff`` (None: d_ff);
  ``shared_expert_gate``: their output multiplied by ``sigmoid(x W_g)``, W_g (d_model, 1)
  (Qwen2-MoE).
- ``ep_size``: the expert-parallel group size a distributed run shards the experts over (applied
  to a built model from outside: ``hybridseq.blocks.moe.parallel.apply_expert_parallel``).
- ``impl``: auto (= grouped) | grouped | megablocks | loop (``experts.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ...spec import fail, option
from ..spec import BlockSpec, ffn_dim, round8


@dataclass(eq=False)
class MoESpec(BlockSpec):
    kind: ClassVar[str] = "moe"
    megatron: ClassVar[str | None] = "E"
    hash_exclude: ClassVar[tuple] = ("impl", "aux_loss_coef", "z_loss_coef", "bias_update_rate", "ep_size")
    hash_optional: ClassVar[dict] = {"shared_expert_gate": False, "routed_scale": 1.0}

    n_experts: int = option(8, ge=1)
    top_k: int = 2
    d_ff: int | None = option(None, ge=1, doc="None: like mlp")
    activation: Literal["swiglu", "gelu", "relu2"] = "swiglu"
    router: Literal["softmax", "sigmoid", "sinkhorn"] = "softmax"
    renormalize: bool = True
    routed_scale: float = option(1.0, gt=0)
    capacity_factor: float | None = option(None, gt=0, doc="None: dropless")
    aux_loss_coef: float = option(0.01, ge=0)
    z_loss_coef: float = option(0.001, ge=0)
    bias_update_rate: float = option(0.001, ge=0)
    shared_experts: int = option(0, ge=0)
    shared_d_ff: int | None = option(None, ge=1, doc="None: = d_ff")
    shared_expert_gate: bool = False
    ep_size: int = option(1, ge=1)
    impl: Literal["auto", "grouped", "megablocks", "loop"] = "auto"

    def check(self, *, file=None, key: str = "", **context) -> None:
        e, k = self.n_experts, self.top_k
        if not 1 <= k <= e:
            fail(file, f"{key}.top_k", f"top_k={k} is out of range", f"1 <= top_k <= n_experts={e}")
        if e % self.ep_size != 0:
            fail(file, f"{key}.ep_size", f"ep_size={self.ep_size} does not divide n_experts={e}",
                 "each expert-parallel rank holds n_experts / ep_size experts")
        if self.impl == "megablocks" and self.capacity_factor is not None:
            fail(file, f"{key}.capacity_factor", "impl 'megablocks' is dropless: capacity_factor must be null")
        if self.shared_expert_gate and not self.shared_experts:
            fail(file, f"{key}.shared_expert_gate", "gates the shared experts, but shared_experts is 0",
                 "set shared_experts >= 1, or shared_expert_gate: false")

    # --- sizes ---------------------------------------------------------------------------------
    @property
    def n_in(self) -> int:
        """Input projections per expert: 2 for swiglu (gate and up), 1 for gelu and relu2."""
        return 2 if self.activation == "swiglu" else 1

    def hidden(self, d_model: int) -> int:
        return ffn_dim(d_model, self.d_ff, self.activation)

    def shared_hidden(self, d_model: int) -> int:
        return self.hidden(d_model) if self.shared_d_ff is None else int(self.shared_d_ff)

    def resolved_impl(self) -> str:
        """``auto`` -> ``grouped`` on every device: on CUDA it runs torch._grouped_mm and the fused
        Triton permutation; on CPU the padded bmm, measured 1.3-8x faster than the loop (fwd+bwd,
        d_model 64-128, 4-16 experts, 2048-4096 tokens). ``megablocks`` is never picked by
        ``auto``: it could not be built on our GPU machine, so it was never measured."""
        return "grouped" if self.impl == "auto" else self.impl

    def param_count(self, d_model: int) -> tuple[int, int]:
        """(total, active): router E d; experts E (n_in + 1) d d_ff (active: top_k of them);
        shared S (n_in + 1) d shared_d_ff (always active), + d with ``shared_expert_gate``.
        Totals are for the whole layer."""
        router = self.n_experts * d_model
        expert = (self.n_in + 1) * d_model * self.hidden(d_model)
        shared = self.shared_experts * (self.n_in + 1) * d_model * self.shared_hidden(d_model)
        if self.shared_expert_gate:
            shared += d_model
        return router + self.n_experts * expert + shared, router + self.top_k * expert + shared

    def flops_per_token(self, d_model: int, seq_len: int) -> float:
        """Matmul FLOPs per token (2 per multiply-add): router + top_k experts + shared (and its
        gate) (dropless; elementwise ops not counted)."""
        router = 2 * self.n_experts * d_model
        expert = 2 * (self.n_in + 1) * d_model * self.hidden(d_model)
        shared = self.shared_experts * 2 * (self.n_in + 1) * d_model * self.shared_hidden(d_model)
        if self.shared_expert_gate:
            shared += 2 * d_model
        return float(router + self.top_k * expert + shared)

    def activation_elements(self, d_model: int) -> int:
        """k (2 d + (n_in + 1) f) (permuted input, hidden and output of each of the k token
        copies) + E (router logits) + the shared experts as an mlp."""
        f = self.hidden(d_model)
        n = self.top_k * (2 * d_model + (self.n_in + 1) * f) + self.n_experts
        if self.shared_experts:
            n += (self.n_in + 1) * self.shared_experts * self.shared_hidden(d_model)
        return n

    def expert_params(self, d_model: int) -> int:
        return self.n_experts * (self.n_in + 1) * d_model * self.hidden(d_model)

    # --- texts ---------------------------------------------------------------------------------
    def _settings(self, d_model: int) -> str:
        out = f"experts={self.n_experts} top_k={self.top_k} d_ff={self.hidden(d_model)}"
        if self.shared_experts:
            out += f" shared={self.shared_experts}" + ("(gated)" if self.shared_expert_gate else "")
        if self.activation != "swiglu":
            out += f" {self.activation}"
        if self.capacity_factor:
            out += f" cf={self.capacity_factor}"
        return out

    def resolved(self, d_model: int) -> dict:
        return {**self.to_dict(), "d_ff": self.hidden(d_model), "shared_d_ff": self.shared_hidden(d_model)}

    def rescaled(self, d_old: int, d_new: int, ffn_scale: float = 1.0):
        out = {}
        for key in ("d_ff", "shared_d_ff"):
            v = getattr(self, key)
            if v is not None:
                out[key] = round8(v * d_new / d_old * ffn_scale)
            elif ffn_scale != 1.0 and key == "d_ff":
                out[key] = round8(ffn_dim(d_new, None, self.activation) * ffn_scale)
        return out

    def has_ffn(self) -> bool:
        return True

    def backend(self, device) -> tuple[str, str]:
        from .megablocks import megablocks_available

        impl = self.resolved_impl()
        mb = "megablocks installed" if megablocks_available() else "megablocks not installed"
        cuda = str(getattr(device, "type", device)).startswith("cuda")
        if impl == "grouped" and cuda:
            why = ("tokens sorted by expert (Triton counting sort), the expert MLP as one op over "
                   "torch._grouped_mm with the fused Triton SwiGLU (bf16; padded bmm for other dtypes), "
                   "Triton (un)permutation, router logits and softmax/top-k with the loss sums "
                   "(fp32 math), no host synchronisation")
        elif impl == "grouped":
            why = "tokens sorted by expert, one padded bmm per projection (faster than the loop on CPU)"
        elif impl == "loop":
            why = "reference: one matmul pair per expert"
        else:
            why = "MegaBlocks gather/scatter + grouped_gemm"
        return impl, f"{why}; {mb}"

    def build(self, d_model: int, *, layer_idx: int = 0, n_layers: int = 1):
        from .block import MoEBlock

        return MoEBlock(d_model, self, layer_idx=layer_idx, n_layers=n_layers)
