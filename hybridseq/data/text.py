"""Language modelling on local data: a text file or folder (byte tokens) or memmap token files.

``path`` may be
- a text file, or a folder of text files (read recursively, sorted, hidden files skipped): every
  byte is a token (``tokenizer: bytes``, vocabulary 256);
- a ``.bin`` file, or a folder of ``.bin`` files, of pre-tokenized ids stored as a flat array of
  ``dtype`` (``uint16`` or ``uint32``), opened with ``numpy.memmap`` (never read whole). The
  vocabulary is ``max(id) + 1`` over all files (one pass, in chunks); set ``model.vocab_size``
  explicitly to use a tokenizer's full vocabulary.

Each source's last ``val_fraction`` of tokens is held out for evaluation. A batch is ``B`` random
windows of ``seq_len + 1`` tokens from the training parts (source chosen in proportion to its
length): ``inputs = w[:-1]``, ``targets = w[1:]`` (next-token prediction, every position scored).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from ..errors import ConfigError
from .base import Task

DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
KEY = "train.task.path"


def _list_files(path: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".")]
    return out


class TextTask(Task):
    """Random windows of a byte-tokenized text corpus or of memmapped token files (see module doc)."""

    name = "text"
    has_seq_acc = False

    def __init__(self, path=None, seq_len: int = 256, tokenizer: str = "bytes", dtype: str = "uint16",
                 val_fraction: float = 0.05, seed: int = 0):
        super().__init__(seed)
        if not path:
            raise ConfigError("the text task needs a path (a text file/folder or .bin token files)", key=KEY)
        path = os.path.expanduser(str(path))
        if not os.path.exists(path):
            raise ConfigError(f"no such file or folder: {path}", key=KEY)
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}", key="train.task.val_fraction")
        if int(seq_len) < 1:
            raise ConfigError(f"seq_len must be >= 1, got {seq_len}", key="train.task.seq_len")
        self.path, self.seq_len = path, int(seq_len)
        files = _list_files(path) if os.path.isdir(path) else [path]
        bins = [f for f in files if f.endswith(".bin")]
        if bins:
            if dtype not in DTYPES:
                raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}", key="train.task.dtype")
            item = np.dtype(DTYPES[dtype]).itemsize
            for f in bins:
                size = os.path.getsize(f)
                if size == 0 or size % item:
                    raise ConfigError(f"{f}: {size} bytes is not a whole number of {dtype} tokens "
                                      f"({item} bytes each): set train.task.dtype to the file's, or "
                                      "prepare the data again", key="train.task.dtype")
            arrays = [np.memmap(f, dtype=DTYPES[dtype], mode="r") for f in bins]
            self.vocab_size = int(max(self._max_id(a) for a in arrays if len(a))) + 1
            self.kind, names = "tokens", bins
        else:
            if tokenizer != "bytes":
                raise ConfigError(f"tokenizer {tokenizer!r} is not supported for text files in this build; "
                                  "use 'bytes' or pre-tokenized .bin files", key="train.task.tokenizer")
            arrays = [np.fromfile(f, dtype=np.uint8) for f in files]
            self.vocab_size, self.kind, names = 256, "bytes", files
        need = self.seq_len + 1
        self.train_parts, self.val_parts = [], []
        for name, a in zip(names, arrays):
            n_val = int(len(a) * float(val_fraction))
            if n_val and n_val < need:
                n_val = need  # keep at least one full evaluation window
            train, val = a[: len(a) - n_val], a[len(a) - n_val:]
            if len(train) >= need:
                self.train_parts.append(train)
            if len(val) >= need:
                self.val_parts.append(val)
        if not self.train_parts:
            raise ConfigError(f"{path}: no file holds seq_len + 1 = {need} tokens for training "
                              f"(after holding out val_fraction={val_fraction})", key=KEY)
        if not self.val_parts:  # val_fraction 0 or tiny corpus: evaluate on the training data
            self.val_parts = self.train_parts
        self.n_tokens = int(sum(len(a) for a in arrays))

    @staticmethod
    def _max_id(a: np.ndarray, chunk: int = 1 << 24) -> int:
        return max(int(a[i:i + chunk].max()) for i in range(0, len(a), chunk))

    def _windows(self, parts, batch_size, generator):
        need = self.seq_len + 1
        weights = torch.tensor([len(p) - need + 1 for p in parts], dtype=torch.float64)
        src = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
        rows = []
        for s in src.tolist():
            start = int(torch.randint(0, len(parts[s]) - need + 1, (1,), generator=generator))
            rows.append(np.asarray(parts[s][start:start + need], dtype=np.int64))
        w = torch.from_numpy(np.stack(rows))
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def _sample(self, batch_size, generator):
        return self._windows(self.train_parts, batch_size, generator)

    def _sample_eval(self, batch_size, generator):
        return self._windows(self.val_parts, batch_size, generator)

    def describe(self) -> str:
        return f"text {self.path} ({self.kind}, {self.n_tokens} tokens, L={self.seq_len}, vocab={self.vocab_size})"
