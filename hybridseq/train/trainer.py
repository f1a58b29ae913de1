"""The training loop: one process (CPU or one GPU) through an *engine*; DeepSpeed plugs in later.

    from hybridseq.train import train
    summary = train(cfg, out_dir="runs/x")            # -> {"final_loss", "eval_acc", ...}
    summary = train(cfg, out_dir="runs/x", resume=True)

Engine interface (implemented by ``engine.LocalEngine``; a DeepSpeed engine in
``deepspeed_engine.py`` implements the same and is passed as ``engine_factory``)::

    forward(inputs, **kw) -> ModelOutput  backward(loss)      step() -> {"lr", "grad_norm"}
    state_dict() / load_state_dict()    autocast()            lr, model, device, is_main
    save_checkpoint(root, step, client_state, keep_last) -> folder
    load_checkpoint(folder) -> client_state

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` sequences each (per process):
for each, ``loss = (CE(logits, targets) + aux_loss) / grad_accum`` is back-propagated; then
``engine.step()`` clips, steps AdamW and the warmup+cosine schedule. Only the cross-entropy on
scored positions is logged as ``loss``; the MoE auxiliary loss is logged as ``aux_loss``.

A batch that carries ``doc_ids`` (packed documents, ``data.base.Batch``) is run as
``forward(inputs, doc_ids=doc_ids)``, in training and in evaluation. Evaluation reports
``eval_loss`` and ``eval_acc``; for language modelling also ``eval_ppl`` (exp of the loss) and,
when the batches carry ``n_bytes``, ``eval_bpb``: the summed loss in nats over
``ln 2 * bytes``.

Output folder (``train.out_dir``, default ``runs/<name>-<YYYYmmdd-HHMMSS>``): ``config.yaml``
(the resolved config; for token data its ``train.task.tokenizer`` says what the ids are),
``tokenizer.json`` (when the task has one: a prepared folder's, also saved in every checkpoint),
``metrics.jsonl`` (see ``metrics.py``) and ``checkpoints/`` (see ``checkpoint.py``). A
checkpoint's ``trainer_state.pt`` holds, beside the engine state, the *client state*: step,
tokens seen, the task's data position (its generator state), the RNG states
of torch/CUDA/random/numpy and the running log accumulators, so that a resumed run reproduces
the losses of an uninterrupted one exactly on CPU.

Ctrl-C (SIGINT) asks the loop to stop at the end of the current step: it saves a checkpoint and
raises ``TrainingInterrupted`` (a ``KeyboardInterrupt``); a second Ctrl-C aborts at once, and the
previous checkpoint stays intact (writes are atomic).
"""
from __future__ import annotations

import math
import os
import random
import signal
import sys
import threading
import time
from datetime import datetime
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..config.schema import TRAIN_DEFAULTS
from ..data import IGNORE, make_task, score
from ..errors import ConfigError, HybridSeqError
from . import checkpoint as ckpt
from .engine import LocalEngine, resolve_device
from .metrics import MetricsWriter, Progress, TensorBoardWriter
from .perf import moe_load, peak_flops, perf_fields


class NonFiniteError(HybridSeqError):
    """A non-finite loss or gradient stopped training (``train.on_nan``)."""


@torch.no_grad()
def _first_nonfinite_param(model) -> str | None:
    """The first parameter holding a NaN or an inf (one host synchronisation for all of them)."""
    params = [(n, p) for n, p in model.named_parameters() if p.numel()]
    if not params:
        return None
    flags = torch.stack([torch.isfinite(p).all() for _, p in params])
    if bool(flags.all()):
        return None
    return params[int((~flags).nonzero()[0])][0]


def _param_place(name: str | None) -> str | None:
    """'layers.3.block.in_proj.weight' -> 'layer 3 (block.in_proj.weight)'."""
    if not name:
        return None
    parts = name.split(".")
    if parts[0] == "layers" and len(parts) > 2 and parts[1].isdigit():
        return f"layer {parts[1]} ({'.'.join(parts[2:])})"
    return name


