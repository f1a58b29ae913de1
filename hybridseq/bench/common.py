"""Shared timing and table helpers for `hybridseq bench ...`.

Each bench module (hybridseq/bench/<what>.py) exposes
    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args) -> list[dict]          # one dict per row; printed as a table, or JSON with --json
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from ..tables import format_table  # noqa: F401 (benches print their rows with it)


def add_back_to_back_argument(parser, what: str = "timed call") -> None:
    """``--back-to-back R`` (``time_fn``'s ``back_to_back``), shared by the benches."""
    parser.add_argument("--back-to-back", type=int, default=1, metavar="R",
                        help=f"time each {what} as R calls in a row, per call (bench.common.time_fn): "
                             "steady state, as in a training step of many layers; 1 (default): each "
                             "call timed alone after a cache flush (see --timing)")


TIMINGS = ("pipelined", "sync")
# How ``time_fn`` times CUDA calls when its caller does not say (``--timing``; ``set_timing``).
_TIMING = {"mode": "pipelined"}


def add_timing_argument(parser) -> None:
    """``--timing pipelined|sync`` (``time_fn``'s ``pipelined``), added to every bench by the CLI."""
    if any("--timing" in a.option_strings for a in parser._actions):
        return
    parser.add_argument("--timing", choices=TIMINGS, default="pipelined",
                        help="CUDA timing method (bench.common.time_fn). pipelined (default): "
                             "triton.testing.do_bench's: events around each iteration, the cache "
                             "flushed before it, no host synchronisation between iterations, so the "
                             "host queues the next iteration while the GPU runs this one. sync: a "
                             "synchronisation after each iteration, so each call also pays the "
                             "host's latency before its first kernel")


def set_timing(mode: str) -> None:
    """The method ``time_fn`` uses when called without ``pipelined`` (one of ``TIMINGS``)."""
    if mode not in TIMINGS:
        raise ValueError(f"timing must be one of {'|'.join(TIMINGS)}, got {mode!r}")
    _TIMING["mode"] = mode


def timing() -> str:
    return _TIMING["mode"]


def timing_note() -> str:
    """The line printed under a bench table: how its times were taken."""
    if not torch.cuda.is_available():
        return "timing: host wall clock per iteration (perf_counter; no CUDA device)"
    if timing() == "pipelined":
        return ("timing: pipelined (CUDA events per iteration, cache flushed before each, no host "
                "sync between iterations, as triton.testing.do_bench; --timing sync for each call "
                "alone)")
    return "timing: sync (CUDA events, a host synchronisation after every iteration)"


def time_fn(fn: Callable[[], object], *, warmup: int = 5, iters: int = 20, device=None,
            back_to_back: int = 1, pipelined: bool | None = None) -> dict:
    """Median/min wall time of ``fn()`` in milliseconds. CUDA: CUDA events around each
    iteration and a cache-flushing buffer zeroed before it; CPU: perf_counter.

    ``pipelined`` (None: the ``--timing`` choice, ``set_timing``; default True) is the method of
    triton.testing.do_bench: no host synchronisation between iterations, so while the GPU runs
    one iteration the host queues the next, and a call's time is its GPU time plus any idle gap
    the host leaves inside it (a host-bound call still shows it). False: a synchronisation after
    every iteration, so each sample also counts the host's latency before the call's first
    kernel (the GPU sits idle while Python dispatches it).

    ``back_to_back`` = R > 1: each timed sample runs ``fn()`` R times in a row (the cache flushed
    once before them) and reports the time per call: steady-state throughput, where the host
    queues the next call's kernels while the GPU runs this one's (as in a training step)."""
    back_to_back = max(1, int(back_to_back or 1))
    if pipelined is None:
        pipelined = _TIMING["mode"] == "pipelined"
    cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    for _ in range(warmup):
        fn()
    times = []
    if cuda:
        flush = torch.empty(64 * 1024 * 1024, dtype=torch.int8, device="cuda")
        events = []
        torch.cuda.synchronize()
        for _ in range(iters):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(back_to_back):
                fn()
            end.record()
            events.append((start, end))
            if not pipelined:
                torch.cuda.synchronize()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) / back_to_back for start, end in events]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            for _ in range(back_to_back):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / back_to_back)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "iters": iters,
            "timing": ("pipelined" if pipelined else "sync") if cuda else "host"}


def preheat(fn: Callable[[], object], seconds: float, device=None) -> int:
    """Call ``fn`` repeatedly for about ``seconds`` (then synchronise the device) and return the
    number of calls. A GPU under sustained GEMM load settles at its power cap with a lower clock
    (an H100: SM clock from about 1.9 to 1.3-1.56 GHz within seconds), so a benchmark whose first
    timing runs on a cool GPU compares it with later ones taken hot; heating it first puts every
    timing in the same state."""
    if seconds <= 0:
        return 0
    dev = torch.device(device) if device is not None else None
    calls = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        fn()
        calls += 1
        if dev is not None and dev.type == "cuda" and calls % 8 == 0:
            torch.cuda.synchronize(dev)  # (keep the host within a few calls of the GPU)
    if dev is not None and dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return calls


def run_bench(parser, add_arguments, run, argv=None) -> list[dict]:
    """Parse ``argv`` with ``parser`` (a bench's ``add_arguments``, plus ``--json`` and
    ``--timing``), run the bench and print its rows: a table and the timing note, or JSON. Shared
    by ``hybridseq bench <what>`` (the CLI's parser) and ``script_main``."""
    import json

    add_arguments(parser)
    if not any("--json" in a.option_strings for a in parser._actions):
        parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    add_timing_argument(parser)
    args = parser.parse_args(argv)
    set_timing(args.timing)
    rows = run(args)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        print(format_table(rows))
        print(timing_note())
    return rows


def script_main(add_arguments, run, doc: str | None, argv=None) -> None:
    """``python -m hybridseq.bench.<what> [options] [--json]``: the same as ``hybridseq bench <what>``."""
    import argparse

    run_bench(argparse.ArgumentParser(description=(doc or "").strip().split("\n")[0]), add_arguments,
              run, argv)
