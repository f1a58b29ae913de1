"""Block kind ``mamba`` (Mamba-1): ``spec.MambaSpec`` (keys, checks, closed forms; no torch)
and ``block.MambaBlock`` (the module, imported on first use)."""
from .spec import MambaSpec


def __getattr__(name):
    if name == "MambaBlock":
        from .block import MambaBlock

        return MambaBlock
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MambaBlock", "MambaSpec"]