@torch.no_grad()
def first_nonfinite_output(model, inputs, engine) -> str | None:
    """Run ``inputs`` through ``model`` again with hooks on its sublayers: the first sublayer whose
    output holds a NaN or an inf ('layer 3 (mamba, symbol M)'), or the logits."""
    found: list = []
    hooks = []
    for i, layer in enumerate(getattr(model, "layers", [])):
        def hook(mod, args, out, i=i, layer=layer):
            if not found and isinstance(out, torch.Tensor) and not bool(torch.isfinite(out).all()):
                found.append(f"layer {i} ({layer.kind}, symbol {layer.symbol})")
        hooks.append(layer.register_forward_hook(hook))
    try:
        with engine.autocast():
            logits = model(inputs).logits
        if not found and not bool(torch.isfinite(logits).all()):
            found.append("the logits")
    except Exception:  # a diagnosis must not hide the original problem
        pass
    finally:
        for h in hooks:
            h.remove()
    return found[0] if found else None


class TrainingInterrupted(KeyboardInterrupt):
    """Raised after a stop signal (``Trainer.STOP_SIGNALS``) once the current step finished and a
    checkpoint was saved. ``signum``: the signal; ``exit_code``: 128 + signum (130 for Ctrl-C,
    143 for SIGTERM), the shell convention."""

    def __init__(self, step: int, checkpoint: str | None, signum: int = signal.SIGINT):
        super().__init__(f"interrupted at step {step}")
        self.step, self.checkpoint, self.signum = step, checkpoint, int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"


def _to_dict(section) -> dict:
    if section is None:
        return {}
    if isinstance(section, dict):
        return dict(section)
    if hasattr(section, "to_dict"):  # a typed section (hybridseq.config)
        return section.to_dict()
    from omegaconf import OmegaConf

    return OmegaConf.to_container(section, resolve=True)


