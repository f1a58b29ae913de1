"""Block kind ``attention``: ``spec.AttentionSpec`` (keys, checks, closed forms; no torch),
``block.AttentionBlock`` (the module), ``backends.py`` (flash-attn, SDPA, FlexAttention and the
PyTorch reference, with document masks) and ``rope.py``. Modules load on first use."""
from .spec import AttentionSpec


def __getattr__(name):
    if name == "AttentionBlock":
        from .block import AttentionBlock

        return AttentionBlock
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AttentionBlock", "AttentionSpec"]
