"""Expert parallelism under DeepSpeed ZeRO-1/2 (``moe.ep_size > 1``)."""
from __future__ import annotations

from torch import nn


def uses_expert_parallel(model: nn.Module) -> bool:
    """Whether any parameter is an expert shard (``p._expert_parallel``, set by ``MoEBlock``)."""
    return any(getattr(p, "_expert_parallel", False) for p in model.parameters())


def expert_param_groups(groups: list[dict]) -> list[dict]:
    raise NotImplementedError("expert parallelism (moe.ep_size > 1) under DeepSpeed is not wired yet")


def setup_groups(ep_size: int) -> None:
    raise NotImplementedError("expert parallelism (moe.ep_size > 1) under DeepSpeed is not wired yet")
