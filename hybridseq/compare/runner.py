"""Run several layouts on equal terms, each seed in its own folder, reusing finished runs.

Equal terms: every layout trains with ONE ``train`` section, the first loadable layout's (after
``--task`` and the command-line overrides), so the task, its data order (the task generator is
seeded with ``train.seed``), the seeds, the steps, the batch (hence the token budget) and the
optimizer settings agree; only ``model``/``blocks``/``layout`` differ (and ``model.d_model``
under ``--match``). Seed ``k`` (0-based) trains with ``train.seed = base_seed + k`` for every
layout, so layouts see the same batches in the same order.

Folders::

    DIR/runs/<layout label>/seed<k>/     config.yaml, metrics.jsonl, checkpoints/ (the trainer)
                                         done.json: every measured number of this run, written
                                         atomically LAST; error.txt when the run failed
    DIR/report.md, report.json, *.png    (``report.py``)

A rerun reads ``done.json`` and skips runs whose ``key`` (a hash of the run's resolved config, its
seed and the measurement settings) still matches; a run folder without ``done.json`` (an
interrupted run) resumes from its latest checkpoint; a ``done.json`` with another key (the config
or the settings changed) is discarded and the run redone. A layout that fails to load, to match
or to train is recorded with its message; the other layouts still run and are reported.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable


from ..config import load_config
from ..errors import ConfigError, HybridSeqError
from . import measure
from .match import MatchError, MatchResult, match_layouts

RUN_FORMAT = 1
DONE = "done.json"


@dataclass
class CompareOptions:
    """Settings of one comparison (the CLI fills these from its arguments)."""

    out: str
    task: str | None = None
    seeds: int = 1
    base_seed: int | None = None          # None: the reference layout's train.seed
    match: str = "none"
    eval_lengths: str = "1x,2x,4x"        # "Nx" = N times the task's training seq_len, or lengths
    sweep_lengths: str | None = None      # throughput/memory sweep; None: the evaluation lengths
    eval_seqs: int | None = None          # sequences per evaluation length; None: eval_batches * batch
    eval_budget_s: float = 0.0            # per run: stop evaluating longer lengths after this (0: no limit)
    decode_tokens: int = 32
    decode_batch: int = 4
    sweep_iters: int = 2
    overrides: list[str] = field(default_factory=list)
    progress: bool = True                 # the trainer's progress bar (the phase lines always print)

    def measure_settings(self) -> dict:
        return {"eval_lengths": self.eval_lengths, "sweep_lengths": self.sweep_lengths,
                "eval_seqs": self.eval_seqs, "eval_budget_s": self.eval_budget_s,
                "decode_tokens": self.decode_tokens, "decode_batch": self.decode_batch,
                "sweep_iters": self.sweep_iters}


@dataclass
class Entry:
    """One layout of the comparison."""

    path: str
    label: str = ""
    cfg: Any = None                       # the loaded config it trains with (None if it failed to load)
    match: MatchResult | None = None
    error: str | None = None              # why it failed (load, match, train or measure)
    failed_at: str | None = None          # "load" | "match" | "run"
    runs: list[dict] = field(default_factory=list)   # the done.json records of finished seeds

    @property
    def ok(self) -> bool:
        return self.error is None


def _log(msg: str) -> None:
    print(f"[compare] {msg}", file=sys.stderr, flush=True)


def _container(cfg) -> dict:
    return cfg if isinstance(cfg, dict) else cfg.to_dict()


def _label(name: str, taken: set) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(name or "layout")).strip("-.") or "layout"
    label, i = base, 2
    while label in taken:
        label, i = f"{base}-{i}", i + 1
    taken.add(label)
    return label


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file in the same folder and ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=1, default=_json_default, allow_nan=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


# ----------------------------------------------------------------------------------------------
# preparing the layouts
# ----------------------------------------------------------------------------------------------
def _split_overrides(overrides: list[str]) -> list[tuple[str, str | None]]:
    """-> [(override text, block symbol it needs or None)]."""
    out = []
    for text in overrides:
        if "=" not in text:
            raise ConfigError(f"override {text!r} is not key=value (e.g. train.steps=200)")
        key = text.split("=", 1)[0].strip()
        parts = key.split(".")
        out.append((text, parts[1] if parts[0] == "blocks" and len(parts) > 2 else None))
    return out


def load_entries(paths: list[str], opts: CompareOptions, log: Callable = _log) -> list[Entry]:
    """Load every layout with the shared overrides, give them the reference's train section, and
    rescale them under ``--match``. Failures are recorded on the entries, not raised, except when
    no layout loads at all, or an override names a block symbol no layout has (raised)."""
    overrides = ([f"train.task={opts.task}"] if opts.task else []) + list(opts.overrides or [])
    items = _split_overrides(overrides)
    # train.* overrides shape the ONE train section every layout uses: they go to the reference
    # only (a layout's own train section, e.g. another task, is replaced and never validated
    # against them); the others (model, blocks, layout) go to every layout
    train_items = [t for t, _ in items if t.split("=", 1)[0].strip().split(".")[0] == "train"]
    items = [(t, sym) for t, sym in items if t not in train_items]
    entries, taken, used_symbols = [], set(), set()
    for path in paths:
        e = Entry(path=str(path))
        try:
            bare = load_config(path)
            symbols = set(bare.blocks.keys())
            mine = [t for t, sym in items if sym is None or sym in symbols]
            used_symbols |= {sym for _, sym in items if sym in symbols}
            e.cfg = load_config(path, overrides=mine) if mine else bare
            e.label = _label(e.cfg.get("name") or os.path.splitext(os.path.basename(path))[0], taken)
        except HybridSeqError as err:
            e.error, e.failed_at = str(err).strip(), "load"
            e.label = _label(os.path.splitext(os.path.basename(str(path)))[0], taken)
        entries.append(e)
    unused = [t for t, sym in items if sym is not None and sym not in used_symbols]
    loaded = [e for e in entries if e.ok]
    if unused and loaded:
        raise ConfigError(f"override {unused[0]!r} names a block symbol that none of the layouts has")
    if not loaded:  # nothing to compare: one error naming every layout's problem
        raise HybridSeqError("no layout could be loaded:\n" + "\n".join(f"  {e.path}: {e.error}" for e in entries))
    ref = loaded[0]
    if train_items:
        try:
            ref.cfg = load_config(ref.path, overrides=[t for t, sym in _split_overrides(overrides)
                                                        if t in train_items or (sym is None or sym in ref.cfg.blocks)])
        except HybridSeqError as err:  # a train override is wrong for every layout: a usage error
            raise HybridSeqError(f"{err} (train settings come from the first layout, {ref.path})") from None
    common_train = _container(ref.cfg)["train"]
    for e in loaded[1:]:
        c = _container(e.cfg)
        c["train"] = common_train
        e.cfg = load_config(c)
    ok = [e for e in entries if e.ok]
    if opts.match == "none":
        results = match_layouts([e.cfg for e in ok], "none")
    else:
        results = [match_layouts([ref.cfg], opts.match)[0]]
        for e in ok[1:]:
            try:
                results.append(match_layouts([ref.cfg, e.cfg], opts.match)[1])
            except MatchError as err:
                results.append(err)
    for e, r in zip(ok, results):
        if isinstance(r, MatchError):
            e.error, e.failed_at = str(r), "match"
            continue
        e.match = r
        if r.overrides:
            try:
                e.cfg = load_config(_container(e.cfg), overrides=r.overrides)
            except HybridSeqError as err:
                e.error, e.failed_at = f"after --match {opts.match} (d_model={r.d_model}): {err}", "match"
                continue
            log(f"{e.label}: d_model {r.d_model_original} -> {r.d_model} ({opts.match} "
                f"{r.count_original:,} -> {r.count:,}, reference {r.target:,}, {r.rel_diff:+.1%})")
    return entries


# ----------------------------------------------------------------------------------------------
# one run
# ----------------------------------------------------------------------------------------------
def run_key(cfg_dict: dict, seed: int, settings: dict) -> str:
    payload = {"format": RUN_FORMAT, "config": cfg_dict, "seed": seed, "measure": settings}
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def read_done(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, DONE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None


def run_one(entry: Entry, seed_index: int, seed: int, run_dir: str, opts: CompareOptions,
            log: Callable = _log) -> dict:
    """Train and measure one (layout, seed); returns its done.json record (reused if current)."""
    import torch

    from ..data import task_spec
    from ..train import Trainer
    from ..train.engine import resolve_device
    from ..train.metrics import read_metrics

    c = _container(entry.cfg)
    c["train"]["seed"] = int(seed)
    c["train"]["out_dir"] = None
    first = seed_index == 0
    settings = {**opts.measure_settings(), "sweep": first}
    key = run_key(c, seed, settings)
    done = read_done(run_dir)
    if done is not None:
        if done.get("key") == key:
            log(f"{entry.label} seed {seed}: finished earlier, reusing {os.path.join(run_dir, DONE)}")
            return done
        log(f"{entry.label} seed {seed}: config or settings changed since the finished run: redoing it")
        shutil.rmtree(run_dir)
    cfg = load_config(c)
    tc = c["train"]
    task_cfg = dict(tc["task"])
    base_len = int(task_spec(task_cfg)["seq_len"])  # the task's seq_len key ("Nx" lengths scale it)
    lengths = measure.parse_lengths(opts.eval_lengths, base_len)
    sweep_lengths = measure.parse_lengths(opts.sweep_lengths, base_len) if opts.sweep_lengths else None
    device = resolve_device(tc.get("device", "auto"))
    resume = os.path.isdir(os.path.join(run_dir, "checkpoints")) and bool(os.listdir(os.path.join(run_dir, "checkpoints")))
    log(f"{entry.label} seed {seed}: training {tc['steps']} steps x {tc['batch_size'] * tc['grad_accum']} "
        f"sequences on {device}" + (" (resuming)" if resume else ""))
    from .. import api, kernels  # noqa: F401  (imported outside the memory measurement)

    t0 = time.time()
    with measure.peak_memory(device) as peak:
        trainer = Trainer(cfg, out_dir=run_dir, resume=resume, progress=opts.progress)
        summary = trainer.fit()
    train_wall = time.time() - t0
    record: dict[str, Any] = {"format": RUN_FORMAT, "key": key, "label": entry.label, "layout_file": entry.path,
                              "seed": int(seed), "run_dir": run_dir, "device": str(trainer.device),
                              "device_name": (torch.cuda.get_device_name(trainer.device)
                                              if trainer.device.type == "cuda" else "cpu"),
                              "precision": summary.get("precision"), "steps": summary.get("steps"),
                              "train_wall_s": train_wall, "peak_memory_bytes": int(peak.bytes),
                              "memory_kind": peak.kind, "resumed": bool(resume)}
    seq_tokens = int(trainer.task.seq_len)
    record["train_seq_len"] = seq_tokens
    record["task_seq_len"] = base_len
    record["tokens_seen"] = int(tc["steps"]) * int(tc["batch_size"]) * int(tc["grad_accum"]) * seq_tokens
    metrics = measure.summarize_metrics(read_metrics(os.path.join(run_dir, "metrics.jsonl")))
    if metrics.get("train_tokens_per_s") is None and summary.get("tokens_per_s"):
        metrics["train_tokens_per_s"] = float(summary["tokens_per_s"])
    record.update(metrics)

    log(f"{entry.label} seed {seed}: evaluating at lengths {', '.join(map(str, lengths))}")
    n_seqs = int(opts.eval_seqs or int(tc["eval_batches"]) * int(tc["batch_size"]))
    record["lengths"] = measure.eval_lengths(trainer, task_cfg, lengths, seed=seed, n_seqs=n_seqs,
                                             tokens_per_batch=4 * int(tc["batch_size"]) * seq_tokens,
                                             budget_s=opts.eval_budget_s, log=log)
    log(f"{entry.label} seed {seed}: decoding {opts.decode_tokens} tokens x {opts.decode_batch} sequences")
    vocab = int(trainer.task.vocab_size)
    record.update(measure.decode_speed(trainer.model, vocab, trainer.device, batch=opts.decode_batch,
                                       new_tokens=opts.decode_tokens, autocast=trainer.engine.autocast,
                                       seed=seed))
    if first:
        sl = sweep_lengths or lengths
        log(f"{entry.label}: throughput and memory at lengths {', '.join(map(str, sl))}")
        record["sweep"] = measure.seqlen_sweep(trainer.model, vocab, trainer.device, sl,
                                               int(tc["batch_size"]) * seq_tokens, iters=opts.sweep_iters,
                                               autocast=trainer.engine.autocast, log=log)
    record.update(measure.static_costs(cfg, seq_len=seq_tokens, lengths=sweep_lengths or lengths))
    record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    write_json_atomic(os.path.join(run_dir, DONE), record)
    return record


def run_entries(entries: list[Entry], opts: CompareOptions, log: Callable = _log) -> None:
    """Run every (layout, seed) that is not finished yet; failures are recorded on the entry."""
    ok = [e for e in entries if e.ok]
    if not ok:
        return
    base = int(opts.base_seed if opts.base_seed is not None else ok[0].cfg.train.seed)
    total, n = len(ok) * opts.seeds, 0
    for e in ok:
        for k in range(opts.seeds):
            n += 1
            seed = base + k
            run_dir = os.path.join(opts.out, "runs", e.label, f"seed{seed}")
            log(f"run {n}/{total}: {e.label} seed {seed} -> {run_dir}")
            try:
                e.runs.append(run_one(e, k, seed, run_dir, opts, log=log))
            except KeyboardInterrupt:
                raise
            except Exception as err:  # a bad layout must not lose the others' results
                msg = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
                if not isinstance(err, HybridSeqError):
                    msg = f"{msg} (traceback in {os.path.join(run_dir, 'error.txt')})"
                e.error, e.failed_at = (str(err).strip() if isinstance(err, HybridSeqError) else msg), "run"
                os.makedirs(run_dir, exist_ok=True)
                with open(os.path.join(run_dir, "error.txt"), "w") as fh:
                    fh.write(traceback.format_exc())
                log(f"{e.label} seed {seed}: FAILED: {e.error}")
                break


__all__ = ["CompareOptions", "Entry", "load_entries", "read_done", "run_entries", "run_key", "run_one",
           "write_json_atomic"]
