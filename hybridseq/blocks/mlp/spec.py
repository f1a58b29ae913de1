"""The ``mlp`` kind's keys and closed forms: a dense feed-forward layer. The module is
``block.MLPBlock``.

- ``swiglu``: ``down(silu(gate(x)) * up(x))``, three d x d_ff matrices (d_ff default
  round_up(8/3 d, 8), the parameters of a 4x GELU MLP);
- ``gelu``: ``down(gelu(up(x)))``, two matrices (d_ff default 4 d);
- ``relu2``: ``down(relu(up(x))^2)``, squared ReLU (So et al. 2021; Nemotron-H), two matrices
  (d_ff default 4 d).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ...spec import option
from ..spec import BlockSpec, ffn_dim, round8


@dataclass(eq=False)
class MLPSpec(BlockSpec):
    kind: ClassVar[str] = "mlp"
    megatron: ClassVar[str | None] = "-"
    hash_exclude: ClassVar[tuple] = ()

    d_ff: int | None = option(None, ge=1, doc="None: swiglu round_up(8/3 d, 8), else 4 d")
    activation: Literal["swiglu", "gelu", "relu2"] = "swiglu"
    bias: bool = False

    def hidden(self, d_model: int) -> int:
        return ffn_dim(d_model, self.d_ff, self.activation)

    @property
    def n_in(self) -> int:
        """Input projections: 2 for swiglu (gate and up), else 1."""
        return 2 if self.activation == "swiglu" else 1

    def param_count(self, d_model: int) -> tuple[int, int]:
        """swiglu: 3 d d_ff (+ 2 d_ff + d biases); gelu, relu2: 2 d d_ff (+ d_ff + d biases)."""
        f = self.hidden(d_model)
        n = (self.n_in + 1) * d_model * f
        if self.bias:
            n += self.n_in * f + d_model
        return n, n

    def flops_per_token(self, d_model: int, seq_len: int) -> float:
        """2 FLOPs per multiply-accumulate of the projections: swiglu 6 d d_ff, else 4 d d_ff
        (activations, O(d_ff), are not counted)."""
        return float(2 * (self.n_in + 1) * d_model * self.hidden(d_model))

    def activation_elements(self, d_model: int) -> int:
        """The hidden projections and the activation: 3 d_ff (swiglu), 2 d_ff otherwise."""
        return (self.n_in + 1) * self.hidden(d_model)

    def _settings(self, d_model: int) -> str:
        return (f"d_ff={self.d_ff} " if self.d_ff else "") + self.activation

    def resolved(self, d_model: int) -> dict:
        return {**self.to_dict(), "d_ff": self.hidden(d_model)}

    def rescaled(self, d_old: int, d_new: int, ffn_scale: float = 1.0):
        """An explicit d_ff scales with d_model (multiples of 8); a derived one follows by itself
        unless ``ffn_scale`` asks for more."""
        if self.d_ff is not None:
            return {"d_ff": round8(self.d_ff * d_new / d_old * ffn_scale)}
        if ffn_scale != 1.0:
            return {"d_ff": round8(ffn_dim(d_new, None, self.activation) * ffn_scale)}
        return {}

    def has_ffn(self) -> bool:
        return True

    def backend(self, device) -> tuple[str, str]:
        return "torch", "dense matmuls (cuBLAS on CUDA)"

    def build(self, d_model: int, *, layer_idx: int = 0, n_layers: int = 1):
        from .block import MLPBlock

        return MLPBlock(d_model, self, layer_idx=layer_idx, n_layers=n_layers)
