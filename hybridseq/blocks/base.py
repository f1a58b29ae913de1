"""The contract every block kind follows (one residual sublayer: x = x + block(norm(x))).

A block receives the *normed* input and returns the update; the model adds the residual.

    class MyBlock(Block):
        kind = "mykind"
        def __init__(self, d_model, spec, *, layer_idx=0, n_layers=1): ...
        def forward(self, x, state=None, offset=0) -> Tensor        # (B, L, d_model) -> same
        @staticmethod
        def param_count(d_model, spec) -> tuple[int, int]            # (total, active), exact
        @staticmethod
        def flops_per_token(d_model, spec, seq_len) -> float         # forward FLOPs (2 per MAC)
        @staticmethod
        def state_bytes(d_model, spec, max_seq_len, dtype_bytes=2) -> int  # per sequence
        def new_state(batch_size, max_seq_len, device, dtype) -> dict[str, Tensor] | None
        def residual_out_params(self) -> list[nn.Parameter]           # rescaled by depth at init

Inference state (``state``) is a dict of tensors owned by the block, updated *in place of the
dict's entries* (``state["ssm"] = new``) so the cache sees the new tensors; ``offset`` is the
number of tokens already absorbed into the state (positions for RoPE and the KV cache).

Parameter tags (set as attributes on nn.Parameter, read by the trainer and DeepSpeed code):
    p._no_weight_decay = True   # excluded from weight decay (A_log, D, dt bias; norms/biases are
                                # excluded by the trainer anyway, by ndim < 2)
    p._keep_fp32 = True         # stays float32 in every precision mode

Blocks that add an auxiliary loss (MoE) set ``self.aux_loss`` (a scalar tensor, already
multiplied by its coefficients) and ``self.metrics`` (a dict of floats/tensors) during forward.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn


class Block(nn.Module):
    kind: str = ""

    def __init__(self, d_model: int, spec: Mapping[str, Any], *, layer_idx: int = 0, n_layers: int = 1):
        super().__init__()
        self.d_model = d_model
        self.spec = dict(spec)
        self.layer_idx = layer_idx
        self.n_layers = n_layers

    # --- inference state -------------------------------------------------------------------
    def new_state(self, batch_size: int, max_seq_len: int, device=None, dtype=None):
        return None

    @staticmethod
    def state_bytes(d_model: int, spec: Mapping[str, Any], max_seq_len: int, dtype_bytes: int = 2) -> int:
        return 0

    # --- accounting ------------------------------------------------------------------------
    @staticmethod
    def param_count(d_model: int, spec: Mapping[str, Any]) -> tuple[int, int]:
        raise NotImplementedError

    @staticmethod
    def flops_per_token(d_model: int, spec: Mapping[str, Any], seq_len: int) -> float:
        raise NotImplementedError

    def residual_out_params(self) -> list[nn.Parameter]:
        return []

    # --- fp32 parameters under module-wide casts -------------------------------------------
    def _apply(self, fn, recurse=True):
        """Keep parameters tagged ``_keep_fp32`` in float32 through .half()/.bfloat16()/.to(dtype)."""
        out = super()._apply(fn, recurse)
        for p in self.parameters():  # children too (e.g. Mamba's dt_proj.bias)
            if getattr(p, "_keep_fp32", False) and p.dtype != torch.float32:
                p.data = p.data.float()
        return out


def keep_fp32(p: nn.Parameter, no_weight_decay: bool = True) -> nn.Parameter:
    p._keep_fp32 = True
    if no_weight_decay:
        p._no_weight_decay = True
    return p
