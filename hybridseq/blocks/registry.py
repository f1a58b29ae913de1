"""The block kinds: YAML name -> ``BlockSpec`` class. Adding a kind is its folder under
``hybridseq/blocks/`` and one line here."""
from __future__ import annotations

from .attention.spec import AttentionSpec
from .mamba.spec import MambaSpec
from .mamba2.spec import Mamba2Spec
from .mlp.spec import MLPSpec
from .moe.spec import MoESpec
from .spec import BlockSpec

KINDS: dict[str, type[BlockSpec]] = {cls.kind: cls for cls in (
    MambaSpec,
    Mamba2Spec,
    AttentionSpec,
    MoESpec,
    MLPSpec,
)}

# Megatron-LM hybrid-pattern characters -> the kind a character gets by default ("M-M*-ME": M
# mamba, * attention, - mlp, E moe); a layout may declare another kind claiming the same
# character (M: {kind: mamba2})
MEGATRON_KINDS: dict[str, str] = {}
for _name, _cls in KINDS.items():
    if _cls.megatron:
        MEGATRON_KINDS.setdefault(_cls.megatron, _name)
