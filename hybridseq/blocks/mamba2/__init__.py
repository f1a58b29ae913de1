"""Block kind ``mamba2`` (Mamba-2, SSD): ``spec.Mamba2Spec`` (keys, checks, closed forms; no
torch) and ``block.Mamba2Block`` (the module, imported on first use)."""
from .spec import Mamba2Spec


def __getattr__(name):
    if name == "Mamba2Block":
        from .block import Mamba2Block

        return Mamba2Block
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Mamba2Block", "Mamba2Spec"]
