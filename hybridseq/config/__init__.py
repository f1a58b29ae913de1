"""The layout DSL: YAML + OmegaConf loading, overrides, schema defaults, the pattern grammar,
validation, and values derived from a config.

    from hybridseq.config import load_config
    cfg = load_config("layouts/jamba.yaml", overrides=["model.d_model=128"])
    cfg.stack          # ['M', 'F', 'M', 'E', ...], one symbol per sublayer
    cfg.stage_starts   # [0, ...]: sublayer indices where pipeline stages begin
"""
from .derived import block_kinds, config_hash, resolve_dt_rank, resolve_ffn_dim
from .loader import load_config, save_config
from .pattern import format_stack, parse_layout, parse_layout_list, parse_megatron
from .schema import (BLOCK_DEFAULTS, CHOICES, MEGATRON_SYMBOLS, MODEL_DEFAULTS, TASK_DEFAULTS,
                     TRAIN_DEFAULTS, TYPES)

__all__ = [
    "load_config", "save_config", "config_hash", "resolve_ffn_dim", "resolve_dt_rank", "block_kinds",
    "parse_layout", "parse_layout_list", "parse_megatron", "format_stack",
    "BLOCK_DEFAULTS", "CHOICES", "MEGATRON_SYMBOLS", "MODEL_DEFAULTS", "TASK_DEFAULTS", "TRAIN_DEFAULTS",
    "TYPES",
]
