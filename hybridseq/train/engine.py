"""The engine interface the training loop talks to, and its single-process implementation.

The loop (``trainer.Trainer``) never touches the optimizer, the scheduler, autocast or the
checkpoint files itself; it calls an *engine*:

    engine.model              the plain nn.Module (unwrapped): evaluation, export, parameter counts
    engine.device             torch.device of the inputs
    engine.is_main            True on the process that logs (rank 0); engine.world_size
    engine.forward(inputs)    -> ModelOutput (logits, aux_loss), under the engine's autocast
    engine.backward(loss)     one micro-batch's loss, already divided by the accumulation steps
    engine.step()             after grad_accum micro-batches: unscale, clip, optimizer step,
                              LR schedule step, zero grads; -> {"lr": lr used, "grad_norm": float}
    engine.lr                 the learning rate the next step will use
    engine.autocast()         context manager used for evaluation forwards
    engine.state_dict() / engine.load_state_dict(sd)    optimizer, scheduler, grad scaler
    engine.save_checkpoint(root, step, client_state, keep_last) -> folder
                              writes root/step_XXXXXXXX/ atomically: model.safetensors and
                              config.yaml (hs.save_pretrained), trainer_state.pt holding
                              {"engine": engine.state_dict(), "client": client_state}
    engine.load_checkpoint(folder) -> client_state      restores model and engine state
    engine.load_weights(folder)                         weights only (``--init-from``)
    engine.unwrap_for_export() -> nn.Module             the module whose weights an export holds

``LocalEngine`` implements it for one process on CPU or one GPU (AdamW groups, warmup+cosine,
clipping, bf16/fp16 autocast). A DeepSpeed engine (``deepspeed_engine.py``) implements the same
methods on top of ``deepspeed.initialize``; the loop does not change.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
from torch import nn

from ..errors import HybridSeqError
from . import checkpoint as ckpt
from .state_io import load_state, save_state
from .optim import build_optimizer
from .schedule import build_scheduler, default_warmup

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_weight_keys(where: str, state: dict, keys, shapes: dict) -> None:
    """Raise a HybridSeqError naming the first missing / mis-shaped keys of a saved state."""
    missing = [k for k in keys if k not in state]
    bad = [k for k in keys if k in state and tuple(state[k].shape) != shapes[k]]
    if missing or bad:
        what = (f"missing {missing[:3]}" if missing else "") + (f" shape mismatch {bad[:3]}" if bad else "")
        raise HybridSeqError(f"{where}: weights do not match this config ({what.strip()})")


def resolve_device(name: str = "auto") -> torch.device:
    name = str(name or "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise HybridSeqError(f"train.device: unknown device {name!r} (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HybridSeqError(f"train.device: {name!r} requested but CUDA is not available (use cpu or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise HybridSeqError(f"train.device: {name!r} requested but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise HybridSeqError(f"train.device: {name!r} requested but Apple's MPS backend is not available here "
                             "(use cpu or auto)")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 autocast on CUDA, fp32 elsewhere."""
    precision = str(precision or "auto")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise HybridSeqError(f"train.precision: unknown value {precision!r} (auto, fp32, bf16, fp16)")
    return precision


