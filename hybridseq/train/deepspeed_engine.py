"""The DeepSpeed engine of the training loop (ZeRO 1/2/3, bf16 autocast, expert parallelism).

It implements the engine interface of ``engine.py`` on top of ``deepspeed.initialize``, so the
loop of ``trainer.py`` runs unchanged under ``deepspeed``/``torchrun`` (``launch/train.py``).

DeepSpeed config: a JSON or YAML file (``--deepspeed FILE``) or the ``deepspeed:`` section of
the layout YAML; ``resolve_ds_config`` fills every ``"auto"`` value from the layout's ``train``
section, and the train section is then rewritten from the result, so the two never disagree:

    train_micro_batch_size_per_gpu  <- train.batch_size        (sequences per rank per micro-step)
    gradient_accumulation_steps     <- train.grad_accum
    train_batch_size                <- micro * accumulation * world size
    gradient_clipping               <- train.grad_clip
    torch_autocast.enabled          <- train.precision (auto: bf16 on CUDA, fp32 on CPU)
    optimizer.params.{lr, betas, weight_decay, eps}  <- train.{lr, betas, weight_decay}, 1e-8
    scheduler.params.{warmup_num_steps, total_num_steps, warmup_max_lr, warmup_min_lr}

Optimizer and schedule: without an ``optimizer`` section the engine passes our AdamW with two
groups (``optim.param_groups``: no decay for ``_no_weight_decay``-tagged, 1-D and embedding
parameters); without a ``scheduler`` section, our warmup+cosine ``LambdaLR`` (``schedule.py``),
which DeepSpeed steps and checkpoints. With an ``optimizer`` section (needed for ZeRO-Offload,
which wants DeepSpeed's CPU Adam) DeepSpeed builds it over the same groups.

Precision. DeepSpeed's own ``bf16``/``fp16`` modes cast *every* parameter with
``p.data = p.data.to(dtype)`` (0.19: ``_cast_module_mixed_precision``), bypassing
``Block._apply``, so Mamba's A_log, D and dt bias and the router weight (``_keep_fp32``) would
become bf16. We therefore train bf16 through DeepSpeed's ``torch_autocast`` mode: parameters,
gradients and optimizer states stay float32 (the fp32 master weights *are* the parameters),
matmuls run in bf16 under ``torch.autocast``, and the weights of ``nn.Linear``/``nn.Conv1d``
are all-gathered and reduced in bf16 (DeepSpeed's ``comm_dtype``). A ``bf16: {enabled: true}``
section is translated into that mode; ``fp16`` is refused (use bf16). The numerics are those of
``LocalEngine`` (the single-process trainer), which also autocasts fp32 weights.

ZeRO-3: every block (``hybridseq.blocks.base.Block``) is a *leaf module*
(``deepspeed.utils.set_z3_leaf_modules``): all of a block's parameters are gathered when the
block starts and released after it. For the MoE block this is what makes training safe: with
per-expert hooks, a rank whose tokens skip an expert would never fetch it while the others do,
and the collective all-gather would hang. The tied LM head reads ``embed.weight`` outside the
embedding's forward, so it is registered as an external parameter of the model.

Expert parallelism (``moe.ep_size > 1``, ZeRO-1/2): see ``expert_parallel.py``. Saved models are
always the equivalent ``ep_size: 1`` model (all experts gathered), loadable on one process.

Checkpoints: ``root/step_XXXXXXXX/`` holds ``model.safetensors`` + ``config.yaml`` (gathered
from the ZeRO-3 shards on every save, so ``hybridseq generate`` and ``hs.load_pretrained`` read
any checkpoint), ``trainer_state`` (rank 0's client state, the run's world size and ep_size),
``client_state_rank{r}`` (each rank's step, data position, RNG states), with expert parallelism
``experts_rank{r}`` (each rank's expert shards), all JSON + safetensors; ``ds/`` (DeepSpeed's
files: module, ZeRO-partitioned optimizer states, LR scheduler, loss scaler, step counters); and
under ZeRO-0/1/2 ``portable_optimizer`` (``reshard.py``), from which a run resumes on another
number of ranks or another ep_size.
All ranks write into ``root/.tmp-step_XXXXXXXX/``; after a barrier rank 0 renames it (atomic),
updates ``latest`` and rotates (``keep_last``); a second barrier ends the save. Multi-node runs
need ``root`` on a filesystem every node sees.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil

import torch
from torch import nn

from ..errors import ConfigError, HybridSeqError
from . import checkpoint as ckpt
from .state_io import load_state, save_state
from .engine import check_weight_keys
from . import distributed as D
from . import reshard
from .optim import param_groups
from .schedule import build_scheduler, default_warmup

DS_DIR = ckpt.DS_DIR
DS_TAG = "zero"
AUTO = "auto"


def _rank_state_file(rank: int) -> str:
    return f"client_state_rank{int(rank):05d}"  # .json + .safetensors (state_io)


def _expert_file(rank: int) -> str:
    return f"experts_rank{int(rank):05d}"  # .json + .safetensors (state_io)


def check_deepspeed_files(ds_dir: str) -> None:
    """DeepSpeed writes and reads its own checkpoint files with pickle. Before DeepSpeed reads
    them, each is opened here with ``torch.load(weights_only=True)``, which accepts only tensors,
    containers and the allow-listed DeepSpeed types (``DS_ALLOWED_GLOBALS``): a file carrying any
    other object (code) is refused with a one-line error naming it, before it is unpickled."""
    import pickle

    allowed = _ds_allowed_globals()
    for root, _, names in os.walk(ds_dir):
        for n in sorted(names):
            if not n.endswith((".pt", ".pth", ".bin")):
                continue
            path = os.path.join(root, n)
            try:
                with torch.serialization.safe_globals(allowed):
                    torch.load(path, map_location="cpu", weights_only=True)
            except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, AttributeError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise HybridSeqError(f"{path}: refused: it is not plain checkpoint data ({first[:200]})") from None


def _ds_allowed_globals() -> list:
    """The non-tensor types DeepSpeed's own checkpoint files hold (its ZeRO stage and loss-scaler
    enums, argparse namespaces, the parameter-fragment mapping), resolved where importable."""
    import argparse
    import importlib

    out = [argparse.Namespace]
    for mod, name in DS_ALLOWED_GLOBALS:
        try:
            out.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            continue
    return out


DS_ALLOWED_GLOBALS = [
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ("deepspeed.checkpoint.constants", "ZeroStageEnum"),
]


# ----------------------------------------------------------------------------------------------
# the DeepSpeed config
# ----------------------------------------------------------------------------------------------
def read_ds_config(source) -> dict:
    """A DeepSpeed config from a JSON or YAML file path, a dict, or an OmegaConf node."""
    if source is None:
        return {}
    if isinstance(source, (str, os.PathLike)):
        path = str(source)
        if not os.path.isfile(path):
            raise ConfigError(f"no such DeepSpeed config file: {path}", key="--deepspeed")
        with open(path) as fh:
            text = fh.read()
        try:
            if path.endswith((".yaml", ".yml")):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
            raise ConfigError(f"not valid {'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'}: {e}",
                              file=path) from None
        if not isinstance(data, dict):
            raise ConfigError("a DeepSpeed config must be a mapping", file=path)
        return data
    if isinstance(source, dict):
        return copy.deepcopy(source)
    from omegaconf import OmegaConf

    return OmegaConf.to_container(source, resolve=True)


def _is_auto(v) -> bool:
    return v is None or v == AUTO


def resolve_ds_config(ds: dict, train_cfg: dict, world_size: int, device_type: str) -> dict:
    """Fill the ``"auto"`` entries of ``ds`` from ``train_cfg`` (see the module doc); returns a new
    dict. Raises ``ConfigError`` on contradictions (naming the key)."""
    ds = copy.deepcopy(ds)
    tc = train_cfg
    micro = ds.get("train_micro_batch_size_per_gpu")
    micro = int(tc["batch_size"]) if _is_auto(micro) else int(micro)
    gas = ds.get("gradient_accumulation_steps")
    tbs = ds.get("train_batch_size")
    if _is_auto(gas):
        if not _is_auto(tbs):
            if int(tbs) % (micro * world_size):
                raise ConfigError(f"train_batch_size {tbs} is not a multiple of micro batch {micro} x "
                                  f"{world_size} ranks", key="deepspeed.train_batch_size")
            gas = int(tbs) // (micro * world_size)
        else:
            gas = int(tc["grad_accum"])
    gas = int(gas)
    if not _is_auto(tbs) and int(tbs) != micro * gas * world_size:
        raise ConfigError(f"train_batch_size {tbs} != micro batch {micro} x accumulation {gas} x "
                          f"{world_size} ranks", key="deepspeed.train_batch_size")
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = gas
    ds["train_batch_size"] = micro * gas * world_size
    if _is_auto(ds.get("gradient_clipping")):
        ds["gradient_clipping"] = float(tc.get("grad_clip") or 0.0)

    # precision: torch_autocast (see module doc)
    precision = str(tc.get("precision") or "auto")
    if precision == "auto":
        precision = "bf16" if device_type == "cuda" else "fp32"
    if (ds.get("fp16") or {}).get("enabled") in (True, AUTO):
        raise ConfigError("fp16 is not supported under DeepSpeed here (it would cast the fp32-only "
                          "Mamba/router parameters); use train.precision=bf16", key="deepspeed.fp16")
    native_bf16 = ds.pop("bf16", None) or {}  # translated into torch_autocast (module doc)
    if native_bf16.get("enabled") is True:
        precision = "bf16"
    if precision == "fp16":
        raise ConfigError("fp16 is not supported under DeepSpeed here; use bf16", key="train.precision")
    auto_cast = dict(ds.get("torch_autocast") or {})
    enabled = auto_cast.get("enabled", AUTO)
    if _is_auto(enabled):
        enabled = precision == "bf16"
    if enabled:
        auto_cast.update(enabled=True, dtype=auto_cast.get("dtype", "bfloat16"))
        if auto_cast["dtype"] not in ("bfloat16", "torch.bfloat16"):
            raise ConfigError("torch_autocast.dtype must be bfloat16", key="deepspeed.torch_autocast.dtype")
        ds["torch_autocast"] = auto_cast
    else:
        ds.pop("torch_autocast", None)

    opt = ds.get("optimizer")
    if opt:
        params = opt.setdefault("params", {})
        fills = {"lr": float(tc["lr"]), "betas": [float(b) for b in tc.get("betas", (0.9, 0.95))],
                 "weight_decay": float(tc["weight_decay"]), "eps": 1e-8}
        for k, v in fills.items():
            if _is_auto(params.get(k, AUTO)):
                params[k] = v
    sch = ds.get("scheduler")
    if sch:
        params = sch.setdefault("params", {})
        steps = int(tc["steps"])
        fills = {"warmup_num_steps": max(1, default_warmup(steps, tc.get("warmup_steps"))), "total_num_steps": steps,
                 "warmup_max_lr": float(tc["lr"]), "warmup_min_lr": 0.0}
        for k, v in fills.items():
            if k in params and _is_auto(params[k]):
                params[k] = v
    ds.setdefault("steps_per_print", 10 ** 9)
    ds.setdefault("wall_clock_breakdown", False)
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage must be 0..3, got {stage!r}", key="deepspeed.zero_optimization.stage")
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    if offload not in (None, "none") and not opt:
        raise ConfigError("offload_optimizer needs an 'optimizer' section (DeepSpeed's CPU Adam); see "
                          "launch/zero3-offload.json", key="deepspeed.optimizer")
    # nothing left unresolved
    left = [k for k, v in _walk(ds) if v == AUTO]
    if left:
        raise ConfigError(f"cannot resolve 'auto' for {', '.join(left)}", key="deepspeed")
    return ds


def _walk(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def sync_train_section(cfg, ds: dict) -> None:
    """Write the resolved batch, accumulation and clipping back into ``cfg.train`` (in place)."""
    cfg.train.batch_size = int(ds["train_micro_batch_size_per_gpu"])
    cfg.train.grad_accum = int(ds["gradient_accumulation_steps"])
    cfg.train.grad_clip = float(ds.get("gradient_clipping") or 0.0)
    if "torch_autocast" in ds:
        cfg.train.precision = "bf16"
    elif str(cfg.train.get("precision", "auto")) == "auto":
        cfg.train.precision = "fp32"


def zero_stage(ds: dict) -> int:
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


# ----------------------------------------------------------------------------------------------
# the engine
# ----------------------------------------------------------------------------------------------
class DeepSpeedEngine:
    """The engine interface of ``engine.py`` on ``deepspeed.initialize`` (see the module doc).

    Built by the trainer as ``engine_factory(model, train_cfg, cfg=cfg, device=device)``; pass
    ``functools.partial(DeepSpeedEngine, ds_config=resolved)``."""

    def __init__(self, model: nn.Module, train_cfg: dict, cfg=None, device=None, *, ds_config: dict):
        import deepspeed

        from ..blocks.base import Block

        self.cfg = cfg
        self.ds_config = ds_config
        self.stage = zero_stage(ds_config)
        self.grad_accum = int(ds_config["gradient_accumulation_steps"])
        self.precision = "bf16" if "torch_autocast" in ds_config else "fp32"
        self.rank, self.world_size = D.get_rank(), D.get_world_size()
        self.is_main = self.rank == 0
        tc = train_cfg
        steps = int(tc["steps"])

        if self.stage == 3:
            deepspeed.utils.set_z3_leaf_modules(model, [Block])
        from . import expert_parallel as EP

        self.ep_size = EP.ep_size_of_config(model.cfg)
        if self.ep_size > 1 and self.stage == 3:
            raise ConfigError("moe.ep_size > 1 needs ZeRO stage 1 or 2 (DeepSpeed's expert parallelism "
                              "does not run under ZeRO-3, which shards the experts itself)",
                              key="deepspeed.zero_optimization.stage")
        if self.ep_size > 1 and EP.ep_size_of(model) == 1:
            EP.apply_expert_parallel(model, self.ep_size)
        EP.prepare_model(model)
        groups = param_groups(model, float(tc["weight_decay"]))
        if self.ep_size > 1:
            groups = EP.expert_param_groups(groups)
        optimizer = scheduler = None
        if not ds_config.get("optimizer"):
            kwargs = {"fused": True} if any(p.is_cuda for p in model.parameters()) else {}
            optimizer = torch.optim.AdamW(groups, lr=float(tc["lr"]),
                                          betas=tuple(float(b) for b in tc.get("betas", (0.9, 0.95))),
                                          eps=1e-8, **kwargs)
        if not ds_config.get("scheduler"):
            if optimizer is None:
                raise ConfigError("an 'optimizer' section needs a 'scheduler' section too (e.g. WarmupCosineLR "
                                  "with 'auto' values), see launch/zero3-offload.json", key="deepspeed.scheduler")
            scheduler = build_scheduler(optimizer, total_steps=steps,
                                        warmup_steps=default_warmup(steps, tc.get("warmup_steps")),
                                        min_lr_ratio=float(tc["min_lr_ratio"]))
        with _quiet_deepspeed():
            self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler,
                model_parameters=groups if optimizer is None else None, config=ds_config)
        if optimizer is None and self.scheduler is None:
            raise ConfigError("the DeepSpeed config built no LR scheduler", key="deepspeed.scheduler")
        self.model = self.ds.module
        if self.stage == 3 and getattr(self.model, "tie_embeddings", False):
            deepspeed.zero.register_external_parameter(self.model, self.model.embed.weight)
        self.device = torch.device(device) if device is not None else self.ds.device
        self._micro = 0
        self._last_grad_norm = 0.0

    # --- the step ---------------------------------------------------------------------------
    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, inputs: torch.Tensor, **kwargs):
        return self.ds(inputs, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss`` is already divided by the accumulation steps (the trainer does it)."""
        self.ds.backward(loss, scale_wrt_gas=False)
        self._micro += 1
        if self._micro % self.grad_accum:
            self.ds.step()  # not a boundary: DeepSpeed only counts the micro-step

    @property
    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    def step(self) -> dict:
        if self._micro % self.grad_accum:
            raise HybridSeqError(f"DeepSpeed engine: step() after {self._micro % self.grad_accum} of "
                                 f"{self.grad_accum} micro-batches (the trainer and the DeepSpeed config disagree "
                                 "on gradient accumulation)")
        lr = self.lr
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        if norm is not None:
            self._last_grad_norm = float(norm)
        # DeepSpeed applies the update whatever the gradients were: the trainer stops on a
        # non-finite norm before anything is saved
        return {"lr": lr, "grad_norm": self._last_grad_norm, "applied": True}

    def skip_step(self) -> dict:
        """DeepSpeed owns its gradient buffers and has no way to drop them: after a non-finite loss
        nothing is applied and the run stops (``cannot_skip`` tells the trainer)."""
        return {"lr": self.lr, "grad_norm": float("nan"), "skipped": True, "cannot_skip": True}

    def all_finite(self, ok: bool) -> bool:
        """Whether every rank saw finite values (an all-reduce of one flag)."""
        if not D.is_initialized() or self.world_size == 1:
            return bool(ok)
        t = torch.tensor([1.0 if ok else 0.0], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return bool(t.item() > 0)

    # --- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """DeepSpeed keeps the optimizer/scheduler state in its own (partitioned) files."""
        return {"deepspeed": True, "zero_stage": self.stage, "world_size": self.world_size,
                "ep_size": self.ep_size, "global_steps": int(self.ds.global_steps)}

    def load_state_dict(self, sd: dict) -> None:
        raise HybridSeqError("DeepSpeed engine state is loaded with load_checkpoint(folder)")

    def unwrap_for_export(self) -> nn.Module:
        return self.model

    def full_state_dict(self) -> dict | None:
        """The whole model's state dict on CPU on rank 0 (None elsewhere). Collective: every rank
        must call it (ZeRO-3 gathers the shards one module at a time)."""
        if self.stage == 3:
            import deepspeed

            params = [p for p in self.model.parameters()]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                sd = ({k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
                      if self.is_main else None)
            return sd
        sd = {k: v.detach().cpu() for k, v in self.model.state_dict().items()} if self.is_main else None
        if self.ep_size > 1:
            from .expert_parallel import gather_experts

            sd = gather_experts(self.model, sd, self.is_main)
        return sd

    def save_pretrained(self, folder: str) -> None:
        """Write ``folder/model.safetensors`` + ``config.yaml`` (collective; rank 0 writes)."""
        sd = self.full_state_dict()
        if self.is_main:
            write_pretrained(sd, self.model, self.cfg, folder)
        D.barrier()

    def save_checkpoint(self, root: str, step: int, client_state: dict, keep_last: int = 2) -> str:
        name = ckpt.step_name(step)
        final = os.path.join(root, name)
        tmp = os.path.join(root, f".tmp-{name}")
        if self.is_main:
            os.makedirs(root, exist_ok=True)
            for entry in os.listdir(root):  # leftovers of an earlier crash
                if entry.startswith(".tmp-"):
                    shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
            os.makedirs(tmp)
        D.barrier()
        try:
            with _quiet_deepspeed():
                self.ds.save_checkpoint(os.path.join(tmp, DS_DIR), tag=DS_TAG, save_latest=False)
            save_state(client_state, tmp, _rank_state_file(self.rank))
            if self.ep_size > 1:  # this rank's expert shards (see expert_parallel.py)
                from .expert_parallel import local_expert_state

                save_state(local_expert_state(self.model), tmp, _expert_file(self.rank))
            sd = self.full_state_dict()
            portable = reshard.portable_state(self)  # for a resume on another topology
            if self.is_main:
                write_pretrained(sd, self.model, self.cfg, tmp, atomic=False)
                if portable is not None:
                    save_state(portable, tmp, reshard.NAME)
                save_state({"engine": self.state_dict(), "client": client_state}, tmp, ckpt.STATE)
            D.barrier()
            if self.is_main:
                ckpt.write_manifest(tmp)
                ckpt.publish(tmp, final)
                ckpt.atomic_write_bytes(os.path.join(root, ckpt.LATEST), (name + "\n").encode())
                ckpt.rotate(root, keep_last)
        except BaseException:
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        D.barrier()
        return final

    def load_checkpoint(self, folder: str) -> dict:
        ds_dir = os.path.join(folder, DS_DIR)
        if not os.path.isdir(ds_dir):
            raise HybridSeqError(f"{folder}: not a DeepSpeed checkpoint (no {DS_DIR}/ folder); to start from "
                                 "its weights use --init-from")
        meta = load_state(folder, ckpt.STATE)
        saved = (meta.get("engine") or {})
        topology = (int(saved.get("world_size", self.world_size)), int(saved.get("ep_size", self.ep_size)))
        if topology != (self.world_size, self.ep_size):
            return self._load_on_new_topology(folder, meta, topology)
        check_deepspeed_files(ds_dir)
        with _quiet_deepspeed():
            path, _ = self.ds.load_checkpoint(ds_dir, tag=DS_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise HybridSeqError(f"{folder}: DeepSpeed could not load {ds_dir}")
        if self.ep_size > 1:
            from .expert_parallel import load_local_expert_state

            load_local_expert_state(self.model, load_state(folder, _expert_file(self.rank)))
            self.optimizer.refresh_fp32_params()
        if os.path.isfile(os.path.join(folder, _rank_state_file(self.rank) + ".json")):
            return load_state(folder, _rank_state_file(self.rank))
        return meta["client"]

    def _load_on_new_topology(self, folder: str, meta: dict, topology: tuple) -> dict:
        """Resume a checkpoint written by another number of ranks or another ep_size: the weights
        from model.safetensors, the optimizer from its topology-independent copy (reshard.py)."""
        ranks, ep = topology
        if not os.path.isfile(os.path.join(folder, reshard.NAME + ".json")):
            why = ("ZeRO-3 checkpoints hold only per-rank partitions" if int(meta["engine"].get("zero_stage", 0)) == 3
                   else "it has no portable optimizer state")
            raise HybridSeqError(f"{folder} was written by {ranks} ranks with ep_size {ep}; this run has "
                                 f"{self.world_size} ranks with ep_size {self.ep_size}, and {why}. Resume with "
                                 "the same topology, or start a new run from its weights with --init-from")
        self.load_weights(folder)
        reshard.load_portable(self, load_state(folder, reshard.NAME), folder)
        if self.is_main:
            print(f"resumed {folder} (written by {ranks} ranks, ep_size {ep}) on {self.world_size} ranks, "
                  f"ep_size {self.ep_size}", flush=True)
        if os.path.isfile(os.path.join(folder, _rank_state_file(self.rank) + ".json")):
            return load_state(folder, _rank_state_file(self.rank))
        return meta["client"]

    def load_weights(self, folder: str) -> None:
        """Initialise the model from a saved model folder (``--init-from``): weights only."""
        from safetensors.torch import load_file

        path = os.path.join(folder, "model.safetensors")
        if not os.path.isfile(path):
            raise HybridSeqError(f"--init-from {folder}: no model.safetensors there")
        state = load_file(path)
        own = self.model.state_dict()
        if self.stage == 3:
            import deepspeed

            params = dict(self.model.named_parameters())
            _check_keys(folder, state, params.keys(), {k: tuple(p.ds_shape) for k, p in params.items()})
            with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
                if self.is_main:
                    with torch.no_grad():
                        for k, p in params.items():
                            p.copy_(state[k].to(p.dtype))
        else:
            if self.ep_size > 1:  # a saved model holds all experts: keep this EP rank's slice
                for m_name, m in self.model.named_modules():
                    if getattr(m, "ep_group", None) is not None:  # a block sharded by expert
                        n = m.n_local_experts
                        for w in ("w_in", "w_out"):
                            key = f"{m_name}.{w}"
                            if key in state:
                                state[key] = state[key][m.ep_rank * n:(m.ep_rank + 1) * n]
            _check_keys(folder, state, own.keys(), {k: tuple(v.shape) for k, v in own.items()})
            self.model.load_state_dict({k: state[k] for k in own}, strict=True)
        # the optimizer's fp32 partitions are copies of the weights: refresh them
        opt = self.optimizer
        if hasattr(opt, "refresh_fp32_params"):
            opt.refresh_fp32_params()
        elif hasattr(opt, "_restore_from_bit16_weights"):
            opt._restore_from_bit16_weights()


def _check_keys(folder, state, keys, shapes) -> None:
    check_weight_keys(f"--init-from {folder}", state, keys, shapes)


def write_pretrained(state: dict, model: nn.Module, cfg, folder: str, atomic: bool = True) -> None:
    """``hs.save_pretrained`` of ``state`` (a full state dict, e.g. gathered from ZeRO-3 shards):
    a CPU copy of the model is built from its config, loaded, and saved."""
    from ..api import save_pretrained
    from ..model import HybridLM

    from .expert_parallel import config_without_ep

    # an expert-parallel model is saved as the equivalent ep_size 1 model (experts gathered)
    model_cfg = config_without_ep(model.cfg)
    cfg = config_without_ep(cfg if cfg is not None else model.cfg)
    cpu = HybridLM(model_cfg)
    cpu.load_state_dict(state, strict=True)
    cpu.tokenizer_json = getattr(model, "tokenizer_json", None)  # saved beside the weights when set
    if atomic:
        save_pretrained(cpu, cfg, folder)
        return
    # inside a checkpoint's temporary folder: write next to it, then move the two files in
    tmp = os.path.join(folder, ".model")
    save_pretrained(cpu, cfg, tmp)
    for f in os.listdir(tmp):
        os.replace(os.path.join(tmp, f), os.path.join(folder, f))
    os.rmdir(tmp)


@contextlib.contextmanager
def _quiet_deepspeed():
    """DeepSpeed logs every initialisation and checkpoint step at INFO on every rank."""
    import logging

    from deepspeed.utils import logger

    level = logger.level
    if os.environ.get("HYBRIDSEQ_DS_VERBOSE") != "1":
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
