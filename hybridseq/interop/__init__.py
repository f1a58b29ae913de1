"""Interoperability with other ecosystems: Hugging Face transformers checkpoints (``hf``), and
an lm-evaluation-harness model (``lm_eval``).

    model, cfg = hybridseq.interop.from_hf("hf_folder")    # also hs.from_hf
    hybridseq.interop.to_hf(model, "out_folder")            # also hs.to_hf

The submodules load on first use: importing this package imports no torch.
"""
from __future__ import annotations

import importlib

_LAZY = {"from_hf": ".hf", "to_hf": ".hf", "import_hf": ".convert", "export_hf": ".convert",
         "HFError": ".hf", "HFUnsupported": ".hf", "FAMILIES": ".hf"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)
