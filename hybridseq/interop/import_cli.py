"""``hybridseq import-hf SRC OUT``: a transformers checkpoint folder -> a hybridseq model folder
(``convert.py``)."""
from __future__ import annotations

from .convert import add_import_arguments as add_arguments
from .convert import run_import as run

__all__ = ["add_arguments", "run"]
