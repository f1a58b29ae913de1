"""Optimizer state independent of the topology, for resuming a DeepSpeed run on another number of
ranks or another expert-parallel size.

DeepSpeed's own checkpoint files hold each rank's ZeRO partition of the flat optimizer buffers,
so they load only on the topology that wrote them. Beside them every checkpoint carries
``portable_optimizer.{json,safetensors}`` (``save_state``'s format: JSON and safetensors, no
pickle): for every parameter under its model name and full shape (every expert of a sharded
MoE block gathered, in expert order) the float32 master weight and each optimizer moment
(AdamW's ``exp_avg`` and ``exp_avg_sq``), plus the optimizer's step count, the learning rate of
the next step, the LR scheduler's state and DeepSpeed's step counters.

``portable_state(engine)`` gathers it (collective: every rank calls it, rank 0 gets the tree).
``load_portable(engine, tree)`` puts it into a freshly built engine of any world size and
``ep_size``: each rank writes its own ZeRO fragment of every parameter and moment (DeepSpeed's
``safe_set_full_*`` API) and its own experts' slice. The optimizer states are created first
when the engine has not stepped yet (AdamW creates them lazily at its first step).

ZeRO stages 0, 1 and 2 are covered. Under ZeRO-3 the file is not written and a run resumes only
on the topology that wrote it (the error says so).

DeepSpeed 0.19 links each parameter to its optimizer-state fragments once, right after the first
optimizer step of its first parameter group, when the states of the other groups (weight-decay
free parameters, experts) do not exist yet; ``_relink`` links them again before they are read
or written.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import HybridSeqError

NAME = "portable_optimizer"
FORMAT = "hybridseq-portable-optimizer"


def supported(engine) -> bool:
    return engine.stage in (0, 1, 2)


def _zero_optimizer(engine):
    """The ZeRO-1/2 optimizer wrapper, or None at stage 0."""
    return engine.optimizer if engine.stage in (1, 2) else None


def _inner(engine):
    """The torch optimizer that owns the moments (param -> state)."""
    zo = _zero_optimizer(engine)
    opt = zo.optimizer if zo is not None else engine.optimizer
    return getattr(opt, "optimizer", opt) if not isinstance(opt, torch.optim.Optimizer) else opt


def _flat_params(engine) -> list[torch.Tensor]:
    """The tensors the inner optimizer steps: ZeRO's flat fp32 partitions, or the parameters."""
    return [p for g in _inner(engine).param_groups for p in g["params"]]


def _relink(engine) -> None:
    zo = _zero_optimizer(engine)
    if zo is not None and hasattr(zo, "_lazy_init_hp_params_optimizer_state"):
        zo._hp_optimizer_states_linked = False
        zo._lazy_init_hp_params_optimizer_state()


def _moment_keys(engine) -> list[str]:
    """The per-element optimizer moments (tensor states shaped like what they belong to)."""
    keys: list[str] = []
    opt = _inner(engine)
    for p in _flat_params(engine):
        st = opt.state.get(p) or {}
        for k, v in st.items():
            if torch.is_tensor(v) and v.shape == p.shape and k not in keys:
                keys.append(k)
    return sorted(keys)


def _step_count(engine) -> float | None:
    opt = _inner(engine)
    for p in _flat_params(engine):
        st = opt.state.get(p) or {}
        if "step" in st:
            return float(st["step"])
    return None


def _expert_blocks(model: nn.Module) -> dict:
    """parameter name -> the sharded block that owns it (its ``ep_group`` and ``ep_rank``)."""
    prefix = {mod: name for name, mod in model.named_modules()}
    out = {}
    for layer in model.layers:
        blk = layer.block
        if getattr(blk, "ep_group", None) is None:
            continue
        for pname, p in blk.named_parameters(recurse=False):
            if getattr(p, "_expert_parallel", False):
                out[f"{prefix[blk]}.{pname}"] = blk
    return out


def _gather_experts(t: torch.Tensor, blk) -> torch.Tensor:
    import torch.distributed as dist

    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(blk.ep_group))]
    dist.all_gather(parts, t, group=blk.ep_group)
    return torch.cat(parts, 0)


def _local_experts(t: torch.Tensor, blk) -> torch.Tensor:
    n = blk.n_local_experts
    return t[blk.ep_rank * n:(blk.ep_rank + 1) * n]


def _named_params(model: nn.Module):
    """The model's trainable parameters by name (each once; the DeepSpeed marker owns none)."""
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        yield name, p


