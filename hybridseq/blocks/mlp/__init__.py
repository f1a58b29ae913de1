"""Block kind ``mlp``: ``spec.MLPSpec`` (keys and closed forms; no torch) and ``block.MLPBlock``
(the module, imported on first use)."""
from .spec import MLPSpec


def __getattr__(name):
    if name == "MLPBlock":
        from .block import MLPBlock

        return MLPBlock
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MLPBlock", "MLPSpec"]
