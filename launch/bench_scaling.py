"""Throughput, MFU, memory per GPU and scaling efficiency of DeepSpeed training, 1 -> N GPUs.

    python launch/bench_scaling.py LAYOUT --gpus 1 2 --zero 2 3 [--steps 16 --warmup 6]
        [--micro-batch 8 --seq-len 2048] [--peak-tflops 989] [--out DIR] [--config-suffix=-offload]
        [key=value ...]          (e.g. blocks.E.ep_size=2 for expert parallelism, ZeRO-1/2)

For every (ZeRO stage, GPU count) it runs ``deepspeed --num_gpus G launch/train.py``'s trainer
for ``--steps`` optimizer steps (no evaluation, no checkpoint: the workers stop after the last
step) and reports, from the steps after ``--warmup`` (Triton autotuning, allocator warm-up):

    tokens/s      global tokens per step / median step time (CUDA-synchronised per step)
    MFU           3 * forward FLOPs per token (``hybridseq show``, active parameters) * tokens/s
                  / (G * peak); peak = --peak-tflops (dense bf16, H100/H200 SXM: 989)
    mem/GPU       max over ranks of torch.cuda.max_memory_allocated (and reserved)
    scaling       tokens/s(G) / (G / G_min * tokens/s(G_min)) for the same stage
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def worker(argv: list[str]) -> int:
    """One rank: the launch/train.py trainer with a hook timing each step; after the last step
    every rank writes bench_rank{r}.json into the run folder and exits."""
    import torch

    from hybridseq.train.launcher import main

    times: list[float] = []
    last = [time.perf_counter()]

    def hook(trainer, rec):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now
        if rec["step"] == trainer.steps:
            out = {"step_s": times, "tokens_per_step": rec["tokens"], "loss": rec["loss"],
                   "rank": trainer.rank, "world": trainer.world, "zero": trainer.engine.stage,
                   "mem_alloc_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0,
                   "mem_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else 0.0}
            with open(os.path.join(trainer.out_dir, f"bench_rank{trainer.rank}.json"), "w") as fh:
                json.dump(out, fh)
            sys.stdout.flush()
            os._exit(0)  # skip the final evaluation and checkpoint

    return main(argv, hooks=[hook])


def run_one(args, overrides, gpus: int, zero: int) -> dict:
    ds_name = f"zero{zero}{args.config_suffix}"
    out = os.path.join(args.out, f"{ds_name}-g{gpus}")
    cmd = ["deepspeed", "--num_gpus", str(gpus), "--master_port", str(29600 + 10 * zero + gpus),
           os.path.abspath(__file__), "--worker", args.layout, "--deepspeed",
           os.path.join(HERE, f"{ds_name}.json"), "--out", out, "--no-progress",
           f"train.steps={args.steps}", "train.eval_every=0", "train.save_every=0", "train.log_every=1",
           *( [f"train.batch_size={args.micro_batch}"] if args.micro_batch else []), *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t0
    ranks = []
    for r in range(gpus):
        path = os.path.join(out, f"bench_rank{r}.json")
        if os.path.isfile(path):
            with open(path) as fh:
                ranks.append(json.load(fh))
    if len(ranks) != gpus:
        tail = (proc.stdout[-1500:] + "\n" + proc.stderr[-4000:]).strip()
        return {"zero": zero, "gpus": gpus, "error": f"exit {proc.returncode}: {tail}", "wall_s": wall}
    steps = [max(r["step_s"][i] for r in ranks) for i in range(len(ranks[0]["step_s"]))]
    timed = steps[args.warmup:] or steps
    med = statistics.median(timed)
    return {"zero": zero, "gpus": gpus, "tokens_per_s": ranks[0]["tokens_per_step"] / med, "step_s": med,
            "mem_alloc_gib": max(r["mem_alloc_gib"] for r in ranks),
            "mem_reserved_gib": max(r["mem_reserved_gib"] for r in ranks),
            "loss": ranks[0]["loss"], "wall_s": wall, "first_step_s": steps[0]}


def main() -> int:
    if "--worker" in sys.argv:
        argv = [a for a in sys.argv[1:] if a != "--worker"]
        return worker(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("layout")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    p.add_argument("--zero", type=int, nargs="+", default=[2, 3])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None, help="sets train.task.seq_len")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--timeout", type=int, default=240)
    p.add_argument("--out", default="runs/bench-scaling")
    p.add_argument("--config-suffix", default="",
                   help="DeepSpeed config launch/zero{S}{SUFFIX}.json, e.g. -offload for zero3-offload.json")
    args, overrides = p.parse_known_args()
    for zero in args.zero:
        path = os.path.join(HERE, f"zero{zero}{args.config_suffix}.json")
        if not os.path.isfile(path):
            print(f"error: --zero {zero} --config-suffix {args.config_suffix!r}: no DeepSpeed config {path}",
                  file=sys.stderr)
            return 2
    if args.seq_len:
        overrides.append(f"train.task.seq_len={args.seq_len}")
    from hybridseq.config import load_config
    from hybridseq.train.accounting import account

    cfg = load_config(args.layout, overrides=overrides)
    totals = account(cfg)["totals"]
    flops = float(totals["flops_per_token"])
    print(f"{cfg.get('name')}: {totals['params'] / 1e6:.0f}M parameters, {totals['active_params'] / 1e6:.0f}M active, "
          f"{flops / 1e6:.0f} MFLOP/token forward at L={totals['seq_len']}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for zero in args.zero:
        base = None
        for g in sorted(args.gpus):
            r = run_one(args, overrides, g, zero)
            if "error" not in r:
                r["mfu"] = 3 * flops * r["tokens_per_s"] / (g * args.peak_tflops * 1e12)
                if base is None:
                    base = r
                r["scaling"] = r["tokens_per_s"] / (g / base["gpus"] * base["tokens_per_s"])
            rows.append(r)
            print(json.dumps(r), flush=True)
    print(f"\n{'ZeRO':>4} {'GPUs':>4} {'tokens/s':>10} {'step s':>7} {'MFU':>6} {'mem GiB':>8} {'rsv GiB':>8} "
          f"{'scaling':>7} {'loss':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['zero']:>4} {r['gpus']:>4}  failed: {r['error'][-300:]}")
            continue
        print(f"{r['zero']:>4} {r['gpus']:>4} {r['tokens_per_s']:>10.0f} {r['step_s']:>7.3f} {r['mfu']:>6.1%} "
              f"{r['mem_alloc_gib']:>8.1f} {r['mem_reserved_gib']:>8.1f} {r['scaling']:>7.1%} {r['loss']:>7.3f}")
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
