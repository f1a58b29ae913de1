"""The block kinds: YAML name -> ``BlockSpec`` class. Adding a kind is its folder under
``hybridseq/blocks/`` and one line here."""
from __future__ import annotations

from .attention.spec import AttentionSpec
from .mamba.spec import MambaSpec
from .mlp.spec import MLPSpec
from .moe.spec import MoESpec
from .spec import BlockSpec

KINDS: dict[str, type[BlockSpec]] = {cls.kind: cls for cls in (
    MambaSpec,
    AttentionSpec,
    MoESpec,
    MLPSpec,
)}

# Megatron-LM hybrid-pattern characters -> kind ("M-M*-ME": M mamba, * attention, - mlp, E moe)
MEGATRON_KINDS: dict[str, str] = {cls.megatron: name for name, cls in KINDS.items() if cls.megatron}
