"""Learning-rate schedule: linear warmup, then cosine decay to ``min_lr_ratio * lr``.

With ``s`` optimizer steps already taken (0-based), ``W`` warmup steps and ``T`` total steps::

    factor(s) = (s + 1) / W                                      for s < W
    factor(s) = r + (1 - r) * 0.5 * (1 + cos(pi * (s - W) / (T - W)))   for W <= s < T
    factor(s) = r                                                for s >= T

so the first step already uses lr / W (never 0) and the last decays to ``r = min_lr_ratio``.
The scheduler is a ``torch.optim.lr_scheduler.LambdaLR`` (state_dict-able, and accepted by
DeepSpeed as a client scheduler).
"""
from __future__ import annotations

import math

import torch


def default_warmup(steps: int, warmup_steps=None) -> int:
    """``train.warmup_steps: null`` means ``min(100, steps // 10)``."""
    return int(min(100, steps // 10)) if warmup_steps is None else int(warmup_steps)


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0 or step >= total_steps:
        return min_lr_ratio if step >= total_steps else 1.0
    progress = (step - warmup_steps) / decay_steps
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, *, total_steps: int, warmup_steps: int, min_lr_ratio: float):
    def fn(step: int) -> float:
        return lr_factor(step, total_steps=total_steps, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
