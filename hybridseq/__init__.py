"""hybridseq: hybrid sequence models (Mamba, mixture-of-experts, attention) from a YAML layout DSL.

    import hybridseq as hs
    cfg = hs.load_config("layouts/jamba.yaml", overrides=["model.d_model=64"])
    model = hs.build_model(cfg)
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

__version__ = "0.1.0"


def _alias_source_kernels() -> None:
    """Make the top-level ``kernels/`` folder importable as ``hybridseq.kernels``.

    An installed wheel has ``hybridseq/kernels/`` (pyproject maps it there). In a source checkout
    (repository root on sys.path, or an editable install) ``hybridseq/`` holds no ``kernels``
    folder, so we load ``../kernels`` under that name ourselves.
    """
    if "hybridseq.kernels" in sys.modules:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.isdir(os.path.join(here, "kernels")):
        return  # installed layout: the normal import system finds it
    src = os.path.join(os.path.dirname(here), "kernels")
    init = os.path.join(src, "__init__.py")
    if not os.path.isfile(init):
        return
    spec = importlib.util.spec_from_file_location(
        "hybridseq.kernels", init, submodule_search_locations=[src]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["hybridseq.kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["hybridseq.kernels"]
        raise


_alias_source_kernels()

from .errors import ConfigError, HybridSeqError  # noqa: E402

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
}


def __getattr__(name: str):
    if name in _LAZY:
        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hybridseq' has no attribute {name!r}")


__all__ = ["ConfigError", "HybridSeqError", "__version__", *_LAZY]
