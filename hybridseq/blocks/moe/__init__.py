"""Block kind ``moe``: ``spec.MoESpec`` (keys, checks, closed forms; no torch), ``block.MoEBlock``
(the module, with ``MoEKernels``), ``router.py``, ``experts.py`` (loop / grouped / megablocks
backends), ``parallel.py`` (expert parallelism) and ``megablocks.py``. Modules load on first
use."""
from .spec import MoESpec

_LAZY = {
    "MoEBlock": ".block", "MoEKernels": ".block", "apply_capacity": ".block",
    "capacity_of": ".block", "megablocks_available": ".megablocks",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MoESpec", *_LAZY]
