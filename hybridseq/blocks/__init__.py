"""Block kinds and their registry. Each kind is one residual sublayer (``x = x + block(norm(x))``)
following the contract of ``base.Block``.

    BLOCKS["mamba"]                       # the class of a kind
    build_block("attention", d_model, spec, layer_idx=3, n_layers=12)
"""
from __future__ import annotations

from typing import Any, Mapping

from ..config.schema import BLOCK_DEFAULTS
from ..errors import ConfigError
from .attention import AttentionBlock
from .base import Block, keep_fp32
from .mamba import MambaBlock
from .mlp import MLPBlock
from .moe import MoEBlock
from .norm import LayerNorm, RMSNorm, make_norm, norm_param_count

BLOCKS: dict[str, type[Block]] = {
    "mamba": MambaBlock,
    "attention": AttentionBlock,
    "moe": MoEBlock,
    "mlp": MLPBlock,
}


def block_class(kind: str) -> type[Block]:
    try:
        return BLOCKS[kind]
    except KeyError:
        raise ConfigError(f"unknown block kind {kind!r} (choices: {', '.join(BLOCKS)})",
                          key="kind") from None


def full_spec(kind: str, spec: Mapping[str, Any]) -> dict:
    """``spec`` with the schema defaults of ``kind`` filled in (and no ``kind`` key)."""
    out = {**BLOCK_DEFAULTS.get(kind, {}), **{k: v for k, v in dict(spec).items() if k != "kind"}}
    return out


def build_block(kind: str, d_model: int, spec: Mapping[str, Any], layer_idx: int = 0,
                n_layers: int = 1) -> Block:
    """Instantiate block ``kind`` for sublayer ``layer_idx`` of ``n_layers``."""
    cls = block_class(kind)
    return cls(d_model, full_spec(kind, spec), layer_idx=layer_idx, n_layers=n_layers)


__all__ = ["BLOCKS", "Block", "AttentionBlock", "MambaBlock", "MLPBlock", "MoEBlock", "LayerNorm",
           "RMSNorm", "block_class", "build_block", "full_spec", "keep_fp32", "make_norm",
           "norm_param_count"]