class LocalEngine:
    """One process, CPU or one GPU. See the module docstring for the interface."""

    is_main = True
    world_size = 1
    rank = 0

    def __init__(self, model: nn.Module, train_cfg: dict, cfg=None, device=None):
        self.model = model
        self.cfg = cfg
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.precision = resolve_precision(train_cfg.get("precision", "auto"), self.device)
        self.grad_clip = float(train_cfg.get("grad_clip") or 0.0)
        steps = int(train_cfg["steps"])
        self.optimizer = build_optimizer(model, lr=float(train_cfg["lr"]),
                                         weight_decay=float(train_cfg["weight_decay"]),
                                         betas=train_cfg.get("betas", (0.9, 0.95)))
        self.scheduler = build_scheduler(self.optimizer, total_steps=steps,
                                         warmup_steps=default_warmup(steps, train_cfg.get("warmup_steps")),
                                         min_lr_ratio=float(train_cfg["min_lr_ratio"]))
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self._forward = torch.compile(model) if train_cfg.get("compile") else model

    # --- the step ---------------------------------------------------------------------------
    def autocast(self):
        if self.precision in AUTOCAST_DTYPES:
            return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.precision])
        return contextlib.nullcontext()

    def forward(self, inputs: torch.Tensor, **kwargs):
        """The model's forward under autocast; ``kwargs`` (e.g. ``doc_ids``) are passed on."""
        with self.autocast():
            return self._forward(inputs, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def step(self) -> dict:
        """Clip and apply the accumulated gradients. Without a loss scaler, gradients that are not
        finite are never applied: the update is skipped (``"skipped": True``) and ``bad_param``
        names the first parameter whose gradient went non-finite. (fp16's loss scaler skips such
        steps by design and lowers its scale.)"""
        lr = self.lr
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        out = {"lr": lr, "grad_norm": grad_norm}
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif math.isfinite(grad_norm):
            self.optimizer.step()
        else:
            out.update(skipped=True, bad_param=first_nonfinite_grad(self.model))
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out

    def skip_step(self) -> dict:
        """Drop the accumulated gradients without an update (the schedule still advances, so the
        learning rate stays a function of the step)."""
        lr = self.lr
        if self.scaler is not None:
            self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"lr": lr, "grad_norm": float("nan"), "skipped": True}

    def all_finite(self, ok: bool) -> bool:
        """Whether every process saw finite values (one process: ``ok``)."""
        return bool(ok)

    # --- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        sd = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.scaler is not None:
            sd["scaler"] = self.scaler.state_dict()
        return sd

    def load_state_dict(self, sd: dict) -> None:
        self.optimizer.load_state_dict(sd["optimizer"])
        self.scheduler.load_state_dict(sd["scheduler"])
        if self.scaler is not None and "scaler" in sd:
            self.scaler.load_state_dict(sd["scaler"])

    def unwrap_for_export(self) -> nn.Module:
        return self.model

    def save_checkpoint(self, root: str, step: int, client_state: dict, keep_last: int = 2) -> str:
        from ..api import save_pretrained

        def write(folder: str) -> None:
            save_pretrained(self.unwrap_for_export(), cfg=self.cfg, folder=folder)
            save_state({"engine": self.state_dict(), "client": client_state}, folder, ckpt.STATE)

        return ckpt.save_checkpoint(root, step, write, keep_last=keep_last)

    def _load_model_weights(self, folder: str, what: str) -> None:
        from safetensors.torch import load_file

        weights = os.path.join(folder, "model.safetensors")
        if not os.path.isfile(weights):
            raise HybridSeqError(f"{what} {folder}: no model.safetensors there")
        state = load_file(weights, device=str(self.device))
        model_sd = self.model.state_dict()
        check_weight_keys(f"{what} {folder}", state, model_sd.keys(),
                          {k: tuple(v.shape) for k, v in model_sd.items()})
        # tied weights are stored once; load_state_dict(strict=False) leaves the alias in place
        self.model.load_state_dict({k: v for k, v in state.items() if k in model_sd}, strict=False)

    def load_weights(self, folder: str) -> None:
        self._load_model_weights(folder, "--init-from")

    def load_checkpoint(self, folder: str) -> dict:
        self._load_model_weights(folder, "checkpoint")
        trainer_state = load_state(folder, ckpt.STATE)
        self.load_state_dict(trainer_state["engine"])
        return trainer_state["client"]


def first_nonfinite_grad(model: nn.Module) -> str | None:
    """The name of the first parameter (in module order) whose gradient holds a NaN or an inf."""
    for name, p in model.named_parameters():
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            return name
    return None
