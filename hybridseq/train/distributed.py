"""Rank/world helpers for multi-process training (DeepSpeed launcher, torchrun, or one process).

- ``dist_env()``: rank, local rank and world size from the launcher's environment; a plain
  ``python launch/train.py`` gets a world of one (``MASTER_ADDR``/``MASTER_PORT`` filled in).
- ``disable_shm_comm_op()``: DeepSpeed's CPU accelerator JIT-compiles a shared-memory
  all-reduce op when its communication backend starts (1-3 minutes of C++ build on a small
  machine, cached under ``~/.cache/torch_extensions``). It serves only ``inference_all_reduce``
  (tensor-parallel inference), never training, so we mark it unavailable before
  ``deepspeed.init_distributed``; set ``HYBRIDSEQ_DS_SHM=1`` to keep it.
- ``ShardedTask``: the distributed sampler. Every rank holds the same task with the same seed,
  draws the same *global* batch of ``world * B`` sequences and keeps its own slice
  ``[rank * B, (rank + 1) * B)``. The ranks see disjoint data, the union of a step's batches is
  exactly what one process with ``batch_size = world * B`` sees, and the data position (the
  generator state) is identical on every rank, so a checkpoint resumes on any rank layout of the
  same world size. A batch's ``doc_ids`` and ``n_bytes`` (``data.base.Batch``) are sliced with
  it. Evaluation batches are the task's own (identical on every rank).
- ``DistributedTrainer``: ``Trainer`` with that sampler and with every step's logged numbers
  averaged (loss, aux loss) or summed (accuracy counts) over the ranks, so ``metrics.jsonl``
  (written by rank 0) describes the global batch.
"""
from __future__ import annotations

import os
import signal
import socket

import torch
import torch.distributed as dist

from ..data.base import Batch, Task
from .trainer import Trainer


def dist_env() -> dict:
    """``{"rank", "local_rank", "world_size"}`` from RANK/LOCAL_RANK/WORLD_SIZE (set by the
    ``deepspeed`` launcher, torchrun, or slurm via ``launch/slurm.sh``); single-process
    defaults otherwise, with MASTER_ADDR=127.0.0.1 and a free MASTER_PORT."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", rank if world == 1 else 0))
    if "WORLD_SIZE" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    return {"rank": rank, "local_rank": local, "world_size": world}


def disable_shm_comm_op() -> None:
    """Skip the JIT build of DeepSpeed's shared-memory inference all-reduce (see module doc)."""
    if os.environ.get("HYBRIDSEQ_DS_SHM") == "1":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def barrier() -> None:
    if is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (pickled)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class ShardedTask(Task):
    """Rank ``rank``'s slice of one global batch stream (see module doc). Wraps a task; its
    state (data position) is the wrapped task's."""

    def __init__(self, task: Task, rank: int, world_size: int):
        self.inner, self.rank, self.world = task, int(rank), int(world_size)
        self.name, self.vocab_size, self.seq_len = task.name, task.vocab_size, task.seq_len
        self.has_seq_acc = task.has_seq_acc
        self.language_model = getattr(task, "language_model", False)
        self.seed = task.seed

    def next_batch(self, batch_size: int):
        batch = self.inner.next_batch(int(batch_size) * self.world)
        lo, hi = self.rank * int(batch_size), (self.rank + 1) * int(batch_size)
        if isinstance(batch, Batch):
            return batch.rows(lo, hi)
        inputs, targets = batch
        return inputs[lo:hi], targets[lo:hi]

    def eval_batches(self, n: int, batch_size: int):
        return self.inner.eval_batches(n, batch_size)

    @property
    def batches_drawn(self) -> int:
        return self.inner.batches_drawn

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)

    def describe(self) -> str:
        return f"{self.inner.describe()} [rank {self.rank} of {self.world}]"


class DistributedTrainer(Trainer):
    """``Trainer`` for one rank of a data-parallel run (see module doc). ``rank`` and
    ``world_size`` default to torch.distributed's."""

    def __init__(self, cfg, *args, rank: int | None = None, world_size: int | None = None, **kwargs):
        r = get_rank() if rank is None else int(rank)
        w = get_world_size() if world_size is None else int(world_size)
        # rank=0 for the base class: every rank builds the task with the same seed; the slice
        # makes the data disjoint.
        super().__init__(cfg, *args, rank=0, **kwargs)
        self.rank, self.world = r, w
        self.task = ShardedTask(self.task, r, w)

    def train_step(self) -> dict:
        rec = super().train_step()
        if self.world > 1 and is_initialized():
            # loss and aux are means over equal-sized local batches: average them; counts: sum.
            # a stop signal on any rank (a scheduler may signal one) stops every rank at this step
            t = torch.tensor([rec["loss"], rec["aux_loss"], rec["correct"], rec["scored"],
                              float(self._stop_requested or 0)], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            loss, aux, correct, scored, stop = t.tolist()
            if stop and not self._stop_requested:
                self._stop_requested = int(signal.SIGTERM)
            rec.update(loss=loss / self.world, aux_loss=aux / self.world, correct=int(round(correct)),
                       scored=int(round(scored)), acc=correct / max(1.0, scored))
        return rec
