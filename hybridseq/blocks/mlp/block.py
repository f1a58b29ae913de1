"""Dense feed-forward block (kind ``mlp``; keys and closed forms in ``spec.py``).

- ``swiglu`` (Shazeer 2020): ``down(silu(gate(x)) * up(x))``. The gate and up projections are one
  ``nn.Linear`` (``gate_up_proj``, d -> 2 d_ff, gate rows first), so the forward runs one GEMM for
  both and the fused SwiGLU (``kernels.activations.swiglu``: one Triton pass each way on CUDA)
  reads its output; the backward runs one dgrad and one wgrad GEMM for both. Checkpoints with
  separate ``gate_proj`` / ``up_proj`` weights still load (concatenated on load).
- ``gelu``: ``down(gelu(up(x)))`` (exact GELU); ``relu2``: ``down(relu(up(x))^2)``.

Biases on every projection when ``spec.bias``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.activations import swiglu
from ..base import Block
from .spec import MLPSpec


class MLPBlock(Block):
    spec_class = MLPSpec

    def __init__(self, d_model: int, spec, *, layer_idx: int = 0, n_layers: int = 1):
        super().__init__(d_model, spec, layer_idx=layer_idx, n_layers=n_layers)
        self.activation = self.spec.activation
        self.d_ff = self.spec.hidden(d_model)
        bias = bool(self.spec.bias)
        if self.activation == "swiglu":
            self.gate_up_proj = nn.Linear(d_model, 2 * self.d_ff, bias=bias)  # [gate; up] rows
        else:
            self.up_proj = nn.Linear(d_model, self.d_ff, bias=bias)
        self.down_proj = nn.Linear(self.d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor, state=None, offset: int = 0, doc_ids=None) -> torch.Tensor:
        if self.activation == "swiglu":
            h = swiglu(self.gate_up_proj(x))  # one Triton pass each way on CUDA
        elif self.activation == "relu2":
            h = F.relu(self.up_proj(x)).square()
        else:
            h = F.gelu(self.up_proj(x))
        return self.down_proj(h)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Accept the separate ``gate_proj`` / ``up_proj`` of checkpoints written before the two
        were fused: their weights (and biases) become ``gate_up_proj``'s, gate rows first."""
        if self.activation == "swiglu" and prefix + "gate_proj.weight" in state_dict:
            for kind in ("weight", "bias"):
                g, u = prefix + "gate_proj." + kind, prefix + "up_proj." + kind
                if g in state_dict and u in state_dict:
                    state_dict[prefix + "gate_up_proj." + kind] = torch.cat(
                        [state_dict.pop(g), state_dict.pop(u)], dim=0)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def residual_out_params(self) -> list[nn.Parameter]:
        return [self.down_proj.weight]
