"""hybridseq: hybrid sequence models (Mamba, mixture-of-experts, attention) from a YAML layout DSL.

    import hybridseq as hs
    cfg = hs.load_config("layouts/jamba.yaml", overrides=["model.d_model=64"])
    model = hs.build_model(cfg)
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

from .errors import ConfigError, HybridSeqError

# The public API, resolved lazily so that `import hybridseq` stays cheap and a CLI error path
# does not pay for importing every backend.
_LAZY = {
    "load_config": ("hybridseq.config", "load_config"),
    "build_model": ("hybridseq.api", "build_model"),
    "HybridLM": ("hybridseq.model", "HybridLM"),
    "ModelOutput": ("hybridseq.model", "ModelOutput"),
    "HybridCache": ("hybridseq.cache", "HybridCache"),
    "load_cache": ("hybridseq.api", "load_cache"),
    "load_pretrained": ("hybridseq.api", "load_pretrained"),
    "save_pretrained": ("hybridseq.api", "save_pretrained"),
    "from_hf": ("hybridseq.interop.hf", "from_hf"),
    "to_hf": ("hybridseq.interop.hf", "to_hf"),
}


def __getattr__(name: str):
    if name in _LAZY:
        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hybridseq' has no attribute {name!r}")


__all__ = ["ConfigError", "HybridSeqError", "__version__", *_LAZY]
