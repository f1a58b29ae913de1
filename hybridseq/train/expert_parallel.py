"""Expert parallelism under DeepSpeed ZeRO-1/2 (``moe.ep_size: P > 1``).

Layout of a run on ``G`` ranks (DeepSpeed's ``groups._create_expert_and_data_parallel(P)``):
the expert-parallel (EP) groups are ``P`` consecutive ranks; EP rank ``r`` holds experts
``[r E/P, (r+1) E/P)`` of every MoE block (``MoEBlock`` builds only those, and its all-to-all runs
over the EP group, ``blocks/moe_parallel.py``). The expert-data-parallel groups join the ranks
with the same EP rank (``G / P`` of them): only they hold the same experts, so expert gradients
are averaged (and, with ZeRO, expert optimizer states partitioned) over that group, while every
other parameter is data-parallel over all ``G`` ranks.

Wiring into DeepSpeed 0.19 (which keys all of this on its own MoE layer class):

- ``setup_groups(P)``, before the model is built: creates the groups and makes the EP group
  the default of ``MoEBlock`` (``set_expert_parallel_group``).
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
(``experts_rank{r}.pt``) and reloads them after ``load_checkpoint``; the ZeRO optimizer files
are per rank and hold the experts' optimizer states.

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
    """(name, parameter) of every expert shard (``p._expert_parallel``, set by ``MoEBlock``)."""
    return [(n, p) for n, p in model.named_parameters() if getattr(p, "_expert_parallel", False)]


def uses_expert_parallel(model: nn.Module) -> bool:
    return bool(expert_params(model))


def ep_size_of(model: nn.Module) -> int:
    sizes = {int(getattr(m, "ep_size", 1)) for m in model.modules() if getattr(m, "kind", None) == "moe"}
    sizes.discard(1)
    if len(sizes) > 1:
        raise ConfigError(f"all MoE blocks must share one ep_size under DeepSpeed, got {sorted(sizes)}",
                          key="moe.ep_size")
    return sizes.pop() if sizes else 1


def setup_groups(ep_size: int) -> None:
    """Create DeepSpeed's expert / expert-data-parallel groups (collective) and make the EP group
    the default of the MoE blocks built afterwards."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    from ..blocks.moe_parallel import set_expert_parallel_group

    world = dist.get_world_size()
    if world % ep_size:
        raise ConfigError(f"ep_size={ep_size} does not divide the number of ranks {world}", key="moe.ep_size")
    groups._create_expert_and_data_parallel(ep_size)
    set_expert_parallel_group(groups._get_expert_parallel_group(group_name(ep_size)))


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
    n_experts = max(int(getattr(m, "n_experts", 0)) for m in model.modules())
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

    for m in model.modules():
        if getattr(m, "kind", None) != "moe" or getattr(m, "ep_size", 1) == 1:
            continue
        group = m.ep_group
        size = dist.get_world_size(group)
        prefix = next(n for n, mod in model.named_modules() if mod is m)
        for pname in ("w_in", "w_out"):
            p = getattr(m, pname).detach().contiguous()
            parts = [torch.empty_like(p) for _ in range(size)]
            dist.all_gather(parts, p, group=group)
            if is_main:
                state[f"{prefix}.{pname}"] = torch.cat(parts, 0).cpu()
    return state


def config_without_ep(cfg):
    """A copy of ``cfg`` with every MoE block's ``ep_size`` set to 1 (for the exported model)."""
    from omegaconf import OmegaConf

    c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for spec in c.blocks.values():
        if spec.get("kind") == "moe" and "ep_size" in spec:
            spec.ep_size = 1
    return c
