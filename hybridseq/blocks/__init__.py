"""Block kinds. Each kind is a folder: ``spec.py`` (its ``BlockSpec``: keys, defaults, checks,
closed forms, texts; no torch) and ``block.py`` (its ``Block``, an ``nn.Module``); ``registry``
lists them. ``base.py`` is the module contract, ``spec.py`` the spec contract, ``norm.py`` the
norms the model puts before every block.

    from hybridseq.blocks import KINDS, build_block
    spec = KINDS["mamba"].from_mapping({"d_state": 16}, d_model=512)
    block = spec.build(512, layer_idx=0, n_layers=24)      # or build_block("mamba", 512, {...})

Importing this package does not import torch (``hybridseq show`` only needs the specs).
"""
from __future__ import annotations

from .registry import KINDS, MEGATRON_KINDS
from .spec import BlockSpec, ffn_dim


def kind_spec(kind: str) -> type[BlockSpec]:
    """The spec class of ``kind`` (``ConfigError`` for an unknown kind)."""
    from ..errors import ConfigError

    try:
        return KINDS[kind]
    except KeyError:
        raise ConfigError(f"unknown block kind {kind!r} (choices: {', '.join(KINDS)})", key="kind") from None


def build_block(kind: str, d_model: int, spec, layer_idx: int = 0, n_layers: int = 1):
    """Instantiate block ``kind`` (``spec`` a mapping or the kind's spec) for sublayer
    ``layer_idx`` of ``n_layers``."""
    cls = kind_spec(kind)
    if not isinstance(spec, cls):
        spec = cls.from_mapping({k: v for k, v in dict(spec).items() if k != "kind"}, key=kind,
                                d_model=d_model)
    return spec.build(d_model, layer_idx=layer_idx, n_layers=n_layers)


__all__ = ["BlockSpec", "KINDS", "MEGATRON_KINDS", "build_block", "ffn_dim", "kind_spec"]
