"""Windows of packed documents from one split of a prepared folder (``prepare.py`` writes it).

    split = PackedSplit("data/prepared", read_meta("data/prepared"), "train")
    tokens, segments, byte_weights = split.read(start, n, seed=0, shuffle=True)

The split is seen as one endless token *stream*: epoch ``e`` is every document of the split, each
ending with its end-of-document token, concatenated in the order of a permutation drawn from
``numpy.random.default_rng([seed, e])`` (``shuffle=True``), or in stored order
(``shuffle=False``). Every epoch holds the split's ``n_tokens`` tokens, so stream position ``p``
is token ``p % n_tokens`` of epoch ``p // n_tokens``, and any window of the stream is a function
of ``(seed, p)`` alone: that is what makes the windows deterministic, resumable from one integer,
and cheap to slice between ranks.

``read`` returns, for each token, its *segment*: a counter that goes up by one at every
document start inside the window (documents split by a window edge are segments of both
windows), and its *byte weight*: the document's UTF-8 byte count over its token count, so that
the weights of a document's tokens sum to its bytes (bits per byte).

Shards are opened with ``numpy.memmap``; only the document index (``.idx``, ``.nbytes``: 16
bytes per document) is read into memory.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import HybridSeqError

DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


class PackedSplit:
    """One split (``train`` or ``val``) of a prepared folder (module docstring)."""

    def __init__(self, folder: str, meta: dict, split: str):
        self.folder, self.split = folder, split
        info = meta["splits"].get(split) or {"documents": 0, "tokens": 0, "shards": []}
        self.n_docs, self.n_tokens = int(info["documents"]), int(info["tokens"])
        self.dtype = np.dtype(DTYPES.get(meta["dtype"], np.uint16)).newbyteorder("<")
        if meta["dtype"] not in DTYPES:
            raise HybridSeqError(f"{os.path.join(folder, 'meta.json')}: dtype {meta['dtype']!r} is not one of "
                                 f"{', '.join(DTYPES)}")
        records = {s["name"]: s for s in meta["shards"]}
        self.shards = []
        for name in info["shards"]:
            rec = records.get(name)
            path = os.path.join(folder, f"{name}.bin")
            if rec is None:
                raise HybridSeqError(f"{os.path.join(folder, 'meta.json')}: split {split} names shard {name}, "
                                     "which has no record")
            for ext, size in ((".bin", int(rec["tokens"]) * self.dtype.itemsize),
                              (".idx", 8 * (int(rec["documents"]) + 1)), (".nbytes", 8 * int(rec["documents"]))):
                f = os.path.join(folder, name + ext)
                if not os.path.isfile(f):
                    raise HybridSeqError(f"{f}: missing (the prepared folder is incomplete: prepare it again)")
                if os.path.getsize(f) != size:
                    raise HybridSeqError(f"{f}: {os.path.getsize(f)} bytes, meta.json gives {size} (changed or "
                                         "truncated: prepare the data again)")
            self.shards.append((path, rec))
        self._docs = None
        self._maps: dict[int, np.ndarray] = {}
        self._epochs: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    # --- the document index (read on first use) -------------------------------------------------
    def _load(self):
        if self._docs is None:
            shard, start, length, nbytes = [], [], [], []
            for k, (path, rec) in enumerate(self.shards):
                base = path[:-4]
                idx = np.fromfile(base + ".idx", dtype="<u8").astype(np.int64)
                nb = np.fromfile(base + ".nbytes", dtype="<u8").astype(np.int64)
                if idx[0] != 0 or idx[-1] != int(rec["tokens"]) or np.any(np.diff(idx) < 1):
                    raise HybridSeqError(f"{base}.idx: document offsets do not describe {base}.bin "
                                         "(prepare the data again)")
                shard.append(np.full(len(nb), k, dtype=np.int32))
                start.append(idx[:-1])
                length.append(np.diff(idx))
                nbytes.append(nb)
            cat = (lambda a, t: np.concatenate(a) if a else np.zeros(0, dtype=t))  # noqa: E731
            self._docs = (cat(shard, np.int32), cat(start, np.int64), cat(length, np.int64), cat(nbytes, np.int64))
        return self._docs

    def _tokens(self, k: int) -> np.ndarray:
        if k not in self._maps:
            self._maps[k] = np.memmap(self.shards[k][0], dtype=self.dtype, mode="r")
        return self._maps[k]

    def _epoch(self, epoch: int, seed: int, shuffle: bool) -> tuple[np.ndarray, np.ndarray]:
        """(document order, cumulative token offsets in that order) of one epoch."""
        key = (int(epoch), int(seed), bool(shuffle))
        if key not in self._epochs:
            _, _, length, _ = self._load()
            if shuffle:
                order = np.random.default_rng([int(seed), int(epoch)]).permutation(self.n_docs)
            else:
                order = np.arange(self.n_docs)
            cum = np.zeros(self.n_docs + 1, dtype=np.int64)
            np.cumsum(length[order], out=cum[1:])
            if len(self._epochs) >= 2:  # a window touches at most a few consecutive epochs
                self._epochs.pop(next(iter(self._epochs)))
            self._epochs[key] = (order, cum)
        return self._epochs[key]

    # --- reading ----------------------------------------------------------------------------------
    def read(self, start: int, n: int, seed: int = 0, shuffle: bool = True):
        """``n`` tokens of the stream from position ``start``: (tokens int64, segments int64,
        byte weights float64), each of length ``n`` (module docstring)."""
        if self.n_tokens <= 0:
            raise HybridSeqError(f"{self.folder}: the {self.split} split holds no tokens")
        shard, first, length, nbytes = self._load()
        toks = np.empty(n, dtype=np.int64)
        seg = np.empty(n, dtype=np.int64)
        weight = np.empty(n, dtype=np.float64)
        filled, pos, s = 0, int(start), -1
        while filled < n:
            epoch, off = divmod(pos, self.n_tokens)
            order, cum = self._epoch(epoch, seed, shuffle)
            j = int(np.searchsorted(cum, off, side="right")) - 1
            d = int(order[j])
            within = off - int(cum[j])
            take = min(int(length[d]) - within, n - filled)
            a = int(first[d]) + within
            toks[filled:filled + take] = self._tokens(int(shard[d]))[a:a + take]
            s += 1
            seg[filled:filled + take] = s
            weight[filled:filled + take] = nbytes[d] / length[d]
            filled += take
            pos += take
        return toks, seg, weight


__all__ = ["PackedSplit"]
