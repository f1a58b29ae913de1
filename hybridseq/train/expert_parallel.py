"""Expert parallelism under DeepSpeed (``moe.ep_size > 1``): not wired yet.

What is missing (see the issue): DeepSpeed 0.19 enables its expert-data-parallel gradient
reduction and MoE optimizer groups only when the model contains its own ``deepspeed.moe.layer.MoE``
modules (``engine.has_moe_layers``), and its MoE checkpoint format assumes those modules. Until
hybridseq's MoE block is bridged to that, ``launch/train.py`` refuses ``ep_size > 1`` with a
clear error instead of averaging different experts' gradients across ranks.
"""
from __future__ import annotations

from torch import nn

from ..errors import ConfigError


def uses_expert_parallel(model: nn.Module) -> bool:
    """Whether any parameter is an expert shard (``p._expert_parallel``, set by ``MoEBlock``)."""
    return any(getattr(p, "_expert_parallel", False) for p in model.parameters())


def _refuse(ep_size) -> ConfigError:
    return ConfigError(f"ep_size={ep_size}: expert parallelism is not supported under DeepSpeed yet; "
                       "use ep_size: 1 (ZeRO-2/3 shard the experts' optimizer states, gradients and, "
                       "with ZeRO-3, weights)", key="moe.ep_size")


def expert_param_groups(groups: list[dict]) -> list[dict]:
    raise _refuse(">1")


def setup_groups(ep_size: int) -> None:
    raise _refuse(ep_size)
