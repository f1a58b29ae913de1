"""The Task contract shared by every data source, and the accuracy metrics.

A task yields aligned batches ``(inputs, targets)``, both ``(B, L)`` int64: the model reads
``inputs`` and its logits at position ``t`` are scored against ``targets[:, t]``. Positions that
are not scored hold ``IGNORE`` (-100, the ``ignore_index`` of ``torch.nn.functional.cross_entropy``).
For language modelling ``targets`` is ``inputs`` shifted left by one; for the synthetic tasks only
the answer positions are scored.

    task = make_task({"name": "selective_copy", "seq_len": 64}, seed=0)
    inputs, targets = task.next_batch(16)        # advances the task's torch.Generator
    fixed = task.eval_batches(4, 16)              # the same list for a given seed, every call
    state = task.state_dict(); task.load_state_dict(state)   # the data position, for resume

Training batches come from one ``torch.Generator`` seeded with ``seed``; evaluation batches from a
separate generator seeded with ``seed + EVAL_SEED_OFFSET`` (and, for ``text``, from held-out data),
so evaluation never depends on how far training went.

A batch may carry more than the pair: a ``Batch`` unpacks as ``(inputs, targets)`` like a plain
tuple, and has ``doc_ids`` (B, L) int64 when its rows pack several documents (the model takes
them as ``model(inputs, doc_ids=...)``, so no state or attention crosses a document boundary) and
``n_bytes`` (B,) float64, the text bytes its scored targets stand for (bits per byte). Both are
None when the task has no such thing; code that reads batches uses ``getattr(batch, "doc_ids",
None)``, so plain tuples stay valid batches.
"""
from __future__ import annotations

from typing import Iterator

import torch

IGNORE = -100
EVAL_SEED_OFFSET = 1_000_003


class Batch(tuple):
    """``(inputs, targets)`` with optional ``doc_ids`` (B, L) and ``n_bytes`` (B,) (module doc)."""

    def __new__(cls, inputs: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor | None = None,
                n_bytes: torch.Tensor | None = None):
        batch = super().__new__(cls, (inputs, targets))
        batch.doc_ids, batch.n_bytes = doc_ids, n_bytes
        return batch

    def rows(self, lo: int, hi: int) -> "Batch":
        """Rows ``lo:hi`` of every part (a rank's slice of a global batch)."""
        cut = (lambda t: None if t is None else t[lo:hi])  # noqa: E731
        return Batch(self[0][lo:hi], self[1][lo:hi], cut(self.doc_ids), cut(self.n_bytes))


class Task:
    """Base class: subclasses set ``name``, ``vocab_size``, ``seq_len`` (the length L of a batch)
    and implement ``_sample(batch_size, generator) -> (inputs, targets)`` and, where evaluation
    data differs from training data, ``_sample_eval``."""

    name: str = ""
    vocab_size: int = 0
    seq_len: int = 0
    #: whether per-sequence accuracy (every scored position right) is meaningful for this task
    has_seq_acc: bool = True
    #: language modelling (every next token scored): evaluation also reports perplexity
    language_model: bool = False

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.batches_drawn = 0
        self._eval_cache: dict[tuple[int, int], list] = {}

    # --- sampling ------------------------------------------------------------------------------
    def _sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _sample_eval(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self._sample(batch_size, generator)

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next training batch; advances the data position."""
        batch = self._sample(int(batch_size), self.generator)
        self.batches_drawn += 1
        return batch

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch(batch_size)

    def eval_batches(self, n: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``n`` evaluation batches, a function of the seed only (cached)."""
        key = (int(n), int(batch_size))
        if key not in self._eval_cache:
            g = torch.Generator().manual_seed(self.seed + EVAL_SEED_OFFSET)
            self._eval_cache[key] = [self._sample_eval(int(batch_size), g) for _ in range(int(n))]
        return self._eval_cache[key]

    # --- data position -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"seed": self.seed, "generator": self.generator.get_state(), "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.batches_drawn = int(state.get("batches_drawn", 0))

    def describe(self) -> str:
        return f"{self.name} (L={self.seq_len}, vocab={self.vocab_size})"


def score(logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Counts for accuracy on scored positions (``targets != IGNORE``).

    Returns ``{"correct", "scored", "seq_correct", "seqs"}`` as Python ints: exact-token matches of
    ``argmax(logits)``, scored positions, sequences whose every scored position is right, and
    sequences with at least one scored position. Sum these over batches, then divide.
    """
    mask = targets != IGNORE
    pred = logits.argmax(dim=-1)
    hit = (pred == targets) & mask
    has = mask.any(dim=-1)
    seq_ok = ((hit | ~mask).all(dim=-1)) & has
    return {
        "correct": int(hit.sum()),
        "scored": int(mask.sum()),
        "seq_correct": int(seq_ok.sum()),
        "seqs": int(has.sum()),
    }


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """(token accuracy, sequence accuracy) of one batch; 0.0 where nothing is scored."""
    s = score(logits, targets)
    return s["correct"] / max(1, s["scored"]), s["seq_correct"] / max(1, s["seqs"])