def check_writable(folder: str) -> None:
    """Make ``folder`` and write a probe file in it, before anything is built: an unwritable
    ``--out`` is one line, not a traceback after minutes of setup."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-probe-{os.getpid()}")
        with open(probe, "wb") as fh:
            fh.write(b"ok")
        os.remove(probe)
    except OSError as e:
        raise HybridSeqError(f"cannot write to the run folder {folder}: {e.strerror or e} "
                             "(choose another with --out or train.out_dir)") from None


def check_training_memory(cfg, batch_size: int, seq_len: int, device) -> None:
    """Refuse, before the model is allocated, a run whose weights, gradients, AdamW states and
    activations (``hybridseq plan``'s closed forms for one device) exceed the device's memory."""
    from ..model import memory_bytes
    from .plan import GIB, plan

    have = memory_bytes(device)
    if have is None:
        return
    prec = "bf16" if device.type == "cuda" else "fp32"
    p = plan(cfg, gpus=1, zero=0, micro_batch=batch_size, seq_len=seq_len, precision=prec)
    if p["total_gib"] * GIB > have:
        from ..errors import ConfigError

        raise ConfigError(
            f"this run needs about {p['total_gib']:,.1f} GiB on {device} (weights {p['params_gib']:,.1f}, "
            f"gradients {p['grads_gib']:,.1f}, AdamW {p['optimizer_gib']:,.1f}, activations "
            f"{p['activations_gib']:,.1f} at batch {batch_size} x {seq_len}); it has "
            f"{have / GIB:,.1f} GiB: lower train.batch_size or the model's sizes (hybridseq plan shows "
            "the split)", file=getattr(cfg, "source", None), key="model.d_model")


def default_out_dir(name: str | None) -> str:
    return os.path.join("runs", f"{name or 'run'}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over scored positions (targets != -100), computed in float32."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "random": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)



def _check_vocab(cfg, task) -> None:
    """A fixed ``model.vocab_size`` must hold every token id the task produces; otherwise the
    embedding lookup would fail mid-step with an index error."""
    model = cfg.get("model") or {}
    v = model.get("vocab_size") if hasattr(model, "get") else getattr(model, "vocab_size", None)
    need = int(getattr(task, "vocab_size", 0) or 0)
    if isinstance(v, int) and not isinstance(v, bool) and need and v < need:
        raise ConfigError(f"model.vocab_size is {v} but task {task.name!r} uses {need} token ids: "
                          f"set it to at least {need}, or to auto",
                          file=getattr(cfg, "source", None), key="model.vocab_size")

class Trainer:
    """Builds (or receives) the model, the task and an engine, and runs ``fit()``.

    ``hooks``: callables ``hook(trainer, record)`` run after every optimizer step with that step's
    record (``step``, ``loss``, ``lr``, ...); an exception in a hook stops training (tests use it
    to simulate a crash)."""

    def __init__(self, cfg, out_dir: str | None = None, resume: bool = False, progress: bool = True,
                 engine_factory: Callable | None = None, model=None, hooks=(), rank: int = 0,
                 init_from: str | None = None):
        self.cfg = cfg
        self.tc = {**TRAIN_DEFAULTS, **_to_dict(cfg.get("train") if hasattr(cfg, "get") else cfg["train"])}
        tc = self.tc
        for key in ("steps", "batch_size", "grad_accum"):
            if int(tc[key]) < 1:
                raise HybridSeqError(f"train.{key} must be >= 1, got {tc[key]}")
        self.steps, self.batch_size, self.grad_accum = int(tc["steps"]), int(tc["batch_size"]), int(tc["grad_accum"])
        self.seed = int(tc["seed"])
        self.out_dir = out_dir or tc.get("out_dir") or default_out_dir(cfg.get("name"))
        self.ckpt_root = os.path.join(self.out_dir, "checkpoints")
        self.hooks = list(hooks)
        self.show_progress = progress
        self.resume = resume
        if resume and not os.path.isdir(self.out_dir):
            raise HybridSeqError(f"--resume: no run folder {self.out_dir}")
        if not resume and ckpt.latest_checkpoint(self.ckpt_root) is not None:
            raise HybridSeqError(f"{self.out_dir} already holds checkpoints: continue it with --resume, "
                                 "or choose another output folder (--out)")

        device = resolve_device(tc.get("device", "auto"))
        seed_everything(self.seed)
        # Data: one task per process, seeded per rank so ranks see different batches.
        self.task = make_task(tc["task"], seed=self.seed + 1000 * rank)
        self.cfg = cfg = _with_task_tokenizer(cfg, getattr(self.task, "tokenizer", None))
        self.tokenizer_json = None  # a prepared folder's tokenizer.json, which travels with the model
        if getattr(self.task, "tokenizer_file", None):
            with open(self.task.tokenizer_file, "rb") as fh:
                self.tokenizer_json = fh.read()
        _check_vocab(cfg, self.task)
        if model is None:
            check_training_memory(cfg, self.batch_size, int(self.task.seq_len), device)
        check_writable(self.out_dir)
        if model is None:
            from ..api import build_model

            model = build_model(cfg)
        if self.tokenizer_json is not None:  # saved beside the weights in every checkpoint (hs.save_pretrained)
            model.tokenizer_json = self.tokenizer_json
        model.to(device)
        model.train()
        self.engine = (engine_factory or LocalEngine)(model, tc, cfg=cfg, device=device)
        self.model = self.engine.model
        self.device = self.engine.device
        if init_from and not resume:
            self.engine.load_weights(init_from)
        try:  # forward FLOPs per token at the training length, for MFU
            self.flops_per_token = float(self.model.flops_per_token(int(self.task.seq_len)))
        except (AttributeError, TypeError, ValueError):
            self.flops_per_token = None
        self.peak_flops = peak_flops(self.device, getattr(self.engine, "precision", None))
        # ZeRO-3 partitions report numel() == 0; ds_numel is the full size
        self.n_params = sum(getattr(p, "ds_numel", p.numel())
                            for p in {id(p): p for p in self.model.parameters()}.values())

        self.step = 0
        self.tokens_seen = 0
        self._acc = self._new_acc()
        self.last_eval: dict = {}
        self.first_loss = None
        self.last_loss = None
        self._stop_requested = False

    # --- bookkeeping --------------------------------------------------------------------------
    @staticmethod
    def _new_acc() -> dict:
        return {"loss": 0.0, "aux": 0.0, "correct": 0, "scored": 0, "steps": 0, "tokens": 0}

    def client_state(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "task": self.task.state_dict(),
                "rng": rng_state(), "acc": dict(self._acc), "last_eval": dict(self.last_eval)}

    def load_client_state(self, state: dict) -> None:
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.task.load_state_dict(state["task"])
        set_rng_state(state["rng"])
        self._acc = dict(state.get("acc") or self._new_acc())
        self.last_eval = dict(state.get("last_eval") or {})

    def save(self) -> str:
        """A checkpoint of this step. The weights are checked to be finite first (a non-finite
        weight is never saved), and a full disk is named as such (the previous checkpoint stays
        intact: saves are atomic)."""
        import errno

        bad = _first_nonfinite_param(self.model)
        if bad is not None:
            raise NonFiniteError(f"parameter {bad} is not finite at step {self.step}: not saving a "
                                 "checkpoint (the last one stays the newest)")
        try:
            return self.engine.save_checkpoint(self.ckpt_root, self.step, self.client_state(),
                                               keep_last=int(self.tc.get("keep_last") or 0))
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise HybridSeqError(f"no space left on the device of {self.ckpt_root} while saving step "
                                     f"{self.step} (the previous checkpoint is intact): free space, lower "
                                     "train.keep_last or train.save_every, or choose another --out") from None
            raise

    def _write_config(self) -> None:
        if not self.engine.is_main:
            return
        from ..config import save_config

        os.makedirs(self.out_dir, exist_ok=True)
        save_config(self.cfg, os.path.join(self.out_dir, "config.yaml"))
        if self.tokenizer_json is not None:
            ckpt.atomic_write_bytes(os.path.join(self.out_dir, "tokenizer.json"), self.tokenizer_json)

    # --- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, task=None, n_batches: int | None = None, batch_size: int | None = None) -> dict:
        """Mean cross-entropy and accuracies over the task's fixed evaluation batches (and, for
        language modelling, perplexity and bits per byte: module docstring)."""
        task = task or self.task
        n = int(n_batches or self.tc.get("eval_batches") or 1)
        bs = int(batch_size or self.batch_size)
        was_training = self.model.training
        self.model.eval()
        total_loss, counts = 0.0, {"correct": 0, "scored": 0, "seq_correct": 0, "seqs": 0}
        n_bytes = 0.0  # None once a batch does not say how many bytes it holds
        try:
            for batch in task.eval_batches(n, bs):
                inputs, targets = batch
                inputs, targets = inputs.to(self.device), targets.to(self.device)
                doc_ids = getattr(batch, "doc_ids", None)
                kwargs = {} if doc_ids is None else {"doc_ids": doc_ids.to(self.device)}
                with self.engine.autocast():
                    logits = self.model(inputs, **kwargs).logits
                total_loss += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                    targets.reshape(-1), ignore_index=IGNORE, reduction="sum"))
                b = getattr(batch, "n_bytes", None)
                n_bytes = None if b is None or n_bytes is None else n_bytes + float(b.sum())
                for k, v in score(logits, targets).items():
                    counts[k] += v
        finally:
            self.model.train(was_training)
        out = {"eval_loss": total_loss / max(1, counts["scored"]),
               "eval_acc": counts["correct"] / max(1, counts["scored"])}
        if task.has_seq_acc:
            out["eval_seq_acc"] = counts["seq_correct"] / max(1, counts["seqs"])
        if getattr(task, "language_model", False):
            out["eval_ppl"] = math.exp(min(out["eval_loss"], 700.0))
            if n_bytes:
                out["eval_bpb"] = total_loss / (n_bytes * math.log(2))
        return out

    # --- one optimizer step -------------------------------------------------------------------
    def train_step(self) -> dict:
        loss_sum, aux_sum, tokens = 0.0, 0.0, 0
        correct = scored = 0
        for _ in range(self.grad_accum):
            batch = self.task.next_batch(self.batch_size)
            inputs, targets = batch
            inputs, targets = inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            doc_ids = getattr(batch, "doc_ids", None)
            if doc_ids is None:
                out = self.engine.forward(inputs)
            else:
                out = self.engine.forward(inputs, doc_ids=doc_ids.to(self.device, non_blocking=True))
            ce = lm_loss(out.logits, targets)
            aux = getattr(out, "aux_loss", None)
            loss = ce + aux if aux is not None else ce
            self.engine.backward(loss / self.grad_accum)
            loss_sum += float(ce.detach())
            aux_sum += float(aux.detach()) if aux is not None else 0.0
            s = score(out.logits.detach(), targets)
            correct += s["correct"]
            scored += s["scored"]
            tokens += inputs.numel()
        loss = loss_sum / self.grad_accum
        # every rank agrees whether the loss is finite before anything is applied
        loss_ok = self.engine.all_finite(math.isfinite(loss) and math.isfinite(aux_sum))
        info = self.engine.step() if loss_ok else self.engine.skip_step()
        if not loss_ok or info.get("skipped") or not math.isfinite(info.get("grad_norm", 0.0)):
            self._non_finite(loss, info, inputs, self.step + 1)
        else:
            self._nan_skips = 0
        self.step += 1
        self.tokens_seen += tokens * self.engine.world_size
        return {"step": self.step, "loss": loss, "aux_loss": aux_sum / self.grad_accum,
                "acc": correct / max(1, scored), "correct": correct, "scored": scored,
                "tokens": tokens * self.engine.world_size, **info}

    def _non_finite(self, loss: float, info: dict, inputs, step: int) -> None:
        """A step whose loss or gradients were not finite: its update was not applied (the engines
        skip it), so the weights stay finite. ``train.on_nan: stop`` (default) raises here, before
        anything is saved, naming the first layer whose output (or gradient) went non-finite;
        ``skip`` goes on, up to ``train.nan_skip_limit`` skipped steps in a row."""
        self._nan_skips = getattr(self, "_nan_skips", 0) + 1
        if not math.isfinite(loss):
            what, where = f"loss {loss}", first_nonfinite_output(self.model, inputs, self.engine)
        else:
            what = f"gradient norm {info.get('grad_norm')}"
            where = _param_place(info.get("bad_param"))
        applied = info.get("applied", False)
        place = f": first non-finite at {where}" if where else ""
        on_nan, limit = self.tc.get("on_nan", "stop"), int(self.tc.get("nan_skip_limit") or 10)
        if info.get("cannot_skip"):
            raise NonFiniteError(f"{what} at step {step}{place}; the update was not applied, and "
                                 "DeepSpeed cannot drop its accumulated gradients, so the run stops without "
                                 "saving (resume from the last checkpoint with a lower train.lr)")
        if applied:  # an engine that cannot skip (DeepSpeed) already applied it: stop now
            raise NonFiniteError(f"{what} at step {step}{place}; the update was applied by DeepSpeed, "
                                 "so the run stops without saving (resume from the last checkpoint with a "
                                 "lower train.lr)")
        if on_nan == "stop" or self._nan_skips > limit:
            why = (f"{self._nan_skips} non-finite steps in a row (train.nan_skip_limit={limit})"
                   if on_nan == "skip" else "train.on_nan: stop")
            raise NonFiniteError(f"{what} at step {step}{place}; the update was not applied and "
                                 f"nothing was saved ({why}; lower train.lr, check the data, or set "
                                 "train.on_nan: skip)")
        if self.engine.is_main:
            print(f"step {step}: {what}{place}; update skipped (train.on_nan: skip)", file=sys.stderr)

    # --- the loop -----------------------------------------------------------------------------
    STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1")

    def _install_signals(self) -> dict:
        """Ctrl-C (SIGINT) and what schedulers send before a kill (SIGTERM: Slurm and Kubernetes;
        SIGHUP: a closed terminal; SIGUSR1: Slurm's ``--signal``) ask the loop to stop after the
        current step, save a checkpoint and raise ``TrainingInterrupted``. A second signal acts
        at once (SIGINT: KeyboardInterrupt; the others: their default action). Returns the
        previous handlers."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if self._stop_requested:
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                return
            self._stop_requested = signum
            # the next one acts at once
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

        previous = {}
        for name in self.STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                previous[sig] = signal.signal(sig, handler)
        return previous

    def fit(self) -> dict:
        tc = self.tc
        resume_step = None
        skipped = []
        if self.resume:
            if self.engine.is_main:
                ckpt.clean_leftovers(self.ckpt_root)  # what interrupted saves and rotations left
            found, skipped = ckpt.find_checkpoint(self.ckpt_root)
            if found is not None:
                self.load_client_state(self.engine.load_checkpoint(found))
                resume_step = self.step
        self._write_config()
        writer = MetricsWriter(os.path.join(self.out_dir, "metrics.jsonl"), resume_step=resume_step) \
            if self.engine.is_main else None
        tboard = TensorBoardWriter(os.path.join(self.out_dir, "tensorboard")) \
            if self.engine.is_main and tc.get("tensorboard") else None
        bar = Progress(self.steps, initial=self.step, enabled=self.show_progress and self.engine.is_main)
        if self.engine.is_main and self.show_progress:
            bar.write(f"{self.cfg.get('name') or 'model'}: {self.n_params:,} parameters on {self.device}; "
                      f"task {self.task.describe()}; run folder {self.out_dir}")
        for folder, why in skipped:
            bar.write(f"skipped {folder}: {why}")
        if resume_step is not None:
            bar.write(f"resumed from {found} (step {resume_step})")
        elif self.resume:
            bar.write(f"no checkpoint in {self.ckpt_root}: starting from step 0")

        log_every = max(1, int(tc.get("log_every") or 1))
        eval_every = int(tc.get("eval_every") or 0)
        save_every = int(tc.get("save_every") or 0)
        start_tokens, start = self.tokens_seen, time.perf_counter()
        interval_t0, interval_time = time.perf_counter(), 0.0
        last_saved, tok_s = resume_step, None
        previous = self._install_signals()
        try:
            while self.step < self.steps:
                rec = self.train_step()
                a = self._acc
                a["loss"] += rec["loss"]; a["aux"] += rec["aux_loss"]; a["steps"] += 1
                a["correct"] += rec["correct"]; a["scored"] += rec["scored"]; a["tokens"] += rec["tokens"]
                if self.first_loss is None:
                    self.first_loss = rec["loss"]
                self.last_loss = rec["loss"]
                for hook in self.hooks:
                    hook(self, rec)
                final = self.step == self.steps
                record = {}
                if self.step % log_every == 0 or final:
                    interval_time += time.perf_counter() - interval_t0
                    record = {"step": self.step, "loss": a["loss"] / a["steps"],
                              "acc": a["correct"] / max(1, a["scored"]), "aux_loss": a["aux"] / a["steps"],
                              "lr": rec["lr"], "grad_norm": rec["grad_norm"], "tokens": self.tokens_seen,
                              "tokens_per_s": a["tokens"] / max(interval_time, 1e-9),
                              "elapsed_s": time.perf_counter() - start}
                    record.update(perf_fields(self.device, self.flops_per_token, record["tokens_per_s"],
                                              self.peak_flops))
                    record.update(moe_load(self.model))
                    self._acc = self._new_acc()
                    interval_time, interval_t0 = 0.0, time.perf_counter()
                if (eval_every and self.step % eval_every == 0) or final:
                    interval_time += time.perf_counter() - interval_t0
                    self.last_eval = self.evaluate()
                    record = {"step": self.step, **record, **self.last_eval}
                    interval_t0 = time.perf_counter()
                if record and writer is not None:
                    writer.write(record)
                    if tboard is not None:
                        tboard.write(record)
                    if "eval_loss" in record:
                        bar.write(_eval_line(record))
                if "tokens_per_s" in record:
                    tok_s = f"{record['tokens_per_s']:.0f}"
                bar.update(1, loss=rec["loss"], acc=rec["acc"], **({"tok/s": tok_s} if tok_s else {}))
                if (save_every and self.step % save_every == 0) or final:
                    interval_time += time.perf_counter() - interval_t0  # saving is not training time
                    self.save()
                    last_saved = self.step
                    interval_t0 = time.perf_counter()
                if self._stop_requested and not final:
                    path = self.save()
                    raise TrainingInterrupted(self.step, path, int(self._stop_requested))
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)
            bar.close()
            if writer is not None:
                writer.close()
            if tboard is not None:
                tboard.close()
        wall = time.perf_counter() - start
        latest = ckpt.latest_checkpoint(self.ckpt_root)
        return {"out_dir": self.out_dir, "steps": self.step, "n_params": self.n_params,
                "first_loss": self.first_loss, "final_loss": self.last_loss, **self.last_eval,
                "wall_s": wall, "tokens_per_s": (self.tokens_seen - start_tokens) / max(wall, 1e-9),
                "checkpoint": latest, "resumed_from": resume_step, "last_saved": last_saved,
                "device": str(self.device), "precision": getattr(self.engine, "precision", None)}


