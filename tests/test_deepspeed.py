"""DeepSpeed training through the real ``deepspeed`` launcher: 2 CPU ranks (DS_ACCELERATOR=cpu, gloo).

Every launch costs ~15-25 s on 2 cores (2 ranks importing torch+deepspeed), so each run is
reused: the ZeRO-1 run is the reference of the kill/resume test, the ZeRO-3 run (routing forced
so that rank 1 sends no token to the last expert, bf16 autocast) is the source of the export
test. DeepSpeed's shared-memory comm op is never built (``distributed.disable_shm_comm_op``).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")
torch = pytest.importorskip("torch")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow

LAYOUT = """\
name: ds-tiny
model: {d_model: 32}
blocks:
  M: {kind: mamba, d_state: 8, expand: 2}
  E: {kind: moe, n_experts: 4, top_k: 2, d_ff: 48}
  A: {kind: attention, n_heads: 2}
layout: "MEAE"
train:
  task: {name: selective_copy, seq_len: 24, n_data: 4, vocab: 8}
  steps: 8
  batch_size: 4
  lr: 0.01
  warmup_steps: 0
  log_every: 1
  eval_every: 0
  eval_batches: 2
  save_every: 4
  keep_last: 1
"""

# Runs launch/train.py's main with test hooks (env): HS_KILL_AT=N: rank 0 SIGKILLs the whole
# launcher process group right after optimizer step N; HS_SKIP_EXPERT=1: rank 1's routers never
# pick the last expert, and each rank writes probe_rank{r}.json (expert loads, dtypes).
DRIVER = """\
import json, os, signal, sys
sys.path.insert(0, {repo!r})
import torch
from hybridseq.train.launcher import main

hooks = []
kill_at = int(os.environ.get("HS_KILL_AT", "0"))
if kill_at:
    def kill(trainer, rec):
        if rec["step"] == kill_at and trainer.rank == 0:
            os.killpg(0, signal.SIGKILL)
    hooks.append(kill)
if os.environ.get("HS_SKIP_EXPERT"):
    import hybridseq.api as api
    build = api.build_model
    def build_model(cfg, *a, **k):
        m = build(cfg, *a, **k)
        if int(os.environ["RANK"]) == 1:
            for mod in m.modules():
                if hasattr(mod, "bias_override"):
                    b = torch.zeros(mod.n_experts)
                    b[-1] = -1e4
                    mod.bias_override = b
        return m
    api.build_model = build_model
    probe = {{"last_expert_load": [], "dtypes": {{}}}}
    def record(trainer, rec):
        for layer in trainer.model.layers:
            m = getattr(layer.block, "metrics", None) or {{}}
            if "load" in m:
                probe["last_expert_load"].append(float(m["load"][-1]))
        if rec["step"] == trainer.steps:
            for n, p in trainer.model.named_parameters():
                if getattr(p, "_keep_fp32", False):
                    probe["dtypes"][n] = str(getattr(p, "ds_tensor", p).dtype)
            probe["engine_precision"] = trainer.engine.precision
            path = os.path.join(trainer.out_dir, "probe_rank%d.json" % trainer.rank)
            with open(path, "w") as fh:
                json.dump(probe, fh)
    hooks.append(record)
