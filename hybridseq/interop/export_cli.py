"""``hybridseq export-hf SRC OUT``: a hybridseq model (folder, checkpoint or run) -> a
transformers checkpoint folder (``convert.py``)."""
from __future__ import annotations

from .convert import add_export_arguments as add_arguments
from .convert import run_export as run

__all__ = ["add_arguments", "run"]
