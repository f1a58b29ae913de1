"""The tasks' keys, defaults and checks (``train.task`` of a layout file), without torch.

    TASKS["mqar"].from_mapping({"seq_len": 64}, key="train.task")   # a checked MQARSpec

Each spec knows the batch length and, for the synthetic tasks, the vocabulary in closed form, so
``hybridseq show`` never builds a task. The tasks themselves are in ``synthetic.py`` / ``text.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ..spec import Spec, fail, option


@dataclass(eq=False)
class TaskSpec(Spec):
    name: ClassVar[str] = ""

    def to_dict(self) -> dict:
        return {"name": self.name, **super().to_dict()}

    def batch_len(self) -> int:
        """The length L of a batch (the training sequence length)."""
        return int(self.seq_len)

    def vocab_size(self) -> int | None:
        """The vocabulary the model needs, when known without reading data (else None)."""
        return None


@dataclass(eq=False)
class SelectiveCopySpec(TaskSpec):
    """Mamba paper, selective copying: ``n_data`` data tokens (from ``vocab`` symbols) scattered
    among noise in the first ``seq_len`` positions, then ``n_data`` markers after which they are
    recalled."""

    name: ClassVar[str] = "selective_copy"
    seq_len: int = option(256, ge=2)
    n_data: int = option(16, ge=1)
    vocab: int = option(16, ge=2)

    def check(self, *, file=None, key: str = "", **context) -> None:
        if self.n_data > self.seq_len:
            fail(file, f"{key}.n_data", f"n_data={self.n_data} exceeds seq_len={self.seq_len}",
                 "the data tokens are scattered among the first seq_len positions")

    def batch_len(self) -> int:
        return self.seq_len + self.n_data

    def vocab_size(self) -> int:
        return self.vocab + 2  # noise 0, data 1..vocab, marker vocab + 1


@dataclass(eq=False)
class InductionHeadsSpec(TaskSpec):
    """Mamba paper, induction heads: a random sequence over ``vocab`` symbols containing a special
    token followed by a key; at the end the special token again: predict the key."""

    name: ClassVar[str] = "induction_heads"
    seq_len: int = option(256, ge=3)
    vocab: int = option(16, ge=2)

    def vocab_size(self) -> int:
        return self.vocab + 1  # the special token is vocab


@dataclass(eq=False)
class MQARSpec(TaskSpec):
    """Multi-query associative recall (Zoology): ``n_pairs`` key-value pairs, then queries."""

    name: ClassVar[str] = "mqar"
    seq_len: int = option(128, ge=2)
    n_pairs: int = option(8, ge=1)
    vocab: int = option(256, ge=2)

    def check(self, *, file=None, key: str = "", **context) -> None:
        if self.vocab // 2 - 1 < self.n_pairs:
            fail(file, f"{key}.vocab", f"vocab ({self.vocab}) too small for {self.n_pairs} distinct keys",
                 f"need vocab >= {2 * (self.n_pairs + 1)}")
        if self.seq_len < 3 * self.n_pairs:
            fail(file, f"{key}.seq_len", f"seq_len ({self.seq_len}) must be >= 3 * n_pairs "
                 f"({3 * self.n_pairs}) to hold pairs and queries")

    def vocab_size(self) -> int:
        return self.vocab


@dataclass(eq=False)
class TextSpec(TaskSpec):
    """Language modelling on a folder written by ``hybridseq prepare`` (packed documents), a local
    text file or folder (bytes), or memmapped ``.bin`` token files.

    ``tokenizer``: ``bytes`` (text files), ``tokenizer.json`` (a prepared folder's own), ``ids``
    (``.bin`` files); the trainer records what the data is. ``dtype`` and ``val_fraction`` are for
    text and ``.bin`` files (a prepared folder records its own). ``pack``: with a prepared folder,
    batches carry ``doc_ids`` so that no block crosses a document boundary."""

    name: ClassVar[str] = "text"
    path: str | None = None
    seq_len: int = option(256, ge=2)
    tokenizer: str = "bytes"
    dtype: Literal["uint16", "uint32"] = "uint16"
    val_fraction: float = option(0.05, ge=0)
    pack: bool = True

    def check(self, *, file=None, key: str = "", **context) -> None:
        if self.path is None or not str(self.path).strip():
            fail(file, f"{key}.path", "the text task needs a path",
                 "a text file, a folder of text files, or a .bin token file")
        if not 0 <= self.val_fraction < 1:
            fail(file, f"{key}.val_fraction", f"{self.val_fraction} is out of range", "0 <= val_fraction < 1")

    def vocab_size(self) -> int | None:
        """A prepared folder's vocabulary, from its meta.json (no torch, no data read)."""
        import json
        import os

        meta = os.path.join(os.path.expanduser(str(self.path)), "meta.json")
        try:
            with open(meta, encoding="utf-8") as fh:
                data = json.load(fh)
            if data.get("format") == "hybridseq-tokens" and isinstance(data.get("vocab_size"), int):
                return int(data["vocab_size"])
        except (OSError, ValueError, AttributeError):
            pass
        return None  # text or .bin files: the task counts it


TASKS: dict[str, type[TaskSpec]] = {cls.name: cls for cls in (
    SelectiveCopySpec, InductionHeadsSpec, MQARSpec, TextSpec)}

__all__ = ["InductionHeadsSpec", "MQARSpec", "SelectiveCopySpec", "TASKS", "TaskSpec", "TextSpec"]