def portable_state(engine) -> dict | None:
    """The tree described in the module docstring on rank 0 (None on other ranks, and on every
    rank before the first optimizer step or under ZeRO-3). Collective."""
    if not supported(engine):
        return None
    step = _step_count(engine)
    if step is None:  # no optimizer step yet: nothing to carry over
        return None
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    _relink(engine)
    keys = _moment_keys(engine)
    zero = _zero_optimizer(engine) is not None
    opt = _inner(engine)
    experts = _expert_blocks(engine.model)
    params = {}
    for name, p in _named_params(engine.model):
        if zero:
            vals = {"fp32": safe_get_full_fp32_param(p)}
            for k in keys:
                vals[k] = safe_get_full_optimizer_state(p, k)
        else:
            st = opt.state.get(p) or {}
            vals = {"fp32": p.detach().float()}
            for k in keys:
                vals[k] = st[k].detach().float() if k in st else torch.zeros_like(p, dtype=torch.float32)
        if name in experts:
            vals = {k: _gather_experts(v, experts[name]) for k, v in vals.items()}
        if engine.is_main:
            params[name] = {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in vals.items()}
    if not engine.is_main:
        return None
    sched = engine.scheduler
    return {"format": FORMAT, "version": 1, "moments": keys, "step": step,
            "lr": [float(g["lr"]) for g in opt.param_groups],
            "scheduler": _plain_scheduler_state(sched) if sched is not None else None,
            "global_steps": int(engine.ds.global_steps), "global_samples": int(engine.ds.global_samples),
            "world_size": engine.world_size, "ep_size": engine.ep_size, "params": params}


def _plain_scheduler_state(sched) -> dict:
    """The scheduler's state without callables (LambdaLR's lambdas are rebuilt from the config)."""
    return {k: v for k, v in sched.state_dict().items()
            if isinstance(v, (int, float, bool, str, list, type(None))) and k != "lr_lambdas"}


def _fit_groups(value, n: int, what: str):
    """A per-parameter-group list saved with another group count (expert parallelism splits the
    groups): every group had the same value, which each group of this run takes."""
    if not isinstance(value, list) or len(value) == n:
        return value
    if value and all(v == value[0] for v in value):
        return [value[0]] * n
    raise HybridSeqError(f"the checkpoint's {what} differs between its {len(value)} parameter groups; "
                         f"this run has {n}: resume on the topology that wrote it")


@torch.no_grad()
def load_portable(engine, tree: dict, where: str) -> None:
    """Load ``portable_state``'s tree into ``engine`` (collective: every rank calls it with the
    same tree)."""
    if not supported(engine):
        raise HybridSeqError(f"{where} was written on another topology, and ZeRO-3 runs resume only on the "
                             "topology that wrote them (same ranks, same ep_size)")
    if not isinstance(tree, dict) or tree.get("format") != FORMAT:
        raise HybridSeqError(f"{where}: not a portable optimizer state")
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    keys = list(tree["moments"])
    saved = tree["params"]
    own = dict(_named_params(engine.model))
    missing, extra = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if missing or extra:
        raise HybridSeqError(f"{where}: its parameters differ from this model's (missing {missing[:3]}, "
                             f"unexpected {extra[:3]})")
    opt = _inner(engine)
    step = float(tree["step"])
    for p in _flat_params(engine):  # create the moments AdamW would create at its first step
        st = opt.state[p]
        for k in keys:
            if k not in st:
                st[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
        old = st.get("step")
        st["step"] = (torch.tensor(step, dtype=old.dtype, device=old.device) if torch.is_tensor(old)
                      else torch.tensor(step, dtype=torch.float32,
                                        device=p.device if _fused(opt) else "cpu"))
    _relink(engine)
    zero = _zero_optimizer(engine) is not None
    experts = _expert_blocks(engine.model)
    for name, p in own.items():
        vals = saved[name]
        if name in experts:
            vals = {k: _local_experts(v, experts[name]) for k, v in vals.items()}
        shape = tuple(p.shape)
        for k, v in vals.items():
            if tuple(v.shape) != shape:
                raise HybridSeqError(f"{where}: {name} {k} has shape {tuple(v.shape)}, this model's "
                                     f"{shape}")
        p.copy_(vals["fp32"].to(p.device, p.dtype))
        if zero:
            safe_set_full_fp32_param(p, vals["fp32"].to(p.device))
            for k in keys:
                safe_set_full_optimizer_state(p, vals[k].to(p.device), k)
        else:
            st = opt.state[p]
            for k in keys:
                st[k].copy_(vals[k].to(st[k].device, st[k].dtype))
    groups = opt.param_groups
    for g, lr in zip(groups, _fit_groups(tree["lr"], len(groups), "learning rate")):
        g["lr"] = float(lr)
    sched = engine.scheduler
    if sched is not None and tree.get("scheduler") is not None:
        state = dict(tree["scheduler"])
        for k in ("base_lrs", "_last_lr"):
            if k in state:
                state[k] = _fit_groups(state[k], len(groups), f"scheduler {k}")
        sched.__dict__.update(state)
    engine.ds.global_steps = int(tree["global_steps"])
    engine.ds.global_samples = int(tree["global_samples"])


def _fused(opt) -> bool:
    return any(bool(g.get("fused")) or bool(g.get("capturable")) for g in opt.param_groups)


__all__ = ["NAME", "load_portable", "portable_state", "supported"]
