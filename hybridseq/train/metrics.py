"""Run logging: ``metrics.jsonl`` (one JSON object per logged step) and the progress bar.

Each line of ``metrics.jsonl`` is a flat object with at least ``step``; training records carry
``loss``, ``lr``, ``tokens_per_s`` (and ``acc``, ``grad_norm``, ``aux_loss``, ``tokens``,
``elapsed_s``), evaluation records ``eval_loss``, ``eval_acc`` (and ``eval_seq_acc`` for the
synthetic tasks). On resume from step ``s`` the file is first truncated to the records with
``step <= s``, so a crashed-then-resumed run logs the same steps as an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import os
import sys


def _clean(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsWriter:
    def __init__(self, path: str, resume_step: int | None = None):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if resume_step is not None and os.path.exists(path):
            keep = [r for r in read_metrics(path) if int(r.get("step", 0)) <= resume_step]
            with open(path, "w") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in keep)
        elif resume_step is None and os.path.exists(path):
            open(path, "w").close()  # a fresh run in an existing folder starts a fresh log
        self._fh = open(path, "a")

    def write(self, record: dict) -> None:
        self._fh.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl file (a torn last line, from a crash, is skipped)."""
    out = []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


class Progress:
    """A tqdm bar on stderr (or nothing when disabled / tqdm missing)."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "train"):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=initial, desc=desc, file=sys.stderr,
                                dynamic_ncols=True, leave=True)
            except ImportError:
                self.bar = None

    def update(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                     refresh=False)
            self.bar.update(n)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class TensorBoardWriter:
    """The scalar fields of each metrics record as TensorBoard scalars (``train.tensorboard:
    true``; needs the ``tensorboard`` package: ``pip install 'hybridseq[tensorboard]'``)."""

    def __init__(self, logdir: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            from ..errors import HybridSeqError

            raise HybridSeqError("train.tensorboard: true needs the tensorboard package "
                                 "(pip install 'hybridseq[tensorboard]')") from e
        self._w = SummaryWriter(logdir)

    def write(self, record: dict) -> None:
        step = int(record["step"])
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._w.add_scalar(key, value, step)

    def close(self) -> None:
        self._w.close()
