"""Optional packages and the extra that installs each: a missing one is a one-line error that
names the extra (``pip install 'hybridseq[deepspeed]'``), raised where the feature starts."""
from __future__ import annotations

import importlib.util

from .errors import HybridSeqError

# module -> the extra of pyproject.toml that installs it
EXTRAS = {
    "deepspeed": "deepspeed",
    "matplotlib": "plots",
    "tensorboard": "tensorboard",
    "flash_attn": "flash",
    "megablocks": "megablocks",
    "datasets": "hf-datasets",
}


def available(module: str) -> bool:
    """Whether ``module`` can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, feature: str) -> None:
    """Raise ``HybridSeqError`` when ``module`` is missing: "<feature> needs <module>: pip install
    'hybridseq[<extra>]'"."""
    if not available(module):
        extra = EXTRAS.get(module, module)
        raise HybridSeqError(f"{feature} needs the {module} package, which is not installed: "
                             f"pip install 'hybridseq[{extra}]'")
