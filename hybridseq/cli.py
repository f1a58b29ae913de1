"""The ``hybridseq`` command line.

    hybridseq show LAYOUT [key=value ...] [--seq-len N] [--json]
    hybridseq train LAYOUT [key=value ...] [--out DIR] [--resume] [--no-progress]
    hybridseq generate CHECKPOINT --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K]
    hybridseq prepare SRC... --out DIR (--tokenizer FILE | --train-tokenizer VOCAB) [--workers N] [--resume]
    hybridseq doctor [--json]
    hybridseq bench WHAT [options] [--json]        (WHAT: the modules of hybridseq.bench)
    hybridseq compare ... / hybridseq plan ...      (when those modules are in this build)

Every user error (``HybridSeqError``, ``ConfigError``, bad arguments) is one line on stderr and
exit status 2, never a traceback. Ctrl-C during ``train`` stops after the current step, saves a
checkpoint, and exits with status 130.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import pkgutil
import sys

from .errors import HybridSeqError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# Subcommands implemented by modules that other parts of the code base provide:
# name -> (module exposing add_arguments(parser) and run(args), one-line help).
PLUGIN_COMMANDS = {
    "compare": ("hybridseq.compare.cli", "train several layouts on equal terms and write a report"),
    "plan": ("hybridseq.train.plan", "memory per GPU of a distributed run"),
    "export": ("hybridseq.train.export", "one model folder (model.safetensors + config.yaml) from a run or checkpoint"),
    "import-hf": ("hybridseq.interop.import_cli", "a transformers checkpoint folder -> a hybridseq model folder"),
    "export-hf": ("hybridseq.interop.export_cli", "a hybridseq model -> a transformers checkpoint folder"),
    "eval": ("hybridseq.interop.lm_eval", "evaluate a model on lm-evaluation-harness tasks"),
}


class UsageError(HybridSeqError):
    """Bad command-line arguments."""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors raise (one line, exit 2) instead of printing the usage block."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def bench_names() -> list[str]:
    """The bench modules present in this build (hybridseq/bench/<what>.py, minus helpers)."""
    try:
        import hybridseq.bench as bench
    except ImportError:
        return []
    return sorted(m.name for m in pkgutil.iter_modules(bench.__path__)
                  if not m.name.startswith("_") and m.name != "common")


# ----------------------------------------------------------------------------------------------
# show
# ----------------------------------------------------------------------------------------------
def _load(layout: str, overrides):
    from .config import load_config

    return load_config(layout, overrides=list(overrides or []))


def cmd_show(args) -> int:
    from .tables import format_table
    from .train.accounting import account, human

    if not args.items:
        raise UsageError("hybridseq show: give a LAYOUT file, e.g. hybridseq show layouts/jamba.yaml")
    args.layout, args.overrides = args.items[0], args.items[1:]
    cfg = _load(args.layout, args.overrides)
    acc = account(cfg, seq_len=args.seq_len)
    rows, t = acc["rows"], acc["totals"]
    if args.json:
        print(json.dumps({"name": cfg.get("name"), **acc}, indent=2))
        return 0
    starts = sorted(cfg.get("stage_starts") or [0])
    table = []
    for r in rows:
        row = {"#": r["index"], "sym": r["symbol"], "kind": r["kind"], "params": human(r["params"])}
        if t["params"] != t["active_params"]:
            row["active"] = human(r["active_params"])
        row.update({"FLOP/tok": human(r["flops_per_token"]), "state": human(r["state_bytes"], "B"),
                    "settings": r["settings"]})
        if len(starts) > 1:  # pipeline stages marked with | in the layout
            row["stage"] = sum(1 for s in starts if s <= r["index"]) - 1
        table.append(row)
    print(f"{cfg.get('name') or args.layout}: {t['n_sublayers']} sublayers, d_model {t['d_model']}, "
          f"vocab {t['vocab_size']}")
    print(format_table(table))
    head = "tied" if not t["head_params"] else human(t["head_params"])
    print(f"embedding {human(t['embedding_params'])}, head {head}")
    print(f"total parameters   {human(t['params'])} ({t['params']:,})")
    print(f"active parameters  {human(t['active_params'])} ({t['active_params']:,})")
    print(f"forward FLOPs/token {human(t['flops_per_token'])} at seq_len {t['seq_len']} "
          f"(training ~3x)")
    print(f"inference state    {human(t['state_bytes'], 'B')} per sequence at length {t['seq_len']} (bf16)")
    return 0


# ----------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------
def _split_layout(items: list[str], out: str | None, resume: bool):
    """-> (layout path, overrides). The layout may be left out with --resume --out DIR: the run's
    own config.yaml is used."""
    if items and ("=" not in items[0] or os.path.exists(items[0])):
        return items[0], items[1:]
    if resume and out and os.path.isfile(os.path.join(out, "config.yaml")):
        return os.path.join(out, "config.yaml"), items
    raise UsageError("hybridseq train: give a LAYOUT file (or --resume --out RUN_DIR)")


def cmd_train(args) -> int:
    from .train import TrainingInterrupted, train

    layout, overrides = _split_layout(args.items, args.out, args.resume)
    cfg = _load(layout, overrides)
    out_dir = args.out or cfg.train.get("out_dir")
    if args.resume and not out_dir:
        raise UsageError("hybridseq train: --resume needs the run folder: --out DIR (or train.out_dir)")
    try:
        summary = train(cfg, out_dir=out_dir, resume=args.resume, progress=not args.no_progress,
                        init_from=args.init_from)
    except TrainingInterrupted as e:
        import shlex

        where = f"; checkpoint {e.checkpoint}" if e.checkpoint else ""
        run = out_dir or (os.path.dirname(os.path.dirname(e.checkpoint)) if e.checkpoint else None)
        cmd = ["hybridseq", "train", layout, *overrides, "--out", run or "RUN_FOLDER", "--resume"]
        print(f"{e.signal_name}: stopped after step {e.step}{where}. Continue with: "
              f"{' '.join(shlex.quote(c) for c in cmd)}", file=sys.stderr)
        return e.exit_code
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    parts = [f"{summary['steps']} steps in {summary['wall_s']:.1f} s",
             f"loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}"
             if summary.get("first_loss") is not None else "no new steps"]
    if "eval_loss" in summary:
        parts.append(f"eval_loss {summary['eval_loss']:.4f}")
        parts.append(f"eval_acc {summary['eval_acc']:.3f}")
    if "eval_seq_acc" in summary:
        parts.append(f"eval_seq_acc {summary['eval_seq_acc']:.3f}")
    print("done: " + ", ".join(parts))
    print(f"run folder: {summary['out_dir']}")
    if summary.get("checkpoint"):
        print(f"checkpoint: {summary['checkpoint']}")
    return 0


# ----------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------
def _uses_bytes(cfg) -> bool:
    try:
        task = cfg["train"]["task"]
        return task["name"] == "text" and task.get("tokenizer", "bytes") == "bytes"
    except Exception:
        return False


def cmd_generate(args) -> int:
    import torch

    import hybridseq as hs

    from .train.engine import resolve_device

    from .train.checkpoint import resolve_checkpoint

    folder = resolve_checkpoint(args.checkpoint)
    loaded = hs.load_pretrained(folder)
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    if cfg is None:
        from .config import load_config

        cfg = load_config(os.path.join(folder, "config.yaml"))
    tokenizer = None  # the checkpoint's tokenizer.json: text in, text out
    if args.tokens == "auto" and os.path.isfile(os.path.join(folder, "tokenizer.json")):
        from .data.tokenizer import find_eos, load_tokenizer

        tokenizer = load_tokenizer(os.path.join(folder, "tokenizer.json"))
        if args.eos is None:  # stop at the end of the document
            try:
                args.eos = find_eos(tokenizer)[0]
            except HybridSeqError:
                pass
    as_bytes = tokenizer is None and (_uses_bytes(cfg) if args.tokens == "auto" else args.tokens == "bytes")
    if tokenizer is not None:
        ids = tokenizer.encode(args.prompt, add_special_tokens=False).ids
    elif as_bytes:
        ids = list(args.prompt.encode("utf-8"))
    else:
        words = args.prompt.replace(",", " ").split()
        if not all(w.isascii() and w.isdigit() for w in words):
            raise UsageError("hybridseq generate: this model is not byte-level: give --prompt as token ids "
                             "(integers >= 0), e.g. --prompt '3 1 4 1 5' (or --tokens bytes)")
        ids = [int(w) for w in words]
    if not ids:
        raise UsageError("hybridseq generate: --prompt is empty")
    vocab = getattr(model, "vocab_size_unpadded", None)  # padding rows are not tokens
    if vocab is not None and max(ids) >= vocab:
        raise UsageError(f"hybridseq generate: token id {max(ids)} is outside the vocabulary ({vocab})")
    from .generate import check_sampling
    from .model import memory_bytes

    try:
        check_sampling(args.temperature, args.top_k or None, args.top_p)
    except HybridSeqError as e:
        raise UsageError(f"hybridseq generate: {e}") from None
    if args.max_new_tokens < 0:
        raise UsageError(f"hybridseq generate: --max-new-tokens must be >= 0, got {args.max_new_tokens}")
    device = resolve_device(args.device)
    # the cache for prompt + new tokens, by the closed form, before anything is allocated
    need = model.state_bytes(len(ids) + args.max_new_tokens, dtype_bytes=4)
    have = memory_bytes(device)
    if have is not None and need > have // 2:
        raise UsageError(f"hybridseq generate: --max-new-tokens {args.max_new_tokens} needs an inference "
                         f"cache of {need / 2**30:,.1f} GiB, more than half of {device}'s "
                         f"{have / 2**30:,.1f} GiB: ask for fewer tokens")
    model.to(device).eval()
    torch.manual_seed(args.seed)
    prompt = torch.tensor([ids], dtype=torch.long, device=device)
    kwargs = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    if args.top_k:
        kwargs["top_k"] = args.top_k
    if args.top_p is not None:
        kwargs["top_p"] = args.top_p
    if args.eos is not None:
        kwargs["eos_token_id"] = args.eos
    kwargs["cuda_graph"] = {"auto": "auto", "on": True, "off": False}[args.cuda_graph]
    with torch.no_grad():
        out = model.generate(prompt, **kwargs)
    new = out[0, len(ids):].tolist() if out.shape[1] > len(ids) else out[0].tolist()
    if tokenizer is not None:
        sys.stdout.write(args.prompt + tokenizer.decode(new, skip_special_tokens=True) + "\n")
    elif as_bytes:
        sys.stdout.write(args.prompt + bytes(t % 256 for t in new).decode("utf-8", errors="replace") + "\n")
    else:
        print(" ".join(str(t) for t in ids) + " | " + " ".join(str(t) for t in new))
    return 0


# ----------------------------------------------------------------------------------------------
# doctor, bench, plugins
# ----------------------------------------------------------------------------------------------
def cmd_doctor(args) -> int:
    from .doctor import collect, format_report

    info = collect()
    print(json.dumps(info, indent=2, default=str) if args.json else format_report(info))
    return 0


def cmd_bench(argv: list[str]) -> int:
    names = bench_names()
    listing = ", ".join(names) if names else "(none in this build)"
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: hybridseq bench WHAT [options] [--json]\n  WHAT: {listing}")
        return 0 if argv else EXIT_USAGE
    what = argv[0]
    if what not in names:
        raise UsageError(f"hybridseq bench: unknown WHAT {what!r}; available: {listing}")
    module = importlib.import_module(f"hybridseq.bench.{what}")
    parser = _Parser(prog=f"hybridseq bench {what}", description=(module.__doc__ or "").strip().split("\n")[0])
    from .bench.common import run_bench

    run_bench(parser, module.add_arguments, module.run, argv[1:])
    return 0


def cmd_plugin(name: str, argv: list[str]) -> int:
    modname, help_ = PLUGIN_COMMANDS[name]
    if not _module_exists(modname):
        print(f"hybridseq {name}: not in this build (module {modname} is missing)", file=sys.stderr)
        return EXIT_USAGE
    module = importlib.import_module(modname)
    parser = _Parser(prog=f"hybridseq {name}", description=help_)
    module.add_arguments(parser)
    try:
        args = parser.parse_intermixed_args(argv)
    except TypeError:  # a parser argparse cannot parse intermixed (e.g. exclusive groups)
        args = parser.parse_args(argv)
    result = module.run(args)
    if isinstance(result, list):  # rows, like a bench module
        from .tables import format_table

        print(json.dumps(result, indent=2, default=str) if getattr(args, "json", False) else format_table(result))
        return 0
    return int(result) if isinstance(result, int) else 0


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------
COMMANDS = {}  # name -> (help, function adding its arguments, handler)


def _args_show(s):
    s.add_argument("items", nargs="*", metavar="LAYOUT [key=value ...]",
                   help="layout YAML file, then dotted overrides, e.g. model.d_model=512")
    s.add_argument("--seq-len", type=int, default=None, help="length for FLOPs and state (default: the task's)")
    s.add_argument("--json", action="store_true")


def _args_train(t):
    t.add_argument("items", nargs="*", metavar="LAYOUT [key=value ...]", help="layout YAML file, then overrides")
    t.add_argument("--out", default=None, help="output folder (default train.out_dir or runs/<name>-<time>)")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    t.add_argument("--init-from", default=None, metavar="FOLDER",
                   help="start from the weights of a saved model folder (fresh optimizer)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--json", action="store_true", help="print the summary as JSON")


def _args_generate(g):
    g.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its latest checkpoint)")
    g.add_argument("--prompt", required=True, help="text (models with a tokenizer.json, byte-level models) "
                   "or token ids '3 1 4'")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    g.add_argument("--eos", type=int, default=None, help="stop a row at this token id (default with a "
                   "tokenizer.json: its end-of-document token)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto")
    g.add_argument("--cuda-graph", nargs="?", const="on", choices=("auto", "on", "off"),
                   default="auto", help="decode steps in one CUDA graph (auto: on CUDA when every "
                   "block can be captured; --cuda-graph alone: on)")
    g.add_argument("--tokens", choices=("auto", "bytes", "ids"), default="auto",
                   help="how to read --prompt (auto: through the checkpoint's tokenizer.json when it has "
                   "one, else bytes for byte-level text models, else ids)")


def _args_doctor(d):
    d.add_argument("--json", action="store_true")


def _args_prepare(p):
    from .data.prepare import add_arguments

    add_arguments(p)


def cmd_prepare(args) -> int:
    from .data.prepare import run

    return run(args)


COMMANDS.update({
    "show": ("the resolved stack: one row per sublayer, parameters, FLOPs, state", _args_show, cmd_show),
    "train": ("train a layout (one process: CPU or one GPU)", _args_train, cmd_train),
    "generate": ("sample from a checkpoint", _args_generate, cmd_generate),
    "prepare": ("tokenize text files, .jsonl or a saved HF dataset into token shards for training",
                _args_prepare, cmd_prepare),
    "doctor": ("versions, devices, and the backend each block kind will use", _args_doctor, cmd_doctor),
})


def usage() -> str:
    lines = ["usage: hybridseq COMMAND [options]   (hybridseq COMMAND --help for its options)", "", "commands:"]
    for name, (help_, _, _) in COMMANDS.items():
        lines.append(f"  {name:<9} {help_}")
    lines.append(f"  {'bench':<9} timings: hybridseq bench WHAT ({', '.join(bench_names()) or 'none in this build'})")
    for name, (mod, help_) in PLUGIN_COMMANDS.items():
        lines.append(f"  {name:<9} {help_}" + ("" if _module_exists(mod) else " (not in this build)"))
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print(usage())
            return 0 if argv else EXIT_USAGE
        if argv[0] == "--version":
            from . import __version__

            print(f"hybridseq {__version__}")
            return 0
        command, rest = argv[0], argv[1:]
        # bench and the plugin commands take their options from the modules they dispatch to
        if command == "bench":
            return cmd_bench(rest)
        if command in PLUGIN_COMMANDS:
            return cmd_plugin(command, rest)
        if command not in COMMANDS:
            known = ", ".join([*COMMANDS, "bench", *PLUGIN_COMMANDS])
            raise UsageError(f"hybridseq: unknown command {command!r} (one of: {known})")
        help_, add_arguments, handler = COMMANDS[command]
        parser = _Parser(prog=f"hybridseq {command}", description=help_)
        add_arguments(parser)
        return handler(parser.parse_intermixed_args(rest))
    except HybridSeqError as e:
        print(f"error: {str(e).rstrip()}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `hybridseq show ... | head`
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
