"""``hybridseq prepare``: raw text -> a folder of sharded token files that the ``text`` task packs.

    hybridseq prepare corpus/ extra.jsonl --out data/prepared --train-tokenizer 8192 --workers 4
    hybridseq prepare hf_saved/ --out data/p2 --tokenizer tokenizer.json --text-key content

    from hybridseq.data.prepare import prepare
    summary = prepare(["corpus/"], "data/prepared", train_tokenizer=8192)

Sources, read in the order given (a folder: recursively, sorted, hidden files skipped):
- a ``.jsonl`` file: one JSON object per line, the document's text under ``text_key`` (blank
  lines are skipped);
- a Hugging Face dataset folder written by ``save_to_disk`` (``dataset_dict.json``, or
  ``state.json`` + ``dataset_info.json``), with the ``datasets`` package (extra
  ``hf-datasets``): one document per row; of a ``DatasetDict``, its ``train`` split;
- any other file: one document, UTF-8 text.
Empty documents are skipped. The others are numbered 0, 1, 2, ... in reading order.

Every document is encoded (its text taken literally: a special token's spelling in the text is
plain text) and followed by the end-of-document token. The tokenizer is a ``tokenizers`` JSON
file (``tokenizer``), or a byte-level BPE trained on the training documents
(``train_tokenizer=VOCAB``, with ``<|endoftext|>`` as its special token).

Document ``i`` goes to the validation split when ``blake2b(f"{seed}:{i}") / 2**64 <
val_fraction``: the split depends on the index and the seed only, so a resumed run and any
number of workers agree on it.

The folder (format ``hybridseq-tokens``, version 1)::

    meta.json            format, version, vocab_size, eos_id, eos_token, dtype, the counts of
                         documents, tokens and bytes per split, every shard with its files' sizes
                         and sha256, the sources and the settings
    tokenizer.json       the tokenizer (copied or trained)
    train-00000.bin      token ids of whole documents, each ending with eos (uint16 when every id
                         fits, else uint32; little-endian, no header)
    train-00000.idx      uint64, documents + 1 offsets: document j is tokens [idx[j], idx[j+1])
    train-00000.nbytes   uint64, the UTF-8 byte count of each document's text (bits per byte)
    val-00000.bin ...    the same for the validation split

A shard holds whole documents. It is closed once it holds ``shard_tokens`` tokens or more, so
where shards end depends only on the documents and the settings.

Work and safety:
- Documents are read one at a time and tokenized in chunks. ``workers > 1`` tokenizes chunks in
  that many processes, at most ``2 * workers`` chunks in flight, and writes the results in
  reading order, so the output does not depend on the number of workers.
- Every file is written under a ``.tmp-`` name and renamed when complete. ``progress.json``
  records each finished shard (its files' sizes and sha256) and the settings. ``resume=True``
  keeps the recorded shards that still verify, redoes the rest (a partial shard is started
  again), and gives the same files as an uninterrupted run. ``meta.json`` is written last, and
  ``progress.json`` is then removed.
- Bad input raises ``HybridSeqError`` naming the file (and, in a ``.jsonl`` file, the line). The
  temporary files are removed; the finished shards stay, for ``resume``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from ..errors import HybridSeqError
from .tokenizer import TOKENIZER_NAME

FORMAT = "hybridseq-tokens"
VERSION = 1
META = "meta.json"
PROGRESS = "progress.json"
SPLITS = ("train", "val")
SHARD_FILES = (".bin", ".idx", ".nbytes")
TMP = ".tmp-"
_SHARD_FILE = re.compile(r"^(train|val)-\d{5,}\.(bin|idx|nbytes)$")
DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_VAL_FRACTION = 0.05
CHUNK_BYTES = 1 << 20      # text per tokenization chunk
CHUNK_DOCS = 1024          # documents per tokenization chunk


# ----------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------
def list_files(path: str) -> list[str]:
    """The files under ``path``, recursively, sorted, hidden files and folders skipped."""
    out = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".")]
    return out


def is_hf_dataset(path: str) -> bool:
    """Whether ``path`` is a folder written by ``datasets``' ``save_to_disk``."""
    return os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, "dataset_dict.json"))
        or (os.path.isfile(os.path.join(path, "state.json"))
            and os.path.isfile(os.path.join(path, "dataset_info.json"))))


