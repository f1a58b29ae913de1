"""The module contract every block kind follows (one residual sublayer: x = x + block(norm(x))).

A block receives the *normed* input and returns the update; the model adds the residual.

    class MyBlock(Block):
        spec_class = MySpec                                       # the kind's BlockSpec
        def __init__(self, d_model, spec, *, layer_idx=0, n_layers=1): ...
        def forward(self, x, state=None, offset=0, doc_ids=None) -> Tensor   # (B, L, d) -> same
        def step(self, x, state, pos) -> Tensor                   # one token, (B, 1, d) -> same
        def new_state(batch_size, max_seq_len, device, dtype) -> dict[str, Tensor] | None
        def residual_out_params(self) -> list[nn.Parameter]       # rescaled by depth at init
        def graph_blocker(self, device, dtype) -> str | None      # why ``step`` can't be captured
        def state_capacity(self, state) -> int | None             # tokens a state can hold
        def shard_experts(self, group)                            # expert parallelism

``spec`` is the kind's typed ``BlockSpec`` (a plain mapping is checked into one). The closed
forms (parameters, FLOPs, state bytes) live on the spec: ``block.spec.param_count(d_model)``.

Inference state (``state``) is a dict of tensors owned by the block and always updated in
place: ``forward`` with a state continues it from ``offset`` tokens (a prefill or a chunk of any
length) and leaves the new state in the same tensors; ``step`` consumes one token at the device
position ``pos`` (a 0-d int64 tensor) without host synchronisation, so the model's one-token
forward can be captured in a CUDA graph and replayed. Stateless kinds inherit ``step`` = their
forward.

Packed documents: ``doc_ids`` (B, L) integer, a document being a maximal run of equal ids. No
state or attention may cross a document boundary: token-wise kinds ignore it, attention masks
across documents, recurrent kinds restart their state (``seq_idx_from_doc_ids``).

Parameter tags (attributes on nn.Parameter, read by the trainer and DeepSpeed code):
    p._no_weight_decay = True   # excluded from weight decay (A_log, D, dt bias; norms/biases are
                                # excluded by the trainer anyway, by ndim < 2)
    p._keep_fp32 = True         # stays float32 in every precision mode

Blocks that add an auxiliary loss (MoE) set ``self.aux_loss`` (a scalar tensor, already
multiplied by its coefficients) and ``self.metrics`` (a dict of floats/tensors) during forward.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..errors import HybridSeqError
from .spec import BlockSpec


class Block(nn.Module):
    spec_class: ClassVar[type[BlockSpec]] = BlockSpec

    def __init__(self, d_model: int, spec, *, layer_idx: int = 0, n_layers: int = 1):
        super().__init__()
        if not isinstance(spec, self.spec_class):
            spec = self.spec_class.from_mapping(
                {k: v for k, v in dict(spec).items() if k != "kind"},
                key=self.spec_class.kind, d_model=d_model)
        self.d_model = d_model
        self.spec = spec
        self.kind = spec.kind
        self.layer_idx = layer_idx
        self.n_layers = n_layers

    # --- inference ---------------------------------------------------------------------------
    def new_state(self, batch_size: int, max_seq_len: int, device=None, dtype=None):
        return None

    def step(self, x: torch.Tensor, state, pos: torch.Tensor) -> torch.Tensor:
        """One token per row, x (B, 1, d). Stateless kinds: their forward."""
        return self(x)

    def graph_blocker(self, device, dtype) -> str | None:
        """Why ``step`` cannot be captured in a CUDA graph on ``device`` with activations of
        ``dtype`` (None: it can)."""
        return None

    def residual_out_params(self) -> list[nn.Parameter]:
        return []

    def shard_experts(self, group) -> None:
        """Expert parallelism, applied from outside to a built block: kinds with experts keep
        this rank's share and route through ``group``; the others have nothing to shard."""

    def state_capacity(self, state) -> int | None:
        """How many tokens ``state`` holds at most (None: no limit, e.g. a recurrent state)."""
        return None

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


def seq_idx_from_doc_ids(doc_ids, x: torch.Tensor, block: Block) -> torch.Tensor | None:
    """The kernels' ``seq_idx`` (B, L) int32 (non-decreasing, +1 at each document start) from
    ``doc_ids`` (B, L) of any integers; None when ``doc_ids`` is None."""
    if doc_ids is None:
        return None
    if tuple(doc_ids.shape) != tuple(x.shape[:2]):
        raise HybridSeqError(f"{block.kind} layer {block.layer_idx}: doc_ids has shape "
                             f"{tuple(doc_ids.shape)}, the input (batch, seqlen) = {tuple(x.shape[:2])}")
    d = doc_ids.to(x.device)
    starts = torch.zeros_like(d, dtype=torch.int32)
    starts[:, 1:] = (d[:, 1:] != d[:, :-1]).to(torch.int32)
    return starts.cumsum(1, dtype=torch.int32)

