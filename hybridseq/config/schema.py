"""The schema as plain dicts, derived from the typed specs (which hold the defaults): for code
and tests that want the defaults of a section as a mapping.

    BLOCK_DEFAULTS["mamba"]["d_state"]     # 16, from MambaSpec
"""
from __future__ import annotations

from ..blocks import KINDS, MEGATRON_KINDS
from ..data.specs import TASKS
from .sections import ModelSpec, TrainSpec

MODEL_DEFAULTS: dict = ModelSpec.defaults()
BLOCK_DEFAULTS: dict[str, dict] = {kind: cls.defaults() for kind, cls in KINDS.items()}
TASK_DEFAULTS: dict[str, dict] = {name: cls.defaults() for name, cls in TASKS.items()}
TRAIN_DEFAULTS: dict = {**TrainSpec.defaults(), "task": "selective_copy"}

# Megatron-LM hybrid pattern characters -> (symbol, kind) with default specs.
MEGATRON_SYMBOLS: dict[str, tuple[str, str]] = {
    char: ("A" if char == "*" else "F" if char == "-" else char, kind)
    for char, kind in MEGATRON_KINDS.items()
}

# Top-level keys of a layout file. `stack` and `stage_starts` are computed from `layout` (given
# values are ignored, so a saved config loads again); `deepspeed` and `compare` pass through.
TOP_LEVEL_KEYS: tuple = (
    "name", "description", "model", "blocks", "layout", "train", "deepspeed", "compare",
    "stack", "stage_starts",
)