def is_prepared(path: str) -> bool:
    """Whether ``path`` is a folder this module wrote (its ``meta.json`` names the format)."""
    meta = os.path.join(path, META)
    if not os.path.isfile(meta):
        return False
    try:
        with open(meta, encoding="utf-8") as fh:
            return json.load(fh).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


@dataclass
class Source:
    """One SRC argument as given, and what it is: ``hf`` (a saved dataset), ``folder`` (its
    ``files``), ``jsonl`` or ``text``."""

    given: str
    kind: str
    files: list[str]

    def describe(self) -> dict:
        out = {"path": self.given, "kind": "hf-dataset" if self.kind == "hf" else self.kind}
        if self.kind == "folder":
            out["files"] = len(self.files)
        return out


def resolve_sources(paths: Sequence[str]) -> list[Source]:
    if not paths:
        raise HybridSeqError("hybridseq prepare: give at least one SRC (a text file, a folder, a .jsonl "
                             "file or a saved Hugging Face dataset)")
    out = []
    for p in paths:
        path = os.path.expanduser(str(p))
        if not os.path.exists(path):
            raise HybridSeqError(f"{p}: no such file or folder")
        if is_hf_dataset(path):
            out.append(Source(str(p), "hf", [path]))
        elif os.path.isdir(path):
            out.append(Source(str(p), "folder", list_files(path)))
        else:
            out.append(Source(str(p), "jsonl" if path.endswith(".jsonl") else "text", [path]))
    return out


def _hf_dataset(path: str, text_key: str):
    """The dataset saved at ``path`` (a ``DatasetDict``: its ``train`` split), memory-mapped."""
    from ..extras import require

    require("datasets", f"{path}: reading a Hugging Face dataset")
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # whatever datasets raises for a damaged folder
        raise HybridSeqError(f"{path}: not a readable saved dataset ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise HybridSeqError(f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(ds)}); "
                                 "give the split's folder, e.g. " + os.path.join(path, next(iter(ds), "SPLIT")))
        ds = ds["train"]
    if text_key not in ds.column_names:
        raise HybridSeqError(f"{path}: no column {text_key!r} (columns: {', '.join(ds.column_names)}); "
                             "set --text-key")
    return ds


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise HybridSeqError(f"{where}: not UTF-8 text (invalid byte at offset {e.start})") from None


@dataclass
class Doc:
    """A document as read: ``index`` None for an empty one; ``text`` None when not asked for;
    ``consumed``: the source bytes it spans (the progress bar's unit)."""

    index: int | None
    text: str | None
    consumed: int


def iter_documents(sources: Sequence[Source], text_key: str = "text",
                   need: Callable[[int], bool] | None = None) -> Iterator[Doc]:
    """Every document of ``sources`` in reading order (module docstring). The text of document
    ``i`` is read only when ``need(i)`` (default: always); a skipped text file is not opened, so
    a text file is a document when it is not 0 bytes long."""
    counter = [0]  # the next document index, shared with the per-file readers

    def number() -> int:
        counter[0] += 1
        return counter[0] - 1

    for src in sources:
        if src.kind == "hf":
            yield from _iter_hf(src, text_key, need, number)
            continue
        for path in src.files:
            if path.endswith(".jsonl"):
                yield from _iter_jsonl(path, text_key, need, number)
                continue
            size = os.path.getsize(path)
            if size == 0:
                yield Doc(None, None, 0)
                continue
            i = number()
            if need is not None and not need(i):
                yield Doc(i, None, size)
                continue
            with open(path, "rb") as fh:
                yield Doc(i, _decode(fh.read(), path), size)


