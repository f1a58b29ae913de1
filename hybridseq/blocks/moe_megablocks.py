"""Optional megablocks (dMoE) expert backend: detection only for now."""
from __future__ import annotations

import importlib.util


def megablocks_available() -> bool:
    return importlib.util.find_spec("megablocks") is not None


def experts_megablocks(*args, **kwargs):
    raise NotImplementedError("the megablocks expert backend is not implemented yet")
