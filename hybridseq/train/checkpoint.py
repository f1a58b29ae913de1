"""Atomic checkpoints, rotation and discovery.

Layout under a run's output folder::

    out_dir/checkpoints/step_00000300/    model.safetensors, config.yaml  (hs.save_pretrained)
                                          trainer_state.json + .safetensors (optimizer, scheduler,
                                            RNG, step, data position: ``state_io``, no pickle)
                                          manifest.json   every file's size and sha256, written last
    out_dir/checkpoints/latest            text file: "step_00000300\\n", the newest complete one

Atomicity: a checkpoint is written into ``checkpoints/.tmp-step_XXXXXXXX-<pid>/``; every file is
fsynced, the manifest is written last, then the folder is renamed to its final name (one
``rename``: either the old state or the whole new folder exists, never half of it), the parent
folder is fsynced, and only then is ``latest`` replaced (temp file, fsync, ``os.replace``).
Rotation renames a folder to ``.tmp-del-*`` before deleting it. So a crash at any point leaves the
previous checkpoints and ``latest`` intact, and what it leaves half-done has a ``.tmp-`` name,
removed by the next save or resume. ``keep_last`` (> 0) keeps that many newest ``step_*``
folders, never the one ``latest`` names; ``keep_last <= 0`` keeps all.

Resume and load take the newest checkpoint that *verifies* (every file of its manifest present
with its size and checksum; ``find_checkpoint``): a truncated or damaged newest one is skipped,
and the caller says which and why.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from typing import Callable

from ..errors import HybridSeqError

DS_DIR = "ds"  # DeepSpeed's own files inside a checkpoint folder (deepspeed_engine.py)

LATEST = "latest"
STATE = "trainer_state"          # trainer_state.json + trainer_state.safetensors (state_io)
MANIFEST = "manifest.json"
LEGACY_STATE_FILE = "trainer_state.pt"  # earlier releases: a pickle, never loaded
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


# --- manifests ---------------------------------------------------------------------------------
def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: str) -> None:
    """``folder/manifest.json``: the size and sha256 of every file below ``folder`` (written last,
    so its presence means the folder is complete)."""
    files = {}
    for root, _, names in os.walk(folder):
        for n in sorted(names):
            path = os.path.join(root, n)
            rel = os.path.relpath(path, folder)
            if rel == MANIFEST:
                continue
            files[rel] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
    atomic_write_bytes(os.path.join(folder, MANIFEST),
                       json.dumps({"format": "hybridseq-checkpoint", "files": files}, indent=1).encode())


def verify(folder: str, checksums: bool = True) -> str | None:
    """None when ``folder`` holds every file of its manifest with the recorded size (and, with
    ``checksums``, sha256); else the reason it does not."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(folder, LEGACY_STATE_FILE)):
            return ("written by an earlier hybridseq whose trainer state is a pickle, which is never "
                    "loaded (start from its weights with --init-from)")
        return "no manifest.json (an interrupted save)"
    try:
        with open(path, encoding="utf-8") as fh:
            files = json.load(fh)["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "manifest.json is unreadable"
    for rel, meta in files.items():
        f = os.path.join(folder, rel)
        if not os.path.isfile(f):
            return f"{rel} is missing"
        size = os.path.getsize(f)
        if size != meta.get("bytes"):
            return f"{rel} has {size} bytes, the manifest says {meta.get('bytes')} (truncated or changed)"
        if checksums and _sha256(f) != meta.get("sha256"):
            return f"{rel} does not match its checksum (changed or damaged)"
    return None


# --- discovery -----------------------------------------------------------------------------------
def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """``[(step, path)]`` of the ``step_*`` folders under ``root``, oldest first (complete or not)."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        path = os.path.join(root, name)
        if m and os.path.isdir(path):
            out.append((int(m.group(1)), path))
    return sorted(out)


def clean_leftovers(root: str) -> list[str]:
    """Remove what interrupted saves and rotations left (``.tmp-*`` entries); returns their names."""
    removed = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(".tmp-"):
                path = os.path.join(root, name)
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
                removed.append(name)
    return removed


def find_checkpoint(root: str, checksums: bool = True) -> tuple[str | None, list[tuple[str, str]]]:
    """(the newest checkpoint folder under ``root`` that verifies, or None; [(skipped folder,
    why)] for the newer ones that did not)."""
    skipped = []
    for _, path in reversed(list_checkpoints(root)):
        why = verify(path, checksums)
        if why is None:
            return path, skipped
        skipped.append((path, why))
    return None, skipped


def latest_checkpoint(root: str) -> str | None:
    """The newest checkpoint under ``root`` that is complete (its manifest present, the sizes
    right; checksums are checked by ``find_checkpoint``)."""
    return find_checkpoint(root, checksums=False)[0]


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
        if os.path.isfile(os.path.join(path, MANIFEST)):
            why = verify(path)
            if why is not None:
                raise HybridSeqError(f"{path}: damaged checkpoint: {why}")
        return path
    skipped = []
    for root in (os.path.join(path, "checkpoints"), path):
        found, skipped_here = find_checkpoint(root)
        skipped += skipped_here
        if found:
            for folder, why in skipped:
                print(f"skipped {folder}: {why}", file=sys.stderr)
            return found
    extra = "; ".join(f"{os.path.basename(f)}: {why}" for f, why in skipped[:3])
    raise HybridSeqError(f"{path}: neither a checkpoint folder nor a run folder with a complete checkpoint"
                         + (f" ({extra})" if extra else ""))


def save_checkpoint(root: str, step: int, write: Callable[[str], None], keep_last: int = 2) -> str:
    """Write a checkpoint atomically: ``write(tmp_folder)`` fills a temporary folder, which then
    becomes ``root/step_XXXXXXXX``; ``latest`` is updated and old checkpoints rotated.
    Returns the final folder. If ``write`` raises, the temporary folder is removed and nothing
    else changes."""
    os.makedirs(root, exist_ok=True)
    clean_leftovers(root)
    name = step_name(step)
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".tmp-{name}-{os.getpid()}")
    os.makedirs(tmp)
    try:
        write(tmp)
        write_manifest(tmp)
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
            # renamed first: a kill during the deletion leaves a .tmp- folder, never half a step_
            doomed = os.path.join(root, f".tmp-del-{os.path.basename(path)}-{os.getpid()}")
            os.rename(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
