"""``hybridseq compare LAYOUT... --out DIR [--task T] [--seeds N] [--match params|active_params|none]
[key=value ...]``: train each layout on equal terms and write DIR/report.md, report.json and PNGs.

Arguments that contain ``=`` (and are not existing files) are dotted overrides applied to every
layout (``train.steps=500``, ``train.task.seq_len=64``, ``model.d_model=128``); a ``blocks.S.key``
override applies to the layouts that have the symbol ``S``. The ``train`` section of the first
layout (after overrides) is used for all, so they share task, data order, seeds and budget.

Exit status: 0 when every layout ran; 2 when a layout failed (its message is printed and
recorded in the report, the others' results are kept) or on a usage error; 130 on Ctrl-C
or SIGTERM (finished runs are kept and a partial report covers them; rerun the same command
to continue).
"""
from __future__ import annotations

import os
import signal
import sys
import threading

from ..errors import HybridSeqError
from .match import MODES
from .runner import CompareOptions, load_entries, run_entries

EXIT_FAILED = 2


def add_arguments(p) -> None:
    p.add_argument("items", nargs="*", metavar="LAYOUT... [key=value ...]",
                   help="layout YAML files to compare, then dotted overrides applied to all")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="comparison folder: runs/<layout>/seed<k>/ and the report (a rerun reuses finished runs)")
    p.add_argument("--task", default=None, help="task for every layout (selective_copy, induction_heads, mqar, "
                   "text); task keys as overrides: train.task.seq_len=64")
    p.add_argument("--seeds", type=int, default=1, help="seeds per layout (mean and std over them)")
    p.add_argument("--seed", type=int, default=None, help="first seed (default: the first layout's train.seed)")
    p.add_argument("--match", choices=MODES, default="none",
                   help="rescale d_model so parameter counts agree with the first layout's within 5%%")
    p.add_argument("--eval-lengths", default="1x,2x,4x",
                   help="evaluation lengths: Nx (times the task's training seq_len) or token counts, "
                        "comma-separated (default 1x,2x,4x)")
    p.add_argument("--sweep-lengths", default=None,
                   help="lengths of the throughput/memory sweep (default: the evaluation lengths)")
    p.add_argument("--eval-seqs", type=int, default=None,
                   help="sequences evaluated per length (default train.eval_batches * train.batch_size)")
    p.add_argument("--eval-budget", type=float, default=0.0, metavar="SECONDS",
                   help="per run: stop evaluating longer lengths once this much time was spent (0: no limit)")
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens per sequence in the decoding benchmark")
    p.add_argument("--decode-batch", type=int, default=4, help="sequences in the decoding benchmark")
    p.add_argument("--sweep-iters", type=int, default=2, help="timed steps per length in the sweep")
    p.add_argument("--device", default=None, help="shortcut for train.device=... (auto, cpu, cuda)")
    p.add_argument("--no-progress", action="store_true", help="no training progress bars")


def _split_items(items: list[str]) -> tuple[list[str], list[str]]:
    layouts, overrides = [], []
    for item in items:
        if "=" in item and not os.path.exists(item):
            overrides.append(item)
        elif overrides:
            raise HybridSeqError(f"hybridseq compare: layout {item!r} after the overrides: give the "
                                 "layout files first, then key=value overrides")
        else:
            layouts.append(item)
    return layouts, overrides


def options_from_args(args) -> tuple[list[str], CompareOptions]:
    layouts, overrides = _split_items(list(args.items or []))
    if not layouts:
        raise HybridSeqError("hybridseq compare: give at least one LAYOUT file, e.g. "
                             "hybridseq compare layouts/mamba.yaml layouts/transformer.yaml --out runs/cmp")
    for name, low in (("seeds", 1), ("decode_tokens", 1), ("decode_batch", 1), ("sweep_iters", 1)):
        if getattr(args, name) < low:
            raise HybridSeqError(f"hybridseq compare: --{name.replace('_', '-')} must be >= {low}")
    if args.eval_seqs is not None and args.eval_seqs < 1:
        raise HybridSeqError("hybridseq compare: --eval-seqs must be >= 1")
    from .measure import parse_lengths

    for flag, text in (("--eval-lengths", args.eval_lengths), ("--sweep-lengths", args.sweep_lengths)):
        if text is not None:
            try:
                parse_lengths(text, 1 << 20)  # the base only scales "Nx" items
            except ValueError as e:
                raise HybridSeqError(f"hybridseq compare: {flag}: {e}") from None
    if args.device:
        overrides.append(f"train.device={args.device}")
    opts = CompareOptions(out=args.out, task=args.task, seeds=args.seeds, base_seed=args.seed,
                          match=args.match, eval_lengths=args.eval_lengths, sweep_lengths=args.sweep_lengths,
                          eval_seqs=args.eval_seqs, eval_budget_s=args.eval_budget,
                          decode_tokens=args.decode_tokens, decode_batch=args.decode_batch,
                          sweep_iters=args.sweep_iters, overrides=overrides, progress=not args.no_progress)
    return layouts, opts


def _argv(args) -> list[str]:
    out = list(args.items or [])
    for flag in ("out", "task", "seeds", "seed", "match", "eval_lengths", "sweep_lengths", "eval_seqs",
                 "eval_budget", "decode_tokens", "decode_batch", "sweep_iters", "device"):
        v = getattr(args, flag, None)
        if v is not None:
            out += [f"--{flag.replace('_', '-')}", str(v)]
    return out


def _stop_on_sigterm():
    """SIGTERM (``timeout``, a batch scheduler) stops like Ctrl-C: finished runs are kept and a
    partial report is written. Returns the previous handler (None off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    return signal.signal(signal.SIGTERM, handler)


def run(args) -> int:
    from .report import write_report

    layouts, opts = options_from_args(args)
    entries = load_entries(layouts, opts)
    previous = _stop_on_sigterm()
    try:
        run_entries(entries, opts)
    except KeyboardInterrupt:
        write_report(opts.out, entries, opts, _argv(args))
        print(f"interrupted: finished runs are kept; rerun the same command to continue "
              f"(partial report: {os.path.join(opts.out, 'report.md')})", file=sys.stderr)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    write_report(opts.out, entries, opts, _argv(args))
    for e in entries:
        m = e.runs[-1] if e.runs else {}
        if e.ok:
            acc = m.get("eval_acc")
            loss = m.get("final_eval_loss")
            print(f"{e.label:<24} ok      eval_loss {loss if loss is None else f'{loss:.4f}'}  "
                  f"acc {acc if acc is None else f'{acc:.3f}'}  ({len(e.runs)} seed(s))")
        else:
            print(f"{e.label:<24} FAILED  ({e.failed_at})")
    print(f"report: {os.path.join(opts.out, 'report.md')}")
    failed = [e for e in entries if not e.ok]
    if failed:
        lines = [f"error: {len(failed)} of {len(entries)} layouts failed (the others' results are in the report):"]
        lines += [f"  {e.label} ({e.path}, at {e.failed_at}): {e.error}" for e in failed]
        print("\n".join(lines), file=sys.stderr)
        return EXIT_FAILED
    return 0


__all__ = ["add_arguments", "run"]