def _iter_hf(src: Source, text_key: str, need, number) -> Iterator[Doc]:
    """One document per row of a saved dataset (null and empty texts skipped)."""
    ds = _hf_dataset(src.files[0], text_key)
    row = 0
    for batch in ds.iter(batch_size=1024):
        for value in batch[text_key]:
            if value is not None and not isinstance(value, str):
                raise HybridSeqError(f"{src.given}: row {row}: {text_key!r} is a {type(value).__name__}, "
                                     "not a string")
            row += 1
            if not value:
                yield Doc(None, None, 0)
                continue
            i = number()
            yield Doc(i, value if need is None or need(i) else None, len(value))


def _iter_jsonl(path: str, text_key: str, need, number) -> Iterator[Doc]:
    """The documents of one ``.jsonl`` file (blank lines, null and empty texts skipped)."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                yield Doc(None, None, len(raw))
                continue
            try:
                obj = json.loads(raw)
            except UnicodeDecodeError as e:
                raise HybridSeqError(f"{where}: not UTF-8 text (invalid byte at offset {e.start})") from None
            except ValueError as e:
                raise HybridSeqError(f"{where}: not a JSON line ({str(e).splitlines()[0][:120]})") from None
            if not isinstance(obj, dict):
                raise HybridSeqError(f"{where}: a JSON {type(obj).__name__}, not an object with a "
                                     f"{text_key!r} key")
            if text_key not in obj:
                keys = ", ".join(list(obj)[:8]) or "none"
                raise HybridSeqError(f"{where}: no key {text_key!r} (keys: {keys}); set --text-key")
            text = obj[text_key]
            if text is not None and not isinstance(text, str):
                raise HybridSeqError(f"{where}: {text_key!r} is a JSON {type(text).__name__}, not a string")
            if not text:
                yield Doc(None, None, len(raw))
                continue
            i = number()
            yield Doc(i, text if need is None or need(i) else None, len(raw))


def total_bytes(sources: Sequence[Source]) -> int | None:
    """The source bytes the progress bar counts to (None with a Hugging Face dataset)."""
    if any(s.kind == "hf" for s in sources):
        return None
    return sum(os.path.getsize(f) for s in sources for f in s.files)


# ----------------------------------------------------------------------------------------------
# the split
# ----------------------------------------------------------------------------------------------
def is_val(index: int, seed: int, val_fraction: float) -> bool:
    """Whether document ``index`` belongs to the validation split (module docstring)."""
    if val_fraction <= 0:
        return False
    h = hashlib.blake2b(f"{int(seed)}:{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0 ** 64 < val_fraction


def split_of(index: int, seed: int, val_fraction: float) -> str:
    return "val" if is_val(index, seed, val_fraction) else "train"


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------
def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes) -> None:
    """``data`` at ``path``: written under a ``.tmp-`` name, fsynced, renamed."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f"{TMP}{name}-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(folder or ".")


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1) + "\n").encode("utf-8")


def verify_files(folder: str, files: dict) -> str | None:
    """None when every ``{name: {"bytes", "sha256"}}`` is in ``folder`` as recorded, else why not."""
    for name, rec in files.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != rec.get("bytes"):
            return f"{name} has {os.path.getsize(path)} bytes, {rec.get('bytes')} recorded"
        if sha256_file(path) != rec.get("sha256"):
            return f"{name} does not match its sha256"
    return None


def verify(folder: str) -> list[str]:
    """The problems of a prepared folder: files missing or not matching ``meta.json`` (empty
    when it is intact)."""
    meta = read_meta(folder)
    problems = []
    for shard in meta["shards"]:
        why = verify_files(folder, shard["files"])
        if why:
            problems.append(why)
    tok = meta.get("tokenizer") or {}
    if tok.get("sha256"):
        why = verify_files(folder, {TOKENIZER_NAME: {"bytes": tok.get("bytes"), "sha256": tok["sha256"]}})
        if why:
            problems.append(why)
    return problems