sys.exit(main(sys.argv[1:], hooks=hooks))
"""


def _env(**extra):
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TRITON_INTERPRET="1", PYTHONPATH=REPO,
               CUDA_VISIBLE_DEVICES="", TQDM_DISABLE="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _launch(tmp, out, *args, ranks=2, zero=1, env=None, check=True, timeout=240):
    """Run the driver under ``deepspeed --num_gpus ranks`` (or plain python for 1 rank)."""
    layout = os.path.join(tmp, "layout.yaml")
    driver = os.path.join(tmp, "driver.py")
    if not os.path.exists(layout):
        with open(layout, "w") as fh:
            fh.write(LAYOUT)
        with open(driver, "w") as fh:
            fh.write(DRIVER.format(repo=REPO))
    cmd = [driver, layout, "--deepspeed", os.path.join(REPO, "launch", f"zero{zero}.json"), "--out", out,
           "--no-progress", *args]
    if ranks > 1:
        port = 29500 + (os.getpid() % 500) + 7 * zero + ranks
        cmd = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", str(ranks), "--master_port", str(port), *cmd]
    else:
        cmd = [sys.executable, *cmd]
    proc = subprocess.run(cmd, env=_env(**(env or {})), cwd=tmp, capture_output=True, text=True,
                          timeout=timeout, start_new_session=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _losses(out):
    return [r["loss"] for r in _metrics(out) if "loss" in r]


def _lowered(losses):
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    return all(math.isfinite(x) for x in losses) and last < first - 0.02


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ds"))


@pytest.fixture(scope="module")
def zero1_run(tmp):
    out = os.path.join(tmp, "z1")
    _launch(tmp, out, zero=1)
    return out


@pytest.fixture(scope="module")
def zero3_run(tmp):
    out = os.path.join(tmp, "z3")
    _launch(tmp, out, "train.precision=bf16", zero=3, env={"HS_SKIP_EXPERT": "1"})
    return out


def test_zero1_trains(zero1_run):
    losses = _losses(zero1_run)
    assert len(losses) == 8 and _lowered(losses), losses
    ck = os.path.join(zero1_run, "checkpoints")
    assert sorted(os.listdir(ck)) == ["latest", "step_00000008"]  # keep_last 1 rotated step 4 away


def test_zero2_trains(tmp):
    out = os.path.join(tmp, "z2")
    _launch(tmp, out, zero=2)
    losses = _losses(out)
    assert len(losses) == 8 and _lowered(losses), losses


def test_zero3_expert_skipped_by_one_rank_completes(zero3_run):
    losses = _losses(zero3_run)
    assert len(losses) == 8 and _lowered(losses), losses
    with open(os.path.join(zero3_run, "probe_rank1.json")) as fh:
        p1 = json.load(fh)
    with open(os.path.join(zero3_run, "probe_rank0.json")) as fh:
        p0 = json.load(fh)
    assert p1["last_expert_load"] and max(p1["last_expert_load"]) == 0.0  # rank 1 never used it
    assert max(p0["last_expert_load"]) > 0.0                              # rank 0 did
    # bf16 under ZeRO-3: Mamba's A_log, D, dt bias and the router stay float32 (their shards)
    assert p0["engine_precision"] == "bf16"
    names = p0["dtypes"]
    assert any(n.endswith("A_log") for n in names) and any(n.endswith("router.weight") for n in names)
    assert any(n.endswith("dt_proj.bias") for n in names)
    assert set(names.values()) == {"torch.float32"}, names


def test_zero1_two_ranks_match_one_rank_same_global_batch(tmp, zero1_run):
    out = os.path.join(tmp, "one")
    _launch(tmp, out, "train.batch_size=8", ranks=1, zero=1)
    one, two = _metrics(out), _metrics(zero1_run)
    assert len(one) == len(two) == 8
    for a, b in zip(one, two):
        # same samples; only the MoE balancing loss (computed per local batch) differs
        assert abs(a["loss"] - b["loss"]) < 1e-4 * max(1.0, abs(a["loss"])), (a, b)
        assert abs(a["lr"] - b["lr"]) < 1e-12
    # the trained weights agree: same logits within float tolerance
    import hybridseq as hs

    m1 = hs.load_pretrained(os.path.join(out, "checkpoints", "step_00000008"))
    m2 = hs.load_pretrained(os.path.join(zero1_run, "checkpoints", "step_00000008"))
    ids = torch.randint(0, m1.vocab_size, (2, 24))
    with torch.no_grad():
        a, b = m1(ids).logits, m2(ids).logits
    # (a near-tie in MoE top-k routing may flip for a few tokens: compare median and mean)
    diff = (a - b).abs()
    assert diff.median().item() < 1e-3 and diff.mean().item() < 5e-3, diff.max()
    with torch.no_grad():
        untrained = (a - hs.build_model(m1.cfg)(ids).logits).abs().mean().item()
    assert untrained > 20 * diff.mean().item()  # training moved the weights far more than that


def test_sigkill_then_resume_reproduces_losses(tmp, zero1_run):
    out = os.path.join(tmp, "killed")
    proc = _launch(tmp, out, zero=1, env={"HS_KILL_AT": "6"}, check=False)
    assert proc.returncode != 0
    # killed inside step 6 (after its optimizer step, before its log line); last save at step 4
    assert [r["step"] for r in _metrics(out)][-1] == 5
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["latest", "step_00000004"]
    _launch(tmp, out, "--resume", zero=1)
    ref, got = _metrics(zero1_run), _metrics(out)
    assert [r["step"] for r in got] == list(range(1, 9))
    for a, b in zip(ref, got):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"] and a["lr"] == b["lr"], (a, b)
    assert ref[-1]["eval_loss"] == got[-1]["eval_loss"]


def test_export_then_load_pretrained_same_logits(tmp, zero3_run):
    import hybridseq as hs
    from hybridseq.train.export import export

    dest = os.path.join(tmp, "exported")
    export(zero3_run, dest)
    model = hs.load_pretrained(dest)
    # the model as the ZeRO-3 run left it: its consolidated checkpoint weights, rebuilt
    from hybridseq.train.checkpoint import latest_checkpoint

    ck = latest_checkpoint(os.path.join(zero3_run, "checkpoints"))
    ref = hs.load_pretrained(ck)
    ids = torch.randint(0, model.vocab_size, (2, 24))
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    assert torch.equal(a, b)
    # and the weights are the DeepSpeed fp32 master weights of the shards (zero_to_fp32)
    from hybridseq.train.export import state_dict_from_zero_shards

    shards = state_dict_from_zero_shards(ck)
    own = model.state_dict()
    assert set(shards) <= set(own)
    for k, v in shards.items():
        assert torch.equal(v.float(), own[k].float()), k
