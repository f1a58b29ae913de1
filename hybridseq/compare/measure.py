"""What ``hybridseq compare`` measures on a trained model, and how.

- ``peak_memory(device)``: a context manager measuring peak memory of the code inside it: on CUDA
  ``torch.cuda.max_memory_allocated`` (after ``reset_peak_memory_stats``) minus what was
  allocated on entry; on CPU the peak resident set size (sampled from ``/proc/self/statm`` every
  20 ms by a thread) minus the RSS on entry. The CPU figure is approximate: memory the
  allocator kept from earlier work is reused and not counted again.
- ``eval_lengths(...)``: evaluation loss/accuracy on the task's fixed evaluation batches at
  several lengths (``length extrapolation``): the task's ``seq_len`` key set to each length, the
  same number of sequences at every length, in batches holding about as many tokens as a
  training batch (at least one sequence). Out-of-memory at a length marks it and every longer
  one ``"oom"``; ``budget_s`` skips a length (and the longer ones: ``"skipped"``) when the time spent
  plus its predicted time (extrapolated from the previous lengths) would pass the budget.
- ``decode_speed(...)``: greedy one-token steps through the model's inference cache after a
  short prefill, timed by ``hybridseq bench decode``'s helpers: tokens/s over ``batch``
  sequences, and the cache's measured bytes per sequence.
- ``seqlen_sweep(...)``: training throughput (forward + backward, tokens/s) and peak memory at
  several sequence lengths, with a fixed number of tokens per step.
- ``static_costs(cfg, seq_len)``: closed-form total/active parameters, forward FLOPs per token and
  inference-state bytes per sequence (bf16) at the training length.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from typing import Iterable

import torch


# ----------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: peak RSS so far (ru_maxrss, KiB on Linux)
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class _Peak:
    bytes: int = 0
    kind: str = ""


@contextlib.contextmanager
def peak_memory(device: torch.device | str):
    """Yields an object whose ``.bytes`` is, on exit, the peak extra memory used inside the block
    and ``.kind`` says how it was measured (``cuda_max_allocated`` or ``cpu_rss``)."""
    device = torch.device(device)
    peak = _Peak()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        peak.kind = "cuda_max_allocated"
        try:
            yield peak
        finally:
            torch.cuda.synchronize(device)
            peak.bytes = max(0, torch.cuda.max_memory_allocated(device) - base)
        return
    peak.kind = "cpu_rss"
    base = _rss_bytes()
    top = [base]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.02):
            top[0] = max(top[0], _rss_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()
        top[0] = max(top[0], _rss_bytes())
        peak.bytes = max(0, top[0] - base)


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError if hasattr(torch, "OutOfMemoryError") else MemoryError):
        return True
    return isinstance(e, (MemoryError, RuntimeError)) and "out of memory" in str(e).lower()


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# lengths
# ----------------------------------------------------------------------------------------------
def parse_lengths(text: str | Iterable | None, base: int) -> list[int]:
    """``"0.25x,1x,2x,64,4096"`` -> sorted distinct ints: ``Nx`` is N times ``base`` (the task's
    training ``seq_len``), a plain number is a length. Raises ``ValueError`` on a bad item."""
    if text is None:
        return [int(base)]
    items = text.split(",") if isinstance(text, str) else list(text)
    out = set()
    for item in items:
        s = str(item).strip().lower()
        if not s:
            continue
        if s.endswith("x"):
            v = float(s[:-1]) * base
        else:
            v = float(s)
        if not math.isfinite(v) or v < 1:
            raise ValueError(f"bad length {item!r}: give N (tokens) or Nx (times the training length)")
        out.add(max(1, int(round(v))))
    if not out:
        raise ValueError(f"no lengths in {text!r}")
    return sorted(out)


def _predict(rows: list[dict], L: int) -> float:
    """Seconds the evaluation at length ``L`` should take, extrapolated from the last two done
    lengths as ``t ~ L^p`` with p in [1, 2] (p = 2 from a single point: attention's worst case)."""
    done = [r for r in rows if r.get("status") == "ok" and r.get("seconds")]
    if not done:
        return 0.0
    last = done[-1]
    p = 2.0
    if len(done) > 1 and last["seq_len"] > done[-2]["seq_len"] and done[-2]["seconds"] > 0:
        p = math.log(max(last["seconds"], 1e-9) / done[-2]["seconds"]) / math.log(last["seq_len"] / done[-2]["seq_len"])
        p = min(2.0, max(1.0, p))
    return last["seconds"] * (L / last["seq_len"]) ** p


def eval_lengths(trainer, task_cfg: dict, lengths: list[int], seed: int, n_seqs: int,
                 tokens_per_batch: int, budget_s: float = 0.0, log=None) -> list[dict]:
    """Evaluate ``trainer.model`` on ``task_cfg`` with its ``seq_len`` key set to each length.

    Every length sees ``n_seqs`` sequences from the task's evaluation generator (a function of
    ``seed`` and the length), in batches of ``max(1, tokens_per_batch // tokens_per_seq)``. Rows:
    ``{"seq_len", "tokens", "status": "ok"|"oom"|"skipped"|"error", "eval_loss", "eval_acc",
    ["eval_seq_acc"], "seconds"}``."""
    from ..data import make_task

    rows, start, stop_reason = [], time.perf_counter(), None
    device = trainer.device
    for L in lengths:
        row = {"seq_len": int(L)}
        if stop_reason:
            rows.append({**row, "status": stop_reason})
            continue
        if budget_s and time.perf_counter() - start + _predict(rows, L) > budget_s:
            stop_reason = "skipped"
            rows.append({**row, "status": stop_reason})
            if log:
                log(f"    eval at length {L} and longer: skipped (--eval-budget {budget_s:g} s)")
            continue
        try:
            task = make_task(task_cfg, seed=seed, seq_len=int(L))
        except Exception as e:  # the task does not allow this length
            rows.append({**row, "status": "error", "error": str(e).splitlines()[0]})
            continue
        row["tokens"] = int(task.seq_len)
        bs = max(1, min(n_seqs, tokens_per_batch // max(1, task.seq_len)))
        n_batches = max(1, -(-n_seqs // bs))
        t0 = time.perf_counter()
        try:
            res = trainer.evaluate(task=task, n_batches=n_batches, batch_size=bs)
            _sync(device)
            rows.append({**row, "status": "ok", **res, "seqs": n_batches * bs,
                         "seconds": time.perf_counter() - t0})
        except Exception as e:
            if not _is_oom(e):
                raise
            _free(device)
            stop_reason = "oom"
            rows.append({**row, "status": "oom"})
        del task  # its cached evaluation batches can be large at long lengths
        if log and rows[-1]["status"] == "ok":
            r = rows[-1]
            log(f"    eval at length {L}: loss {r['eval_loss']:.4f} acc {r['eval_acc']:.3f} "
                f"({r['seconds']:.1f} s)")
        elif log:
            log(f"    eval at length {L}: {rows[-1]['status']}")
    return rows


# ----------------------------------------------------------------------------------------------
# decoding
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def decode_speed(model, vocab_size: int, device, *, batch: int = 4, prompt_len: int = 16,
                 new_tokens: int = 32, autocast=None, seed: int = 0) -> dict:
    """Greedy decoding through ``model.new_cache``: prefill ``prompt_len`` random tokens, then
    one untimed and ``new_tokens`` timed single-token steps (``hybridseq bench decode``'s
    ``prefill`` and ``time_decode``, mode off). -> ``decode_tokens_per_s`` (all sequences),
    ``decode_ms_per_token`` (one step), ``cache_bytes_per_seq`` (the cache's tensors after
    decoding, in the model's dtype, divided by ``batch``).

    Under no_grad, where the bench uses inference mode: compare trains this model afterwards, and
    what the attention backends cache by sequence length during the prefill (masks, FlexAttention
    block masks) would be inference tensors, which autograd refuses to save for backward."""
    from ..bench.decode import prefill, time_decode

    device = torch.device(device)
    was_training = model.training
    model.eval()
    ctx = autocast or contextlib.nullcontext
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab_size, (batch, prompt_len), generator=g).to(device)
    stats: dict = {}
    try:
        cache = model.new_cache(batch_size=batch, max_seq_len=prompt_len + new_tokens + 1)
        with ctx():
            nxt = prefill(model, prompt, cache, prompt_len).argmax(-1)
            time_decode(model, cache, nxt, device, stats, new_tokens=new_tokens, warmup=1)
    finally:
        model.train(was_training)
    return {"decode_tokens_per_s": stats["tokens_per_s"], "decode_ms_per_token": stats["ms_per_step"],
            "cache_bytes_per_seq": int(cache.nbytes() // batch), "decode_batch": batch}


# ----------------------------------------------------------------------------------------------
# throughput and memory vs sequence length
# ----------------------------------------------------------------------------------------------
def seqlen_sweep(model, vocab_size: int, device, lengths: list[int], tokens_per_step: int, *,
                 iters: int = 2, autocast=None, log=None) -> list[dict]:
    """Forward + backward (no optimizer step) on random tokens at each length, batch
    ``max(1, tokens_per_step // L)``; rows ``{"seq_len", "batch", "status", "train_tokens_per_s",
    "peak_memory_bytes", "memory_kind"}``. Out-of-memory marks that length and longer ones."""
    device = torch.device(device)
    ctx = autocast or contextlib.nullcontext
    was_training = model.training
    model.train()
    rows, oom = [], False
    g = torch.Generator().manual_seed(0)
    try:
        for L in lengths:
            bs = max(1, tokens_per_step // L)
            row = {"seq_len": int(L), "batch": bs}
            if oom:
                rows.append({**row, "status": "oom"})
                continue
            ids = torch.randint(0, vocab_size, (bs, L), generator=g).to(device)

            def step():
                with ctx():
                    out = model(ids)
                    loss = out.logits.float().logsumexp(-1).mean() + out.aux_loss
                loss.backward()
                model.zero_grad(set_to_none=True)

            try:
                with peak_memory(device) as peak:
                    step()  # warm-up, and the memory peak
                    _sync(device)
                    t0 = time.perf_counter()
                    for _ in range(iters):
                        step()
                    _sync(device)
                    dt = (time.perf_counter() - t0) / iters
                rows.append({**row, "status": "ok", "train_tokens_per_s": bs * L / max(dt, 1e-9),
                             "peak_memory_bytes": int(peak.bytes), "memory_kind": peak.kind})
            except Exception as e:
                if not _is_oom(e):
                    raise
                model.zero_grad(set_to_none=True)
                del ids
                _free(device)
                oom = True
                rows.append({**row, "status": "oom"})
            if log:
                r = rows[-1]
                log(f"    speed at length {L}: " + (f"{r['train_tokens_per_s']:.0f} tok/s, peak "
                                                     f"{r['peak_memory_bytes'] / 2**20:.1f} MiB"
                                                     if r["status"] == "ok" else r["status"]))
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return rows


# ----------------------------------------------------------------------------------------------
# closed forms
# ----------------------------------------------------------------------------------------------
def static_costs(cfg, seq_len: int, lengths: Iterable[int] = ()) -> dict:
    """Closed-form costs (no model built): ``params``, ``active_params``, ``flops_per_token``
    (forward, at ``seq_len``), ``state_bytes`` (inference state per sequence at ``seq_len``, bf16),
    and ``state_bytes_by_length`` for each of ``lengths``."""
    from ..train.accounting import account

    t = account(cfg, seq_len=seq_len)["totals"]
    return {"params": int(t["params"]), "active_params": int(t["active_params"]),
            "flops_per_token": float(t["flops_per_token"]), "state_bytes": int(t["state_bytes"]),
            "state_bytes_by_length": {str(int(L)): int(account(cfg, seq_len=int(L))["totals"]["state_bytes"])
                                      for L in lengths}}


def summarize_metrics(records: list[dict]) -> dict:
    """From a run's ``metrics.jsonl`` records: the loss curve, the eval curve, the final and
    best eval loss, and the training throughput (median of the logged ``tokens_per_s``, the first
    logged interval left out when there are several: it includes warm-up)."""
    train = [r for r in records if "loss" in r and isinstance(r.get("loss"), (int, float))]
    evals = [r for r in records if isinstance(r.get("eval_loss"), (int, float))]
    tps = [float(r["tokens_per_s"]) for r in train if isinstance(r.get("tokens_per_s"), (int, float))]
    if len(tps) > 1:
        tps = tps[1:]
    out = {
        "loss_curve": [[int(r["step"]), float(r["loss"]), int(r.get("tokens", 0) or 0)] for r in train],
        "eval_curve": [[int(r["step"]), float(r["eval_loss"]), float(r.get("eval_acc", float("nan")))]
                       for r in evals],
        "train_tokens_per_s": sorted(tps)[len(tps) // 2] if tps else None,
    }
    if evals:
        out["final_eval_loss"] = float(evals[-1]["eval_loss"])
        out["best_eval_loss"] = min(float(r["eval_loss"]) for r in evals)
        out["eval_acc"] = float(evals[-1].get("eval_acc", float("nan")))
        out["best_eval_acc"] = max(float(r.get("eval_acc", 0.0)) for r in evals)
        if "eval_seq_acc" in evals[-1]:
            out["eval_seq_acc"] = float(evals[-1]["eval_seq_acc"])
    if train:
        out["final_train_loss"] = float(train[-1]["loss"])
    return out


__all__ = ["decode_speed", "eval_lengths", "parse_lengths", "peak_memory", "seqlen_sweep", "static_costs",
           "summarize_metrics"]
