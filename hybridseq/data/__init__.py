"""Tasks: synthetic (selective_copy, induction_heads, mqar) and language modelling (text).

    from hybridseq.data import make_task, task_vocab_size
    task = make_task(cfg.train.task, seed=cfg.train.seed)            # {name: ..., <task keys>}
    longer = make_task(cfg.train.task, seed=0, seq_len=1024)          # length extrapolation
    inputs, targets = task.next_batch(16)                              # (B, L) int64 each

See ``base.Task`` for the batch contract and ``synthetic``/``text`` for each token layout.
"""
from __future__ import annotations

from typing import Any, Mapping

from ..config.schema import TASK_DEFAULTS
from ..errors import ConfigError
from .base import IGNORE, Task, accuracy, score
from .synthetic import MQAR, InductionHeads, SelectiveCopy
from .text import TextTask

TASKS: dict[str, type[Task]] = {
    "selective_copy": SelectiveCopy,
    "induction_heads": InductionHeads,
    "mqar": MQAR,
    "text": TextTask,
}


def _as_dict(task_cfg: Any) -> dict:
    if task_cfg is None:
        task_cfg = "selective_copy"
    if isinstance(task_cfg, str):
        return {"name": task_cfg}
    if not isinstance(task_cfg, Mapping):
        try:  # an OmegaConf DictConfig
            from omegaconf import OmegaConf

            return dict(OmegaConf.to_container(task_cfg, resolve=True))
        except Exception:
            raise ConfigError(f"a task is a name or a mapping {{name: ..., ...}}, got {task_cfg!r}",
                              key="train.task") from None
    return {k: v for k, v in task_cfg.items()}


def task_spec(task_cfg: Any, **overrides) -> dict:
    """The task's full spec (``name`` plus every key, defaults filled in), checked."""
    cfg = _as_dict(task_cfg)
    name = cfg.pop("name", None)
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; known: {', '.join(TASKS)}", key="train.task.name")
    spec = dict(TASK_DEFAULTS[name])
    for k, v in {**cfg, **{k: v for k, v in overrides.items() if v is not None}}.items():
        if k not in spec:
            raise ConfigError(f"unknown key {k!r} for task {name}; known: {', '.join(spec)}",
                              key=f"train.task.{k}")
        spec[k] = v
    return {"name": name, **spec}


def make_task(task_cfg: Any, seed: int = 0, seq_len: int | None = None) -> Task:
    """Build the task named by ``task_cfg`` (a name or ``{name: ..., <task keys>}``), seeded.

    ``seq_len`` overrides the configured length (evaluation at other lengths)."""
    spec = task_spec(task_cfg, seq_len=seq_len)
    name = spec.pop("name")
    return TASKS[name](**spec, seed=int(seed))


def task_vocab_size(task_cfg: Any) -> int:
    """The vocabulary a model needs for this task (``model.vocab_size: auto``)."""
    return make_task(task_cfg).vocab_size


__all__ = ["IGNORE", "TASKS", "Task", "accuracy", "make_task", "score", "task_spec", "task_vocab_size",
           "SelectiveCopy", "InductionHeads", "MQAR", "TextTask"]