def _eval_line(r: dict) -> str:
    parts = [f"step {r['step']}", f"eval_loss {r['eval_loss']:.4f}", f"eval_acc {r['eval_acc']:.3f}"]
    if "eval_seq_acc" in r:
        parts.append(f"eval_seq_acc {r['eval_seq_acc']:.3f}")
    if "eval_ppl" in r:
        parts.append(f"eval_ppl {r['eval_ppl']:.2f}")
    if "eval_bpb" in r:
        parts.append(f"eval_bpb {r['eval_bpb']:.3f}")
    return "  ".join(parts)


def _with_task_tokenizer(cfg, tokenizer: str | None):
    """``cfg`` with ``train.task.tokenizer`` set to what the task's data is (``bytes``,
    ``tokenizer.json`` or ``ids``), so that a saved config never calls token data bytes."""
    try:
        spec = cfg.train.task
        if tokenizer is None or getattr(spec, "tokenizer", tokenizer) == tokenizer:
            return cfg
        from dataclasses import replace

        return replace(cfg, train=cfg.train.replace(task=spec.replace(tokenizer=tokenizer)))
    except (AttributeError, TypeError):  # a plain mapping: kept as given
        return cfg


def train(cfg, out_dir: str | None = None, resume: bool = False, progress: bool = True, **kwargs) -> dict:
    """Train ``cfg`` (a loaded config) in this process; returns a summary dict (see ``Trainer.fit``)."""
    return Trainer(cfg, out_dir=out_dir, resume=resume, progress=progress, **kwargs).fit()
