"""Expert parallelism under DeepSpeed ZeRO-1/2 (``moe.ep_size: P > 1``).

Layout of a run on ``G`` ranks (DeepSpeed's ``groups._create_expert_and_data_parallel(P)``):
the expert-parallel (EP) groups are ``P`` consecutive ranks; EP rank ``r`` holds experts
``[r E/P, (r+1) E/P)`` of every MoE block. The model is built whole on every rank (same seed,
same weights) and ``apply_expert_parallel`` then shards it from outside: each block with experts
keeps its rank's share (``Block.shard_experts``; for MoE ``blocks/moe/parallel.py``, whose
all-to-all runs over the EP group). The expert-data-parallel groups join the ranks
with the same EP rank (``G / P`` of them): only they hold the same experts, so expert gradients
are averaged (and, with ZeRO, expert optimizer states partitioned) over that group, while every
other parameter is data-parallel over all ``G`` ranks.

Wiring into DeepSpeed 0.19 (which keys all of this on its own MoE layer class):

- ``setup_groups(P)``: creates the groups (collective, on every rank).
- ``apply_expert_parallel(model, P)``: shards the built model over the EP group.
- ``prepare_model(model)``: tags the expert shards as DeepSpeed MoE parameters
  (``p.allreduce = False``, ``p.group_name = "ep_size_P"``) and attaches a parameter-free marker
  module (a ``deepspeed.moe.layer.MoE`` subclass that owns nothing and does nothing) so that the
  engine sets ``has_moe_layers``: its ZeRO-1/2 optimizer then reduces expert gradients over the
  expert-data-parallel group and scales the gradient norm accordingly.
- ``expert_param_groups(groups)``: splits our AdamW groups into dense and MoE groups
  (``deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer``).
- ``gather_experts(state, model)``: for export, the full ``(E, ...)`` expert tensors (all-gather
  over the EP group, in EP-rank order) so the saved model is an ordinary ``ep_size: 1`` model.

Checkpoints: DeepSpeed's MoE checkpoint files are written per native MoE layer; ours has none
(the marker owns no weights), so every rank additionally saves its expert shards
(``experts_rank{r}``, JSON + safetensors) and reloads them after ``load_checkpoint``; the ZeRO
optimizer files are per rank and hold the experts' optimizer states. The portable optimizer
state (``reshard.py``) holds every expert gathered, so a run resumes on another ep_size.

ZeRO-3 is refused with EP (DeepSpeed does not run native MoE under stage 3): ZeRO-3 shards the
experts like any other weight.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError

MARKER_NAME = "_ds_moe_marker"


def group_name(ep_size: int) -> str:
    return f"ep_size_{int(ep_size)}"


def expert_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every expert shard (``p._expert_parallel``, set by sharding)."""
    return [(n, p) for n, p in model.named_parameters() if getattr(p, "_expert_parallel", False)]


def uses_expert_parallel(model: nn.Module) -> bool:
    return bool(expert_params(model))


def _sharded_blocks(model: nn.Module) -> list:
    return [layer.block for layer in model.layers if getattr(layer.block, "ep_group", None) is not None]


def ep_size_of(model: nn.Module) -> int:
    """The expert-parallel size a sharded model runs with (1: not sharded)."""
    sizes = {int(b.ep_size) for b in _sharded_blocks(model)}
    return sizes.pop() if sizes else 1


def ep_size_of_config(cfg) -> int:
    """The ``ep_size`` the config's blocks ask for (one value for every block that has experts)."""
    sizes = {int(getattr(spec, "ep_size", 1)) for _, spec in cfg.layers()}
    sizes.discard(1)
    if len(sizes) > 1:
        raise ConfigError(f"all MoE blocks must share one ep_size under DeepSpeed, got {sorted(sizes)}",
                          key="moe.ep_size")
    return sizes.pop() if sizes else 1


def setup_groups(ep_size: int) -> None:
    """Create DeepSpeed's expert / expert-data-parallel groups (collective)."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    world = dist.get_world_size()
    if world % ep_size:
        raise ConfigError(f"ep_size={ep_size} does not divide the number of ranks {world}", key="moe.ep_size")
    groups._create_expert_and_data_parallel(ep_size)


def apply_expert_parallel(model: nn.Module, ep_size: int) -> None:
    """Shard every block with experts over this rank's EP group of ``ep_size`` ranks (the groups
    of ``setup_groups``)."""
    from deepspeed.utils import groups

    group = groups._get_expert_parallel_group(group_name(ep_size))
    for layer in model.layers:
        layer.block.shard_experts(group)


def _marker(ep_size: int, n_experts: int) -> nn.Module:
    from deepspeed.moe.layer import MoE

    class ExpertParallelMarker(MoE):
        """Tells the DeepSpeed engine that the model has expert-parallel layers; owns nothing."""

        def __init__(self):
            nn.Module.__init__(self)
            self.ep_size = ep_size
            self.num_experts = n_experts
            self.num_local_experts = 0  # no DeepSpeed per-expert checkpoint files to read/write
            self.expert_group_name = group_name(ep_size)

        def set_deepspeed_parallelism(self, *args, **kwargs):  # groups made by setup_groups
            return None

        def forward(self, *args, **kwargs):
            raise RuntimeError("the expert-parallel marker is not a layer")

    return ExpertParallelMarker()


def prepare_model(model: nn.Module) -> int:
    """Tag the expert shards for DeepSpeed and attach the marker; returns ep_size (1: nothing)."""
    ep = ep_size_of(model)
    if ep == 1:
        return 1
    name = group_name(ep)
    for _, p in expert_params(model):
        p.allreduce = False
        p.group_name = name
    n_experts = max(int(b.n_experts) for b in _sharded_blocks(model))
    model.add_module(MARKER_NAME, _marker(ep, n_experts))
    return ep


def expert_param_groups(groups: list[dict]) -> list[dict]:
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    return split_params_into_different_moe_groups_for_optimizer(groups)


def local_expert_state(model: nn.Module) -> dict:
    return {n: p.detach().cpu().clone() for n, p in expert_params(model)}


@torch.no_grad()
def load_local_expert_state(model: nn.Module, state: dict) -> None:
    params = dict(expert_params(model))
    if set(params) != set(state):
        raise ConfigError("the checkpoint's expert shards do not match this model's", key="moe.ep_size")
    for n, p in params.items():
        p.copy_(state[n].to(p.device, p.dtype))


def gather_experts(model: nn.Module, state: dict | None, is_main: bool) -> dict | None:
    """Replace the local expert shards in ``state`` (rank 0's full state dict) by the full
    ``(E, ...)`` tensors gathered over the EP group (collective: every rank calls it)."""
    import torch.distributed as dist

    prefix_of = {mod: name for name, mod in model.named_modules()}
    for m in _sharded_blocks(model):
        size = dist.get_world_size(m.ep_group)
        for pname in ("w_in", "w_out"):
            p = getattr(m, pname).detach().contiguous()
            parts = [torch.empty_like(p) for _ in range(size)]
            dist.all_gather(parts, p, group=m.ep_group)
            if is_main:
                state[f"{prefix_of[m]}.{pname}"] = torch.cat(parts, 0).cpu()
    return state


def config_without_ep(cfg):
    """A copy of ``cfg`` with every block's ``ep_size`` set to 1 (for the exported model)."""
    from dataclasses import replace

    from ..config.sections import Blocks

    blocks = Blocks({s: (spec.replace(ep_size=1) if getattr(spec, "ep_size", 1) != 1 else spec)
                     for s, spec in cfg.blocks.items()})
    return replace(cfg, blocks=blocks)
