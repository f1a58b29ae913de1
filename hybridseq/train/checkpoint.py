"""Atomic checkpoints, rotation and discovery.

Layout under a run's output folder::

    out_dir/checkpoints/step_00000300/    model.safetensors, config.yaml  (hs.save_pretrained)
                                          trainer_state.pt                (optimizer, scheduler,
                                                                           RNG, step, data position)
    out_dir/checkpoints/latest            text file: "step_00000300\\n", the newest complete one

Atomicity: a checkpoint is written into ``checkpoints/.tmp-step_XXXXXXXX-<pid>/``; every file is
fsynced, then the folder is renamed to its final name (one ``rename``: either the old state or the
whole new folder exists, never half of it), the parent folder is fsynced, and only then is
``latest`` replaced (temp file, fsync, ``os.replace``). A crash or an exception at any point
leaves the previous checkpoint and ``latest`` intact; stale ``.tmp-*`` folders are removed by the
next save. ``keep_last`` (> 0) keeps that many newest ``step_*`` folders, never the one ``latest``
names; ``keep_last <= 0`` keeps all.
"""
from __future__ import annotations

import io
import os
import re
import shutil
from typing import Callable

import torch

from ..errors import HybridSeqError

DS_DIR = "ds"  # DeepSpeed's own files inside a checkpoint folder (deepspeed_engine.py)

LATEST = "latest"
STATE_FILE = "trainer_state.pt"
_STEP_RE = re.compile(r"^step_(\d+)$")


def step_name(step: int) -> str:
    return f"step_{int(step):08d}"


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """fsync every file under ``path`` and the folders themselves."""
    for root, _, files in os.walk(path):
        for f in files:
            _fsync_path(os.path.join(root, f))
        _fsync_path(root)


def atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_path(os.path.dirname(os.path.abspath(path)))


def atomic_torch_save(obj, path: str) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """``[(step, path)]`` of the complete-looking ``step_*`` folders under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            out.append((int(m.group(1)), path))
    return sorted(out)


def latest_checkpoint(root: str) -> str | None:
    """The folder ``latest`` names; if that file is missing or stale, the newest complete folder."""
    marker = os.path.join(root, LATEST)
    if os.path.isfile(marker):
        with open(marker) as fh:
            name = fh.read().strip()
        path = os.path.join(root, name)
        if name and os.path.isfile(os.path.join(path, STATE_FILE)):
            return path
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def publish(tmp: str, final: str) -> None:
    """Make the fully written folder ``tmp`` appear as ``final`` in one rename (after fsync), so a
    reader sees the old folder or the new one, never a half-written one. An existing ``final``
    (re-saving the same step, e.g. after a resume) is swapped out and removed."""
    fsync_tree(tmp)
    if os.path.exists(final):
        old = os.path.join(os.path.dirname(final), f".tmp-old-{os.path.basename(final)}-{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_path(os.path.dirname(final) or ".")


def resolve_checkpoint(path: str) -> str:
    """A checkpoint folder: ``path`` itself when it holds ``config.yaml`` (a checkpoint or an
    exported model), else the latest checkpoint of the run folder ``path``."""
    if not os.path.isdir(path):
        raise HybridSeqError(f"no such run or checkpoint folder: {path}")
    if os.path.isfile(os.path.join(path, "config.yaml")) and any(
            os.path.exists(os.path.join(path, f)) for f in ("model.safetensors", DS_DIR)):
        return path
    for root in (os.path.join(path, "checkpoints"), path):
        found = latest_checkpoint(root)
        if found:
            return found
    raise HybridSeqError(f"{path}: neither a checkpoint folder nor a run folder with checkpoints")


def save_checkpoint(root: str, step: int, write: Callable[[str], None], keep_last: int = 2) -> str:
    """Write a checkpoint atomically: ``write(tmp_folder)`` fills a temporary folder, which then
    becomes ``root/step_XXXXXXXX``; ``latest`` is updated and old checkpoints rotated.
    Returns the final folder. If ``write`` raises, the temporary folder is removed and nothing
    else changes."""
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):  # leftovers of an earlier crash
        if name.startswith(".tmp-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    name = step_name(step)
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".tmp-{name}-{os.getpid()}")
    os.makedirs(tmp)
    try:
        write(tmp)
        publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_bytes(os.path.join(root, LATEST), (name + "\n").encode())
    rotate(root, keep_last)
    return final


def rotate(root: str, keep_last: int) -> None:
    if keep_last is None or keep_last <= 0:
        return
    current = latest_checkpoint(root)
    found = list_checkpoints(root)
    for _, path in found[: max(0, len(found) - keep_last)]:
        if current is None or os.path.abspath(path) != os.path.abspath(current):
            shutil.rmtree(path, ignore_errors=True)
