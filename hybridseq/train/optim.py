"""AdamW with two parameter groups: decayed and not decayed.

No weight decay for
- every parameter with ``ndim < 2``: norm gains, biases, and Mamba's per-channel D and dt bias;
- every parameter tagged ``p._no_weight_decay = True`` by its block (Mamba's A_log, D, dt bias:
  decaying A_log would pull the state's decay rates towards exp(0) = 1, i.e. towards forgetting
  nothing; decaying D / dt bias would bias the skip and the step size);
- embeddings (``nn.Embedding`` weights, and hence a tied LM head). Choice: an embedding row is
  only updated when its token occurs, so decay shrinks rare tokens' rows on every step regardless
  of their gradient; GPT-2/minGPT, Mamba and most LM codebases exclude them for that reason.

Everything else (linear and conv weights, expert matrices) is decayed with ``weight_decay``.
"""
from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """``[{"params": decayed, "weight_decay": wd}, {"params": others, "weight_decay": 0.0}]``,
    each parameter exactly once (tied parameters are deduplicated), in a deterministic order."""
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        if p.ndim < 2 or getattr(p, "_no_weight_decay", False) or id(p) in embedding_params:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": float(weight_decay), "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float, betas=(0.9, 0.95),
                    eps: float = 1e-8) -> torch.optim.AdamW:
    kwargs = {}
    if any(p.is_cuda for p in model.parameters()):
        kwargs["fused"] = True  # one kernel for all parameters on CUDA
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=float(lr), betas=tuple(float(b) for b in betas),
                             eps=eps, **kwargs)
