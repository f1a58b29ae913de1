"""Synthetic tasks of the Mamba paper (selective copying, induction heads) and Zoology (MQAR).

Every task is generated on the fly from a ``torch.Generator`` (no downloads), vectorised over the
batch, and scores only its answer positions (``targets`` holds -100 elsewhere). Inputs and targets
are aligned: the logits at position t are scored against ``targets[:, t]``.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import IGNORE, Task


def _random_subset(batch: int, n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, k) distinct indices drawn uniformly from range(n), one row per sequence."""
    return torch.rand(batch, n, generator=generator).argsort(dim=1)[:, :k]


def _need(cond: bool, message: str, key: str) -> None:
    if not cond:
        raise ConfigError(message, key=key)


class SelectiveCopy(Task):
    """Selective copying (Mamba paper, section 4.1.1 and Table 1).

    Token ids: ``0`` noise, ``1..vocab`` data symbols, ``vocab + 1`` marker;
    ``vocab_size = vocab + 2``. A sequence has ``L = seq_len + n_data`` tokens::

        position:  0 ............................ seq_len-1 | seq_len ... seq_len+n_data-1
        inputs:    0 0 d1 0 0 0 d2 0 d3 0 ... 0 dn 0 0 0   | m  m  m ... m
        targets:   -100 everywhere                         | d1 d2 d3 ... dn

    The ``n_data`` data tokens sit at distinct uniformly random positions of the first
    ``seq_len`` (the noise region); after them come ``n_data`` markers ``m`` and at the i-th marker
    the model must output the i-th data token, in order of appearance. Chance accuracy is
    ``1 / vocab``. Because the positions are random, a time-invariant (LTI) model cannot solve it.
    """

    name = "selective_copy"

    def __init__(self, seq_len: int = 256, n_data: int = 16, vocab: int = 16, seed: int = 0):
        super().__init__(seed)
        _need(vocab >= 1, f"vocab must be >= 1, got {vocab}", "train.task.vocab")
        _need(n_data >= 1, f"n_data must be >= 1, got {n_data}", "train.task.n_data")
        _need(n_data <= seq_len, f"n_data ({n_data}) must be <= seq_len ({seq_len})", "train.task.seq_len")
        self.region, self.n_data, self.vocab = int(seq_len), int(n_data), int(vocab)
        self.noise, self.marker = 0, self.vocab + 1
        self.vocab_size = self.vocab + 2
        self.seq_len = self.region + self.n_data

    def _sample(self, batch_size, generator):
        b, r, n = batch_size, self.region, self.n_data
        pos = _random_subset(b, r, n, generator).sort(dim=1).values
        data = torch.randint(1, self.vocab + 1, (b, n), generator=generator)
        inputs = torch.full((b, self.seq_len), self.noise, dtype=torch.long)
        inputs.scatter_(1, pos, data)
        inputs[:, r:] = self.marker
        targets = torch.full((b, self.seq_len), IGNORE, dtype=torch.long)
        targets[:, r:] = data
        return inputs, targets


class InductionHeads(Task):
    """Induction heads (Mamba paper, section 4.1.2 and Table 11; Olsson et al. 2022).

    Token ids: ``0..vocab-1`` ordinary tokens, ``vocab`` the special token ``S``;
    ``vocab_size = vocab + 1``. A sequence has ``L = seq_len`` tokens::

        inputs:   t t t ... t S k t t ... t t S
        targets:  -100 ...................... k      (only the last position is scored)

    All ``t`` are uniform over the ordinary tokens; ``S`` occurs exactly twice: once at a uniformly
    random position p in ``[0, L-3]``, followed by the key ``k`` (uniform), and once at the last
    position, where the model must output ``k``. Chance accuracy is ``1 / vocab``. Evaluating at
    a larger ``seq_len`` than trained on measures length extrapolation.
    """

    name = "induction_heads"

    def __init__(self, seq_len: int = 256, vocab: int = 16, seed: int = 0):
        super().__init__(seed)
        _need(vocab >= 2, f"vocab must be >= 2, got {vocab}", "train.task.vocab")
        _need(seq_len >= 3, f"seq_len must be >= 3, got {seq_len}", "train.task.seq_len")
        self.vocab, self.special = int(vocab), int(vocab)
        self.vocab_size = self.vocab + 1
        self.seq_len = int(seq_len)

    def _sample(self, batch_size, generator):
        b, length = batch_size, self.seq_len
        inputs = torch.randint(0, self.vocab, (b, length), generator=generator)
        p = torch.randint(0, length - 2, (b, 1), generator=generator)
        key = inputs.gather(1, p + 1)  # the token after the first S is the key
        inputs.scatter_(1, p, self.special)
        inputs[:, -1] = self.special
        targets = torch.full((b, length), IGNORE, dtype=torch.long)
        targets[:, -1:] = key
        return inputs, targets


class MQAR(Task):
    """Multi-query associative recall (Arora et al. 2023, "Zoology").

    Token ids: ``0`` filler, keys from ``[1, vocab // 2)``, values from ``[vocab // 2, vocab)``;
    ``vocab_size = vocab``. A sequence has ``L = seq_len`` tokens::

        inputs:   k1 v1 k2 v2 ... kn vn | 0 0 k3 0 k1 0 0 0 kn 0 ... 0
        targets:  -100 ............... | . . v3 . v1 . . . vn . ... .

    The first ``2 * n_pairs`` positions hold ``n_pairs`` key-value pairs (distinct keys, values
    drawn with replacement). In the rest, every key is queried once, in a random order, at
    distinct random positions among filler tokens; at a query the model must output that key's
    value. Chance accuracy is ``2 / vocab``.
    """

    name = "mqar"

    def __init__(self, seq_len: int = 128, n_pairs: int = 8, vocab: int = 256, seed: int = 0):
        super().__init__(seed)
        _need(n_pairs >= 1, f"n_pairs must be >= 1, got {n_pairs}", "train.task.n_pairs")
        _need(vocab // 2 - 1 >= n_pairs,
              f"vocab ({vocab}) too small for {n_pairs} distinct keys: need vocab >= {2 * (n_pairs + 1)}",
              "train.task.vocab")
        _need(seq_len >= 3 * n_pairs,
              f"seq_len ({seq_len}) must be >= 3 * n_pairs ({3 * n_pairs}) to hold pairs and queries",
              "train.task.seq_len")
        self.n_pairs, self.vocab = int(n_pairs), int(vocab)
        self.vocab_size = self.vocab
        self.seq_len = int(seq_len)

    def _sample(self, batch_size, generator):
        b, n, length, half = batch_size, self.n_pairs, self.seq_len, self.vocab // 2
        keys = _random_subset(b, half - 1, n, generator) + 1
        values = torch.randint(half, self.vocab, (b, n), generator=generator)
        inputs = torch.zeros((b, length), dtype=torch.long)
        inputs[:, 0:2 * n:2] = keys
        inputs[:, 1:2 * n:2] = values
        order = _random_subset(b, n, n, generator)                  # which pair each query asks
        qpos = _random_subset(b, length - 2 * n, n, generator) + 2 * n
        inputs.scatter_(1, qpos, keys.gather(1, order))
        targets = torch.full((b, length), IGNORE, dtype=torch.long)
        targets.scatter_(1, qpos, values.gather(1, order))
        return inputs, targets