def read_meta(folder: str) -> dict:
    """``folder/meta.json``, checked to be this format and version."""
    path = os.path.join(folder, META)
    try:
        with open(path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except FileNotFoundError:
        raise HybridSeqError(f"{folder}: no {META} (not a prepared folder: run hybridseq prepare)") from None
    except (OSError, ValueError) as e:
        raise HybridSeqError(f"{path}: unreadable ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise HybridSeqError(f"{path}: not a {FORMAT} folder (format {found!r})")
    if meta.get("version") != VERSION:
        raise HybridSeqError(f"{path}: {FORMAT} version {meta.get('version')!r}; this hybridseq reads version "
                             f"{VERSION} (prepare the data again)")
    for key in ("vocab_size", "eos_id", "dtype", "shards", "splits"):
        if key not in meta:
            raise HybridSeqError(f"{path}: no key {key!r}")
    return meta


class ShardWriter:
    """The shards of one split, written one at a time under temporary names (module docstring)."""

    def __init__(self, folder: str, split: str, dtype, shard_tokens: int, first_shard: int,
                 on_close: Callable[[dict], None]):
        self.folder, self.split, self.dtype = folder, split, np.dtype(dtype)
        self.shard_tokens, self.number, self.on_close = int(shard_tokens), int(first_shard), on_close
        self.fh = None

    def _open(self, first_doc: int) -> None:
        self.name = f"{self.split}-{self.number:05d}"
        self.tmp = {ext: os.path.join(self.folder, f"{TMP}{self.name}{ext}") for ext in SHARD_FILES}
        self.fh = open(self.tmp[".bin"], "wb")
        self.hash = hashlib.sha256()
        self.offsets, self.nbytes = [0], []
        self.first_doc = first_doc

    def add(self, index: int, ids: np.ndarray, nbytes: int) -> None:
        if self.fh is None:
            self._open(index)
        data = ids.astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
        self.fh.write(data)
        self.hash.update(data)
        self.offsets.append(self.offsets[-1] + len(ids))
        self.nbytes.append(int(nbytes))
        self.last_doc = index
        if self.offsets[-1] >= self.shard_tokens:
            self.close()

    def close(self) -> None:
        """Finish the open shard (if any): fsync, rename into place, report its record."""
        if self.fh is None:
            return
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        self.fh = None
        files = {f"{self.name}.bin": {"bytes": os.path.getsize(self.tmp[".bin"]), "sha256": self.hash.hexdigest()}}
        for ext, values in ((".idx", self.offsets), (".nbytes", self.nbytes)):
            data = np.asarray(values, dtype="<u8").tobytes()
            with open(self.tmp[ext], "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            files[f"{self.name}{ext}"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for ext in SHARD_FILES:
            os.replace(self.tmp[ext], os.path.join(self.folder, f"{self.name}{ext}"))
        _fsync_dir(self.folder)
        self.on_close({"name": self.name, "split": self.split, "documents": len(self.nbytes),
                       "tokens": int(self.offsets[-1]), "bytes": int(sum(self.nbytes)),
                       "first_doc": int(self.first_doc), "end_doc": int(self.last_doc) + 1, "files": files})
        self.number += 1

    def discard(self) -> None:
        """Drop the open shard's temporary files (after an error)."""
        if self.fh is not None:
            self.fh.close()
            self.fh = None
            for path in self.tmp.values():
                if os.path.exists(path):
                    os.remove(path)


# ----------------------------------------------------------------------------------------------
# tokenization (in this process or in workers)
# ----------------------------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(tokenizer_json: str, eos_id: int, in_pool: bool) -> None:
    if in_pool:  # the pool gives the parallelism; tokenizers' own threads would compete with it
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from .tokenizer import tokenizer_from_json

    tok = tokenizer_from_json(tokenizer_json)
    tok.encode_special_tokens = True  # a document's text is literal, special spellings included
    _WORKER.update(tok=tok, eos=int(eos_id))


def _encode_chunk(chunk):
    """(indices, texts, consumed) -> (indices, token counts, ids (uint32, eos after each
    document), UTF-8 byte counts, consumed)."""
    indices, texts, consumed = chunk
    tok, eos = _WORKER["tok"], _WORKER["eos"]
    encs = tok.encode_batch(texts, add_special_tokens=False) if texts else []
    lens = np.fromiter((len(e.ids) + 1 for e in encs), dtype=np.int64, count=len(encs))
    ids = np.empty(int(lens.sum()), dtype=np.uint32)
    pos = 0
    for e in encs:
        n = len(e.ids)
        ids[pos:pos + n] = e.ids
        ids[pos + n] = eos
        pos += n + 1
    nbytes = [len(t.encode("utf-8")) for t in texts]
    return indices, lens, ids, nbytes, consumed


def _ordered_map(fn, items, workers: int, initargs: tuple):
    """``fn`` over ``items``, results in the order of ``items``: in this process, or in a pool of
    ``workers`` processes with at most ``2 * workers`` items in flight (bounded memory)."""
    if workers <= 1:
        _init_worker(*initargs, in_pool=False)
        for item in items:
            yield fn(item)
        return
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # no fork of a process whose tokenizer threads may be running
    with ctx.Pool(workers, initializer=_init_worker, initargs=(*initargs, True)) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _chunks(docs: Iterator[Doc], want: Callable[[int], bool]):
    """Group the documents ``want`` asks for into chunks (indices, texts, consumed bytes); the
    bytes of the others count toward the next chunk."""
    indices, texts, size, consumed = [], [], 0, 0
    for d in docs:
        consumed += d.consumed
        if d.index is None or d.text is None or not want(d.index):
            continue
        indices.append(d.index)
        texts.append(d.text)
        size += len(d.text)
        if size >= CHUNK_BYTES or len(texts) >= CHUNK_DOCS:
            yield indices, texts, consumed
            indices, texts, size, consumed = [], [], 0, 0
    yield indices, texts, consumed


# ----------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------
def _bar(total, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                file=sys.stderr, dynamic_ncols=True, leave=False)


def _check_out(out: str, sources: list[Source], resume: bool) -> str:
    """'fresh', 'resume' or 'done' for the output folder ``out`` (refusing what cannot be)."""
    absout = os.path.abspath(out)
    for s in sources:
        src = os.path.abspath(os.path.expanduser(s.given))
        if os.path.isdir(src) and os.path.commonpath([absout, src]) == src:
            raise HybridSeqError(f"--out {out}: inside the source folder {s.given} (it would read its own output)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise HybridSeqError(f"--out {out}: exists and is not a folder")
    if not os.path.isdir(out):
        return "fresh"
    has_meta = os.path.isfile(os.path.join(out, META))
    has_progress = os.path.isfile(os.path.join(out, PROGRESS))
    if has_progress:
        if not resume:
            raise HybridSeqError(f"{out}: holds an interrupted prepare ({PROGRESS}): continue it with --resume, "
                                 "or choose another --out")
        return "resume"
    if has_meta:
        if not resume:
            raise HybridSeqError(f"{out}: already holds a prepared dataset ({META}); choose another --out "
                                 "(or --resume to check it)")
        return "done"
    visible = [f for f in os.listdir(out) if not f.startswith(TMP)]
    if visible:
        raise HybridSeqError(f"{out}: not empty ({', '.join(sorted(visible)[:3])}...): choose a new or empty --out")
    return "fresh"


def _settings(sources, text_key, val_fraction, seed, shard_tokens, tokenizer, train_tokenizer, eos_token):
    """What must not change between an interrupted run and its ``--resume``."""
    return {"sources": [os.path.abspath(os.path.expanduser(s.given)) for s in sources], "text_key": text_key,
            "val_fraction": float(val_fraction), "seed": int(seed), "shard_tokens": int(shard_tokens),
            "tokenizer": os.path.abspath(tokenizer) if tokenizer else None,
            "train_tokenizer": int(train_tokenizer) if train_tokenizer else None, "eos_token": eos_token}


def prepare(sources: Sequence[str], out: str, *, tokenizer: str | None = None,
            train_tokenizer: int | None = None, text_key: str = "text",
            val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0, workers: int = 1,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, resume: bool = False, eos_token: str | None = None,
            progress: bool = True, on_shard: Callable[[dict], None] | None = None) -> dict:
    """Write the prepared folder ``out`` from ``sources`` (module docstring). Returns a summary:
    documents and tokens per split, the tokens written by this call, ``wall_s`` and
    ``tokens_per_s``. ``on_shard(record)`` runs after each finished shard is recorded."""
    from .tokenizer import find_eos, load_tokenizer, train_byte_bpe, vocab_size

    t0 = time.perf_counter()
    if (tokenizer is None) == (train_tokenizer is None):
        raise HybridSeqError("hybridseq prepare: give --tokenizer tokenizer.json or --train-tokenizer VOCAB "
                             "(one of them)")
    if not 0 <= float(val_fraction) < 1:
        raise HybridSeqError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    if int(shard_tokens) < 1:
        raise HybridSeqError(f"--shard-tokens {shard_tokens}: must be >= 1")
    if int(workers) < 1:
        raise HybridSeqError(f"--workers {workers}: must be >= 1")
    if not text_key:
        raise HybridSeqError("--text-key: must not be empty")
    srcs = resolve_sources(sources)
    state = _check_out(out, srcs, resume)
    settings = _settings(srcs, text_key, val_fraction, seed, shard_tokens, tokenizer, train_tokenizer, eos_token)
    if state == "done":
        meta = read_meta(out)
        if meta.get("settings") != settings:
            raise HybridSeqError(f"{out}: already prepared with other settings; choose another --out")
        problems = verify(out)
        if problems:
            raise HybridSeqError(f"{out}: the prepared files do not match {META}: {problems[0]} "
                                 "(prepare it again into a new --out)")
        return _summary(out, meta, written=0, t0=t0, complete=True)
    os.makedirs(out, exist_ok=True)
    for f in os.listdir(out):  # what an interrupted run left half-written
        if f.startswith(TMP):
            os.remove(os.path.join(out, f))

    # --- what an interrupted run finished ----------------------------------------------------
    record = {"format": FORMAT, "version": VERSION, "settings": settings, "tokenizer": None, "shards": []}
    if state == "resume":
        try:
            with open(os.path.join(out, PROGRESS), encoding="utf-8") as fh:
                old = json.load(fh)
        except (OSError, ValueError):
            old = {}
        if not isinstance(old, dict) or old.get("settings") != settings:
            before = old.get("settings") if isinstance(old, dict) else None
            diff = [k for k in settings if (before or {}).get(k) != settings[k]]
            raise HybridSeqError(f"{out}: --resume with other settings than the interrupted run "
                                 f"({', '.join(diff) or 'format'} differ): use the same arguments, or another --out")
        record.update(tokenizer=old.get("tokenizer"), shards=list(old.get("shards") or []))
    else:  # from here on the folder is an interrupted prepare until meta.json is written
        atomic_write(os.path.join(out, PROGRESS), _json_bytes(record))

    # --- the tokenizer (an interrupted run's is kept: its shards were written with it) -----------
    tok_path = os.path.join(out, TOKENIZER_NAME)
    if record["tokenizer"] and verify_files(out, {TOKENIZER_NAME: record["tokenizer"]}) is None:
        tok = load_tokenizer(tok_path)
    else:
        record["shards"] = []  # a new tokenizer: nothing written with another one is kept
        if tokenizer is not None:
            tok = load_tokenizer(tokenizer)
            with open(tokenizer, "rb") as fh:
                atomic_write(tok_path, fh.read())
        else:
            def train_texts():
                bar = _bar(total_bytes(srcs), "training tokenizer", progress)
                try:
                    for d in iter_documents(srcs, text_key, lambda i: not is_val(i, seed, val_fraction)):
                        bar.update(d.consumed)
                        if d.text is not None:
                            yield d.text
                finally:
                    bar.close()

            tok = train_byte_bpe(train_texts(), int(train_tokenizer))
            atomic_write(tok_path, tok.to_str().encode("utf-8"))
        record["tokenizer"] = {"bytes": os.path.getsize(tok_path), "sha256": sha256_file(tok_path)}
    eos_id, eos = find_eos(tok, tokenizer or tok_path, eos_token)
    vocab = vocab_size(tok)
    dtype = "uint16" if vocab <= 1 << 16 else "uint32"

    # --- recorded shards that still verify are kept; every other shard file is redone --------------
    kept = []
    for split in SPLITS:  # each split's shards up to the first that does not verify
        for shard in [s for s in record["shards"] if s.get("split") == split]:
            if verify_files(out, shard["files"]) is not None:
                break
            kept.append(shard)
    record["shards"] = kept
    names = {name for s in kept for name in s["files"]}
    for f in os.listdir(out):
        if _SHARD_FILE.match(f) and f not in names:
            os.remove(os.path.join(out, f))
    atomic_write(os.path.join(out, PROGRESS), _json_bytes(record))

    # --- the shards ---------------------------------------------------------------------------
    done_upto, first_shard = {}, {}
    for split in SPLITS:
        mine = [s for s in record["shards"] if s["split"] == split]
        done_upto[split] = mine[-1]["end_doc"] if mine else 0
        first_shard[split] = len(mine)

    def finished(shard: dict) -> None:
        record["shards"].append(shard)
        atomic_write(os.path.join(out, PROGRESS), _json_bytes(record))
        if on_shard is not None:
            on_shard(shard)

    writers = {s: ShardWriter(out, s, dtype, shard_tokens, first_shard[s], finished) for s in SPLITS}

    def want(i: int) -> bool:  # not yet in a finished shard of its split
        return i >= done_upto[split_of(i, seed, val_fraction)]

    written = 0
    bar = _bar(total_bytes(srcs), "tokenizing", progress)
    try:
        chunks = _chunks(iter_documents(srcs, text_key, want), want)
        for indices, lens, ids, nbytes, consumed in _ordered_map(_encode_chunk, chunks, int(workers),
                                                                 (tok.to_str(), eos_id)):
            pos = 0
            for i, n, b in zip(indices, lens.tolist(), nbytes):
                writers[split_of(i, seed, val_fraction)].add(i, ids[pos:pos + n], b)
                pos += n
            written += int(ids.size)
            bar.update(consumed)
            bar.set_postfix(tokens=f"{written:,}", refresh=False)
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.discard()
        raise
    finally:
        bar.close()

    # --- meta.json ------------------------------------------------------------------------------
    shards = sorted(record["shards"], key=lambda s: (SPLITS.index(s["split"]), s["name"]))
    splits = {s: {"documents": sum(x["documents"] for x in shards if x["split"] == s),
                  "tokens": sum(x["tokens"] for x in shards if x["split"] == s),
                  "bytes": sum(x["bytes"] for x in shards if x["split"] == s),
                  "shards": [x["name"] for x in shards if x["split"] == s]} for s in SPLITS}
    if not splits["train"]["documents"] and not splits["val"]["documents"]:
        if state == "fresh":  # nothing worth resuming: leave no folder behind
            shutil.rmtree(out, ignore_errors=True)
        raise HybridSeqError(f"{', '.join(sources)}: no documents (every file or line is empty)")
    from .. import __version__

    meta = {"format": FORMAT, "version": VERSION, "hybridseq_version": __version__,
            "vocab_size": vocab, "eos_id": eos_id, "eos_token": eos, "dtype": dtype,
            "documents": splits["train"]["documents"] + splits["val"]["documents"],
            "tokens": splits["train"]["tokens"] + splits["val"]["tokens"], "splits": splits,
            "tokenizer": {"file": TOKENIZER_NAME, **record["tokenizer"], "source": tokenizer if tokenizer
                          else f"byte-level BPE trained here (vocab {train_tokenizer})"},
            "sources": [s.describe() for s in srcs], "settings": settings, "shards": shards}
    atomic_write(os.path.join(out, META), _json_bytes(meta))
    os.remove(os.path.join(out, PROGRESS))
    _fsync_dir(out)
    return _summary(out, meta, written=written, t0=t0, complete=False)


def _summary(out: str, meta: dict, written: int, t0: float, complete: bool) -> dict:
    wall = time.perf_counter() - t0
    return {"out": out, "documents": meta["documents"], "tokens": meta["tokens"],
            "train_tokens": meta["splits"]["train"]["tokens"], "val_tokens": meta["splits"]["val"]["tokens"],
            "train_documents": meta["splits"]["train"]["documents"],
            "val_documents": meta["splits"]["val"]["documents"], "shards": len(meta["shards"]),
            "vocab_size": meta["vocab_size"], "dtype": meta["dtype"], "written_tokens": written,
            "wall_s": wall, "tokens_per_s": written / max(wall, 1e-9), "already_complete": complete}


# ----------------------------------------------------------------------------------------------
# command line (hybridseq prepare)
# ----------------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("sources", nargs="+", metavar="SRC",
                   help="text files, folders, .jsonl files, saved Hugging Face datasets")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write (new or empty)")
    p.add_argument("--tokenizer", default=None, metavar="tokenizer.json", help="a Hugging Face tokenizers file")
    p.add_argument("--train-tokenizer", type=int, default=None, metavar="VOCAB",
                   help="train a byte-level BPE of this vocabulary on the training documents")
    p.add_argument("--text-key", default="text", metavar="KEY", help="the text's key in .jsonl lines and dataset "
                   "columns (default: text)")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION, metavar="F",
                   help=f"share of documents held out for validation (default {DEFAULT_VAL_FRACTION})")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split (default 0)")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="tokenizing processes (default 1)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                   help=f"tokens per shard (a shard holds whole documents; default {DEFAULT_SHARD_TOKENS:,})")
    p.add_argument("--eos-token", default=None, metavar="TOKEN",
                   help="the end-of-document token (default: <|endoftext|>, </s>, ... whichever the tokenizer has)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted prepare into the same --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args) -> int:
    s = prepare(args.sources, args.out, tokenizer=args.tokenizer, train_tokenizer=args.train_tokenizer,
                text_key=args.text_key, val_fraction=args.val_fraction, seed=args.seed, workers=args.workers,
                shard_tokens=args.shard_tokens, resume=args.resume, eos_token=args.eos_token,
                progress=not args.no_progress)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    if s["already_complete"]:
        print(f"{s['out']}: already complete and verified ({s['documents']:,} documents, {s['tokens']:,} tokens)")
        return 0
    print(f"{s['out']}: {s['documents']:,} documents, {s['tokens']:,} tokens (train {s['train_tokens']:,} in "
          f"{s['train_documents']:,} documents, val {s['val_tokens']:,} in {s['val_documents']:,}), "
          f"{s['shards']} shards of {s['dtype']}, vocabulary {s['vocab_size']:,}")
    print(f"tokenized {s['written_tokens']:,} tokens in {s['wall_s']:.1f} s: {s['tokens_per_s']:,.0f} tokens/s")
    return 0


__all__ = ["FORMAT", "META", "VERSION", "add_arguments", "is_prepared", "is_val", "iter_documents",
           "list_files", "prepare", "read_meta", "run", "split_of", "verify"]
