"""Language modelling on local data: a prepared folder, a text file or folder (byte tokens), or
memmap token files.

``path`` may be
- a folder written by ``hybridseq prepare`` (it holds ``meta.json``): see *Prepared folders*
  below;
- a text file, or a folder of text files (read recursively, sorted, hidden files skipped): every
  byte is a token (``tokenizer: bytes``, vocabulary 256);
- a ``.bin`` file, or a folder of ``.bin`` files, of pre-tokenized ids stored as a flat array of
  ``dtype`` (``uint16`` or ``uint32``), opened with ``numpy.memmap`` (never read whole). The
  vocabulary is ``max(id) + 1`` over all files (one pass, in chunks); set ``model.vocab_size``
  explicitly to use a tokenizer's full vocabulary.

Text files and ``.bin`` files: each source's last ``val_fraction`` of tokens is held out for
evaluation. A batch is ``B`` random windows of ``seq_len + 1`` tokens from the training parts
(source chosen in proportion to its length): ``inputs = w[:-1]``, ``targets = w[1:]`` (next-token
prediction, every position scored).

Prepared folders: the split into training and validation documents was made by ``prepare``
(``val_fraction`` is not used). The training documents form one stream, reshuffled every epoch
(``packed.PackedSplit``), and the stream is cut into consecutive windows of ``seq_len + 1``
tokens that overlap by one token, so every token is a target once per epoch. Batch ``b`` holds
windows ``b*B .. b*B + B - 1`` in drawing order: the data position is one integer (``window``,
in ``state_dict``), batches are a function of the seed and that position, and the ``B * world``
rows of a global batch (``ShardedTask``) are distinct windows. With ``pack: true`` (default) a
batch is a ``Batch`` with ``doc_ids`` (B, L): the documents of each row are numbered 0, 1, ...
(a window's first document is usually the end of one cut by the window's edge), so the model
keeps them apart; ``pack: false`` leaves them out (the model reads across documents). Evaluation
windows come from the validation documents in stored order, spread evenly over them, and carry
``n_bytes`` for bits per byte. The vocabulary is ``meta.json``'s ``vocab_size``, and
``tokenizer_file`` names the folder's ``tokenizer.json`` (the trainer copies it into the run).

``tokenizer`` (``train.task.tokenizer``) says how ids map to text; ``self.tokenizer`` holds what
the data really is: ``bytes`` (text files), ``tokenizer.json`` (a prepared folder: the tokenizer
file beside it) or ``ids`` (``.bin`` files, no known tokenizer). The trainer writes it into the
run's config.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from ..errors import ConfigError, HybridSeqError
from .base import Batch, Task
from .prepare import META, PROGRESS, is_prepared, read_meta
from .prepare import list_files as _list_files
from .tokenizer import TOKENIZER_NAME

DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
KEY = "train.task.path"
PREPARED_TOKENIZERS = ("bytes", TOKENIZER_NAME)  # "bytes": the key's default, i.e. not set


class TextTask(Task):
    """Random windows of a byte-tokenized text corpus or of memmapped token files (see module doc)."""

    name = "text"
    has_seq_acc = False
    language_model = True
    tokenizer_file = None  # a prepared folder's tokenizer.json

    def __init__(self, path=None, seq_len: int = 256, tokenizer: str = "bytes", dtype: str = "uint16",
                 val_fraction: float = 0.05, pack: bool = True, seed: int = 0):
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
        self.prepared = os.path.isdir(path) and is_prepared(path)
        if self.prepared:
            self._init_prepared(tokenizer, bool(pack))
            return
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, PROGRESS)):
            raise ConfigError(f"{path}: an unfinished hybridseq prepare ({PROGRESS}, no {META}): finish it "
                              "with hybridseq prepare ... --resume", key=KEY)
        self.pack = False
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
            self.tokenizer = "ids"
        else:
            if tokenizer != "bytes":
                raise ConfigError(f"tokenizer {tokenizer!r} is not supported for text files in this build; "
                                  "use 'bytes' or pre-tokenized .bin files", key="train.task.tokenizer")
            arrays = [np.fromfile(f, dtype=np.uint8) for f in files]
            self.vocab_size, self.kind, names = 256, "bytes", files
            self.tokenizer = "bytes"
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
        inputs, targets = self._windows(self.val_parts, batch_size, generator)
        if self.kind != "bytes":
            return inputs, targets
        # a byte is a token: every scored target is one byte of text
        return Batch(inputs, targets, n_bytes=torch.full((batch_size,), float(self.seq_len), dtype=torch.float64))

    # --- prepared folders -------------------------------------------------------------------------
    def _init_prepared(self, tokenizer: str, pack: bool) -> None:
        from .packed import PackedSplit

        if tokenizer not in PREPARED_TOKENIZERS:
            raise ConfigError(f"{tokenizer!r}: a prepared folder is read with its own {TOKENIZER_NAME} "
                              f"(leave the key out, or write {TOKENIZER_NAME})", key="train.task.tokenizer")
        try:
            meta = read_meta(self.path)
            self.train_split = PackedSplit(self.path, meta, "train")
            self.val_split = PackedSplit(self.path, meta, "val")
        except ConfigError:
            raise
        except HybridSeqError as e:  # the folder's own checks: name the key too
            raise ConfigError(str(e), key=KEY) from None
        if self.train_split.n_tokens == 0:
            raise ConfigError(f"{self.path}: the train split holds no documents (prepared with "
                              f"--val-fraction {meta.get('settings', {}).get('val_fraction')})", key=KEY)
        if self.val_split.n_tokens == 0:  # nothing held out: evaluate on training documents
            self.val_split = self.train_split
        self.meta, self.pack = meta, pack
        self.vocab_size, self.kind, self.tokenizer = int(meta["vocab_size"]), "prepared", TOKENIZER_NAME
        self.eos_id = int(meta["eos_id"])
        tok = os.path.join(self.path, TOKENIZER_NAME)
        self.tokenizer_file = tok if os.path.isfile(tok) else None
        held_out = self.val_split is not self.train_split
        self.n_tokens = self.train_split.n_tokens + (self.val_split.n_tokens if held_out else 0)
        self.window = 0

    def _packed_rows(self, split, windows, shuffle: bool) -> Batch:
        """The windows ``windows`` (stream positions ``k * seq_len``) of ``split`` as a batch."""
        L = self.seq_len
        rows, segs, nbytes = [], [], []
        for k in windows:
            toks, seg, weight = split.read(int(k) * L, L + 1, seed=self.seed, shuffle=shuffle)
            rows.append(toks)
            segs.append(seg[:-1])
            nbytes.append(weight[1:].sum())
        w = torch.from_numpy(np.stack(rows))
        doc_ids = torch.from_numpy(np.stack(segs)) if self.pack else None
        return Batch(w[:, :-1].contiguous(), w[:, 1:].contiguous(), doc_ids,
                     torch.tensor(nbytes, dtype=torch.float64))

    def next_batch(self, batch_size: int):
        if not self.prepared:
            return super().next_batch(batch_size)
        b = int(batch_size)
        batch = self._packed_rows(self.train_split, range(self.window, self.window + b), shuffle=True)
        self.window += b
        self.batches_drawn += 1
        return batch

    def eval_batches(self, n: int, batch_size: int):
        if not self.prepared:
            return super().eval_batches(n, batch_size)
        key = (int(n), int(batch_size))
        if key not in self._eval_cache:
            want = int(n) * int(batch_size)
            have = max(1, (self.val_split.n_tokens - 1) // self.seq_len)  # distinct windows in one pass
            ks = [i * have // want for i in range(want)] if want <= have else list(range(want))
            self._eval_cache[key] = [self._packed_rows(self.val_split, ks[i:i + int(batch_size)], shuffle=False)
                                     for i in range(0, want, int(batch_size))]
        return self._eval_cache[key]

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.prepared:
            state["window"] = self.window
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.prepared:
            self.window = int(state.get("window", 0))

    def describe(self) -> str:
        if self.prepared:
            val = "none held out" if self.val_split is self.train_split else \
                f"val {self.val_split.n_docs} documents / {self.val_split.n_tokens} tokens"
            return (f"text {self.path} (prepared: train {self.train_split.n_docs} documents / "
                    f"{self.train_split.n_tokens} tokens, {val}, L={self.seq_len}, vocab={self.vocab_size}, "
                    f"{'packed with doc_ids' if self.pack else 'no doc_ids'})")
        return f"text {self.path} ({self.kind}, {self.n_tokens} tokens, L={self.seq_len}, vocab={self.vocab_size})"
