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


class _SourceKernelsFinder:
    """Finds ``hybridseq.kernels`` in a source checkout, lazily (only when it is imported).

    An installed wheel has ``hybridseq/kernels/`` (pyproject maps the top-level ``kernels/`` folder
    there) and the normal import system finds it. In a source checkout (repository root on
    sys.path, or an editable install) ``hybridseq/`` holds no ``kernels`` folder, so this finder
    serves ``../kernels`` under that name.
    """

    def __init__(self, src: str):
        self.src = src

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "hybridseq.kernels":
            return None
        return importlib.util.spec_from_file_location(
            fullname, os.path.join(self.src, "__init__.py"), submodule_search_locations=[self.src]
        )


def _install_kernels_finder() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.isdir(os.path.join(here, "kernels")):
        return  # installed layout
    src = os.path.join(os.path.dirname(here), "kernels")
    if not os.path.isfile(os.path.join(src, "__init__.py")):
        return
    if not any(isinstance(f, _SourceKernelsFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceKernelsFinder(src))


_install_kernels_finder()

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
