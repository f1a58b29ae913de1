"""The layout DSL: YAML + OmegaConf loading, overrides, the pattern grammar, and the typed
config they resolve into (``HybridConfig``).

    from hybridseq.config import load_config
    cfg = load_config("layouts/jamba.yaml", overrides=["model.d_model=128"])
    cfg.stack          # ['M', 'F', 'M', 'E', ...], one symbol per sublayer
    cfg.stage_starts   # [0, ...]: sublayer indices where pipeline stages begin
    cfg.blocks["M"]    # the typed spec of symbol M (hybridseq.blocks.mamba.MambaSpec)
"""
from ..blocks.spec import ffn_dim as resolve_ffn_dim
from .derived import block_kinds, config_hash
from .loader import load_config, save_config
from .pattern import format_stack, parse_layout, parse_layout_list, parse_megatron
from .schema import BLOCK_DEFAULTS, MEGATRON_SYMBOLS, MODEL_DEFAULTS, TASK_DEFAULTS, TRAIN_DEFAULTS
from .sections import Blocks, HybridConfig, ModelSpec, TrainSpec

__all__ = [
    "load_config", "save_config", "config_hash", "block_kinds", "resolve_ffn_dim", "HybridConfig", "ModelSpec",
    "TrainSpec", "Blocks", "parse_layout", "parse_layout_list", "parse_megatron", "format_stack",
    "BLOCK_DEFAULTS", "MEGATRON_SYMBOLS", "MODEL_DEFAULTS", "TASK_DEFAULTS", "TRAIN_DEFAULTS",
]
