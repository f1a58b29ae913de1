"""Folder-to-folder conversions and the ``hybridseq import-hf`` / ``export-hf`` commands.

    hybridseq import-hf SRC OUT [--dtype auto|float32|bfloat16|float16] [--pad-vocab-multiple N]
    hybridseq export-hf SRC OUT [--family NAME] [--dtype ...]

``import-hf``: SRC a local transformers checkpoint folder (``config.json``, ``model.safetensors``
or shards with ``model.safetensors.index.json``); OUT a hybridseq model folder (``config.yaml``
with the generated layout, ``model.safetensors`` through ``hs.save_pretrained``) with SRC's
tokenizer files copied beside. ``export-hf``: SRC a hybridseq model folder, checkpoint or run
folder (its latest checkpoint); OUT a transformers checkpoint folder, with SRC's tokenizer files.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import HybridSeqError


def import_hf(src: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "auto",
              pad_vocab_multiple: int = 1) -> Path:
    """Convert the transformers checkpoint folder ``src`` into the hybridseq model folder
    ``out`` (tokenizer files copied); returns ``out``."""
    from ..api import save_pretrained
    from .hf import from_hf
    from .hf_io import copy_tokenizer_files

    if Path(out).resolve() == Path(src).resolve():
        raise HybridSeqError("import-hf: OUT must differ from SRC")
    model, cfg = from_hf(src, dtype=dtype, pad_vocab_multiple=pad_vocab_multiple)
    folder = save_pretrained(model, cfg, out)
    copy_tokenizer_files(src, folder)
    return folder


def export_hf(src: str | os.PathLike, out: str | os.PathLike, *, family: str | None = None,
              dtype: str = "auto") -> Path:
    """Convert the hybridseq model (folder, checkpoint or run) ``src`` into the transformers
    checkpoint folder ``out`` (tokenizer files copied); returns ``out``."""
    from ..api import load_pretrained
    from ..train.checkpoint import resolve_checkpoint
    from .hf import to_hf

    folder = resolve_checkpoint(str(src))
    if Path(out).resolve() == Path(folder).resolve():
        raise HybridSeqError("export-hf: OUT must differ from SRC")
    model = load_pretrained(folder)
    return to_hf(model, out, family=family, dtype=dtype, tokenizer_from=folder)


# --- the two commands (hybridseq.cli's plugin interface: add_arguments(parser), run(args)) ------
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def add_import_arguments(p) -> None:
    p.add_argument("src", help="a local transformers checkpoint folder (config.json + safetensors)")
    p.add_argument("out", help="the hybridseq model folder to write")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="the model's dtype (auto: the checkpoint's)")
    p.add_argument("--pad-vocab-multiple", type=int, default=1,
                   help="round the vocabulary up to a multiple of this (zero rows)")


def run_import(args) -> int:
    if args.pad_vocab_multiple < 1:
        raise HybridSeqError(f"import-hf: --pad-vocab-multiple must be >= 1, got {args.pad_vocab_multiple}")
    folder = import_hf(args.src, args.out, dtype=args.dtype, pad_vocab_multiple=args.pad_vocab_multiple)
    print(f"wrote {folder} (config.yaml, model.safetensors)")
    return 0


def add_export_arguments(p) -> None:
    from .hf import FAMILIES

    p.add_argument("src", help="a hybridseq model folder, checkpoint, or run folder (its latest checkpoint)")
    p.add_argument("out", help="the transformers checkpoint folder to write")
    p.add_argument("--family", choices=sorted(FAMILIES), default=None,
                   help="the transformers model_type to write (default: the first that fits)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="the tensors' dtype (auto: the model's)")


def run_export(args) -> int:
    folder = export_hf(args.src, args.out, family=args.family, dtype=args.dtype)
    import json

    with open(Path(folder) / "config.json", encoding="utf-8") as f:
        arch = json.load(f).get("architectures", ["?"])[0]
    print(f"wrote {folder} ({arch}: config.json, model.safetensors)")
    return 0


__all__ = ["export_hf", "import_hf"]
