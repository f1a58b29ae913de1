"""Tasks: synthetic (selective_copy, induction_heads, mqar) and language modelling (text).

    from hybridseq.data import make_task, task_vocab_size
    task = make_task(cfg.train.task, seed=cfg.train.seed)            # a TaskSpec or {name: ...}
    longer = make_task(cfg.train.task, seed=0, seq_len=1024)          # length extrapolation
    inputs, targets = task.next_batch(16)                              # (B, L) int64 each

``specs.py`` holds each task's keys and checks (no torch: ``hybridseq show`` reads them);
``base.Task`` the batch contract (``base.Batch``: a batch with ``doc_ids`` and ``n_bytes``);
``synthetic`` / ``text`` the token layouts; ``prepare`` / ``tokenizer`` / ``packed`` real text
(``hybridseq prepare`` and the windows of its folders). The modules with torch load on first
use.
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping

from ..errors import ConfigError
from .specs import TASKS as TASK_SPECS
from .specs import TaskSpec

_CLASSES = {"selective_copy": (".synthetic", "SelectiveCopy"), "induction_heads": (".synthetic", "InductionHeads"),
            "mqar": (".synthetic", "MQAR"), "text": (".text", "TextTask")}
_LAZY = {"IGNORE": ".base", "Task": ".base", "Batch": ".base", "accuracy": ".base", "score": ".base",
         "SelectiveCopy": ".synthetic", "InductionHeads": ".synthetic", "MQAR": ".synthetic",
         "TextTask": ".text"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    if name == "TASKS":
        return {n: getattr(importlib.import_module(m, __name__), c) for n, (m, c) in _CLASSES.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def as_task_spec(task_cfg: Any, **overrides) -> TaskSpec:
    """``task_cfg`` (a ``TaskSpec``, a name, or ``{name: ..., <task keys>}``) as a checked
    ``TaskSpec``, with ``overrides`` (None values ignored) applied."""
    if task_cfg is None:
        task_cfg = "selective_copy"
    if isinstance(task_cfg, TaskSpec):
        cfg = task_cfg.to_dict()
    elif isinstance(task_cfg, str):
        cfg = {"name": task_cfg}
    elif isinstance(task_cfg, Mapping):
        cfg = dict(task_cfg)
    else:
        try:  # an OmegaConf DictConfig
            from omegaconf import OmegaConf

            cfg = dict(OmegaConf.to_container(task_cfg, resolve=True))
        except Exception:
            raise ConfigError(f"a task is a name or a mapping {{name: ..., ...}}, got {task_cfg!r}",
                              key="train.task") from None
    name = cfg.pop("name", None)
    if name not in TASK_SPECS:
        raise ConfigError(f"unknown task {name!r}; known: {', '.join(TASK_SPECS)}", key="train.task.name")
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return TASK_SPECS[name].from_mapping(cfg, key="train.task", what=f"{name} task key")


def task_spec(task_cfg: Any, **overrides) -> dict:
    """The task's full spec as a dict (``name`` plus every key, defaults filled in), checked."""
    return as_task_spec(task_cfg, **overrides).to_dict()


def make_task(task_cfg: Any, seed: int = 0, seq_len: int | None = None):
    """Build the task named by ``task_cfg``, seeded. ``seq_len`` overrides the configured length
    (evaluation at other lengths)."""
    spec = as_task_spec(task_cfg, seq_len=seq_len).to_dict()
    module, cls = _CLASSES[spec.pop("name")]
    return getattr(importlib.import_module(module, __name__), cls)(**spec, seed=int(seed))


def task_vocab_size(task_cfg: Any) -> int:
    """The vocabulary a model needs for this task (``model.vocab_size: auto``): the spec's closed
    form when it has one, else the built task's."""
    v = as_task_spec(task_cfg).vocab_size()
    return int(v) if v is not None else make_task(task_cfg).vocab_size


def task_seq_len(task_cfg: Any) -> int:
    """The length of a training batch of this task."""
    return as_task_spec(task_cfg).batch_len()


__all__ = ["IGNORE", "TASKS", "TASK_SPECS", "Batch", "Task", "TaskSpec", "accuracy", "as_task_spec", "make_task",
           "score", "task_seq_len", "task_spec", "task_vocab_size", "SelectiveCopy", "InductionHeads",
           "MQAR", "TextTask"]
