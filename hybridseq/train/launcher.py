"""What ``launch/train.py`` runs on every rank: the ``hybridseq train`` loop on a DeepSpeed engine.

    deepspeed [--num_gpus N] [--hostfile H] launch/train.py LAYOUT [--deepspeed FILE]
              [--out DIR] [--resume] [--init-from FOLDER] [--no-progress] [key=value ...]
    torchrun --nproc_per_node N launch/train.py LAYOUT --deepspeed FILE ...
    python launch/train.py LAYOUT --deepspeed FILE ...           (one process)

Steps: read the rank from the launcher's environment (``--local_rank``/``LOCAL_RANK``); start
``deepspeed.init_distributed`` (NCCL on GPUs, gloo on CPU with ``DS_ACCELERATOR=cpu``); load the
layout with its overrides; resolve the DeepSpeed config (``--deepspeed FILE`` wins over the
layout's ``deepspeed:`` section; neither: ZeRO-2) and write its batch/accumulation/clipping
back into ``train``; pin each rank to ``cuda:LOCAL_RANK``; agree on one output folder (rank 0's);
set up expert-parallel groups when a MoE block has ``ep_size > 1``; then run
``DistributedTrainer.fit`` with ``DeepSpeedEngine``. Rank 0 logs, writes ``metrics.jsonl`` and
prints the summary. Exit status: 0 done, 2 user error (one line), 130 interrupted.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys

from ..errors import HybridSeqError

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/train.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("items", nargs="*", metavar="LAYOUT [key=value ...]", help="layout YAML, then overrides")
    p.add_argument("--deepspeed", "--deepspeed_config", dest="deepspeed", default=None,
                   help="DeepSpeed config, JSON or YAML (default: the layout's deepspeed: section, else ZeRO-2)")
    p.add_argument("--out", default=None, help="output folder (default train.out_dir or runs/<name>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--init-from", default=None, help="start from the weights of a saved model folder")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (rank 0)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _layout_and_overrides(items, out, resume):
    if items and ("=" not in items[0] or os.path.exists(items[0])):
        return items[0], items[1:]
    if resume and out and os.path.isfile(os.path.join(out, "config.yaml")):
        return os.path.join(out, "config.yaml"), items
    raise HybridSeqError("launch/train.py: give a LAYOUT file (or --resume --out RUN_DIR)")


def setup_distributed(local_rank: int | None = None) -> dict:
    """Environment and process group; returns ``dist_env()``."""
    from ..extras import require
    from . import distributed as D

    require("deepspeed", "training under the deepspeed launcher")
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    env = D.dist_env()
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(env["local_rank"])
    D.disable_shm_comm_op()
    import deepspeed

    if not D.is_initialized():
        deepspeed.init_distributed(verbose=False)
    return env


def prepare(args, env: dict):
    """(cfg, resolved DeepSpeed config, out_dir) on every rank."""
    import torch

    from ..config import load_config
    from . import distributed as D
    from .deepspeed_engine import read_ds_config, resolve_ds_config, sync_train_section
    from .trainer import default_out_dir

    layout, overrides = _layout_and_overrides(args.items, args.out, args.resume)
    cfg = load_config(layout, overrides=overrides)
    if cfg.get("deepspeed") is not None and args.deepspeed is None:
        source = cfg.deepspeed
    else:
        source = args.deepspeed
    raw = read_ds_config(source) if source is not None else {"zero_optimization": {"stage": 2}}
    from ..config.schema import TRAIN_DEFAULTS
    from .trainer import _to_dict

    tc = {**TRAIN_DEFAULTS, **_to_dict(cfg.train)}
    cuda = torch.cuda.is_available() and str(tc.get("device", "auto")) != "cpu"
    ds = resolve_ds_config(raw, tc, env["world_size"], "cuda" if cuda else "cpu")
    sync_train_section(cfg, ds)
    cfg.train.device = f"cuda:{env['local_rank']}" if cuda else "cpu"
    out_dir = args.out or cfg.train.get("out_dir")
    if args.resume and not out_dir:
        raise HybridSeqError("--resume needs the run folder: --out DIR (or train.out_dir)")
    out_dir = D.broadcast_object(out_dir or default_out_dir(cfg.get("name")))
    return cfg, ds, out_dir


def setup_expert_parallel(cfg) -> None:
    """Expert-parallel process groups (collective) when the config's blocks ask for ep_size > 1;
    the engine shards the built model over them."""
    from .expert_parallel import ep_size_of_config, setup_groups

    ep = ep_size_of_config(cfg)
    if ep > 1:
        setup_groups(ep)


def main(argv=None, hooks=()) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and train; ``hooks`` go to the trainer."""
    args = build_parser().parse_intermixed_args(argv)
    try:
        env = setup_distributed(args.local_rank)
        return _train(args, env, hooks)
    except HybridSeqError as e:
        print(f"error: {str(e).rstrip()}", file=sys.stderr)
        return EXIT_USAGE


def _train(args, env: dict, hooks=()) -> int:
    from .deepspeed_engine import DeepSpeedEngine
    from .distributed import DistributedTrainer
    from .trainer import TrainingInterrupted

    cfg, ds, out_dir = prepare(args, env)
    setup_expert_parallel(cfg)
    trainer = DistributedTrainer(cfg, out_dir=out_dir, resume=args.resume,
                                 progress=not args.no_progress and env["rank"] == 0,
                                 engine_factory=functools.partial(DeepSpeedEngine, ds_config=ds),
                                 rank=env["rank"], world_size=env["world_size"], hooks=hooks,
                                 init_from=args.init_from)
    try:
        summary = trainer.fit()
    except TrainingInterrupted as e:
        if env["rank"] == 0:
            import shlex

            print(f"{e.signal_name}: stopped after step {e.step}; checkpoint {e.checkpoint}. Continue with "
                  f"--resume --out {shlex.quote(out_dir)}", file=sys.stderr)
        return e.exit_code
    if env["rank"] == 0:
        summary = {**summary, "world_size": env["world_size"], "zero_stage": trainer.engine.stage}
        if args.json:
            print(json.dumps(summary, indent=2, default=str))
        else:
            first, last = summary.get("first_loss"), summary.get("final_loss")
            loss = f"loss {first:.4f} -> {last:.4f}" if first is not None else "no new steps"
            print(f"done: {summary['steps']} steps on {env['world_size']} rank(s), ZeRO-{trainer.engine.stage}, "
                  f"{loss}, {summary.get('tokens_per_s', 0):.0f} tokens/s; run folder {summary['out_dir']}")
    return 0
