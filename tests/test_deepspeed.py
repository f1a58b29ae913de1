"""DeepSpeed training through the real ``deepspeed`` launcher: 2 CPU ranks (DS_ACCELERATOR=cpu, gloo).

Every launch costs ~15-30 s on 2 cores (2 ranks importing torch+deepspeed), so each run is
reused (7 launches in all): the ZeRO-1 run is compared with a 1-rank run of the same global
batch; the expert-parallel ZeRO-2 run is compared with the plain ZeRO-2 run (same initial
weights) and is the reference of the kill/resume test; the ZeRO-3 run (routing forced so that
rank 1 sends no token to the last expert, bf16 autocast) is the source of the export test.
DeepSpeed's shared-memory comm op is never built (``distributed.disable_shm_comm_op``), which
saves a 1-3 minute C++ build per fresh machine.
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
slow = pytest.mark.slow

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
                if hasattr(mod, "logits_and_input"):  # a router: never pick the last expert
                    b = torch.zeros(mod.n_experts)
                    b[-1] = -1e4
                    def logits_and_input(x, orig=mod.logits_and_input, b=b):
                        logits, tap = orig(x)
                        return logits + b.to(logits), tap
                    mod.logits_and_input = logits_and_input
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


def _files(tmp):
    layout = os.path.join(tmp, "layout.yaml")
    driver = os.path.join(tmp, "driver.py")
    if not os.path.exists(layout):
        with open(layout, "w") as fh:
            fh.write(LAYOUT)
        with open(driver, "w") as fh:
            fh.write(DRIVER.format(repo=REPO))
    return layout, driver


def _launch(tmp, out, *args, ranks=2, zero=1, env=None, check=True, timeout=240):
    """Run the driver under ``deepspeed --num_gpus ranks`` (or plain python for 1 rank)."""
    layout, driver = _files(tmp)
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
def init_model(tmp):
    """A saved initial model: the ZeRO-2 and the expert-parallel runs both start from it."""
    import hybridseq as hs

    layout, _ = _files(tmp)
    torch.manual_seed(3)
    folder = os.path.join(tmp, "init")
    hs.save_pretrained(hs.build_model(hs.load_config(layout)), None, folder)
    return folder


@pytest.fixture(scope="module")
def zero2_run(tmp, init_model):
    out = os.path.join(tmp, "z2")
    _launch(tmp, out, "--init-from", init_model, "model.checkpointing=[mamba,moe]", zero=2)
    return out


EP2_ARGS = ("model.checkpointing=[mamba,moe]", "blocks.E.ep_size=2")


@pytest.fixture(scope="module")
def ep2_run(tmp, init_model):
    """ZeRO-2 with expert parallelism 2 (and activation checkpointing), from ``init_model``."""
    out = os.path.join(tmp, "ep2")
    _launch(tmp, out, "--init-from", init_model, *EP2_ARGS, zero=2)
    return out


@pytest.fixture(scope="module")
def ep2_killed(tmp, init_model):
    """The expert-parallel ZeRO-2 run SIGKILLed inside step 6: its newest checkpoint is step 4.
    Tests resume copies of it."""
    out = os.path.join(tmp, "ep2-killed")
    proc = _launch(tmp, out, "--init-from", init_model, *EP2_ARGS, zero=2, env={"HS_KILL_AT": "6"}, check=False)
    assert proc.returncode != 0
    return out


def _copy(src, tmp, name):
    dest = os.path.join(tmp, name)
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest)
    return dest


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


@slow
def test_zero1_trains(zero1_run):
    losses = _losses(zero1_run)
    assert len(losses) == 8 and _lowered(losses), losses
    ck = os.path.join(zero1_run, "checkpoints")
    assert sorted(os.listdir(ck)) == ["latest", "step_00000008"]  # keep_last 1 rotated step 4 away


@slow
def test_zero2_with_activation_checkpointing_trains(zero2_run):
    losses = _losses(zero2_run)
    assert len(losses) == 8 and _lowered(losses), losses


# the default run's representative of multi-rank DeepSpeed (2 CPU ranks, ZeRO-2, EP, checkpointing)
def test_expert_parallel_matches_data_parallel(ep2_run, zero2_run):
    """ep_size 2 on 2 ranks (each rank holds 2 of the 4 experts, tokens exchanged by all-to-all)
    trains the same model as plain data parallelism from the same initial weights."""
    import hybridseq as hs
    from safetensors.torch import load_file

    out = ep2_run
    ref, got = _metrics(zero2_run), _metrics(out)
    assert len(got) == len(ref) == 8
    for a, b in zip(ref, got):
        assert abs(a["loss"] - b["loss"]) < 1e-5 * abs(a["loss"]), (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * abs(a["grad_norm"]), (a, b)
    # the saved model is the ep_size 1 model with every expert gathered
    ck = os.path.join(out, "checkpoints", "step_00000008")
    model = hs.load_pretrained(ck)
    assert all(getattr(layer.block, "ep_size", 1) == 1 for layer in model.layers)
    a = load_file(os.path.join(ck, "model.safetensors"))
    b = load_file(os.path.join(zero2_run, "checkpoints", "step_00000008", "model.safetensors"))
    assert set(a) == set(b) and a["layers.1.block.w_in"].shape[0] == 4
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


@slow
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


@slow
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
    # Bounds relative to what training changed: ranks on different data would differ by about as
    # much as training moved the logits; float reduction order differs between 1 and 2 ranks and
    # Adam amplifies it on near-zero gradients (measured: median 0.6%, mean 1.5% of the change),
    # and a near-tie in MoE top-k routing may flip a few tokens (so median and mean, not max).
    diff = (a - b).abs()
    with torch.no_grad():
        moved = (a - hs.build_model(m1.cfg)(ids).logits).abs()
    assert diff.median().item() < 0.02 * moved.median().item(), (diff.median(), moved.median())
    assert diff.mean().item() < 0.05 * moved.mean().item(), (diff.mean(), moved.mean())


@slow
def test_sigkill_then_resume_reproduces_losses(tmp, ep2_killed, ep2_run):
    """The expert-parallel ZeRO-2 run, SIGKILLed after step 6 and resumed from its step-4 checkpoint
    (DeepSpeed's partitioned optimizer states, each rank's expert shards, data position, RNG)."""
    out = _copy(ep2_killed, tmp, "killed")
    # killed inside step 6 (after its optimizer step, before its log line); last save at step 4
    assert [r["step"] for r in _metrics(out)][-1] == 5
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["latest", "step_00000004"]
    _launch(tmp, out, "--resume", *EP2_ARGS, zero=2)
    ref, got = _metrics(ep2_run), _metrics(out)
    assert [r["step"] for r in got] == list(range(1, 9))
    for a, b in zip(ref, got):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"] and a["lr"] == b["lr"], (a, b)
    assert ref[-1]["eval_loss"] == got[-1]["eval_loss"]


@slow
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


def _same_continuation(ref_dir, got_dir, init_dir, resumed_from):
    """The run in ``got_dir`` (resumed at ``resumed_from`` on another topology) continues the
    uninterrupted run in ``ref_dir``: every later step's loss and learning rate within float
    tolerance, and the final models' logits far closer to each other than to the initial model's.
    1 rank and 2 ranks sum in another order, and the MoE balancing loss is computed per local
    batch, so they agree to about 1e-5, not bit for bit. (Evaluation draws batches of the local
    batch size, so its loss is not compared across ranks.)"""
    import hybridseq as hs

    ref, got = _metrics(ref_dir), _metrics(got_dir)
    assert [r["step"] for r in got if "loss" in r] == list(range(1, 9))
    for a, b in zip(ref, got):
        if a["step"] > resumed_from:
            assert abs(a["loss"] - b["loss"]) < 1e-4 * max(1.0, abs(a["loss"])), (a, b)
            assert abs(a["lr"] - b["lr"]) < 1e-12, (a, b)
    last = os.path.join("checkpoints", "step_00000008")
    m_ref, m_got = hs.load_pretrained(os.path.join(ref_dir, last)), hs.load_pretrained(os.path.join(got_dir, last))
    ids = torch.randint(0, m_ref.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = m_ref(ids).logits, m_got(ids).logits
        moved = (a - hs.load_pretrained(init_dir)(ids).logits).abs()
    assert (a - b).abs().max().item() < 1e-3 * moved.median().item(), ((a - b).abs().max(), moved.median())


# the default run's representative of resuming on another topology
def test_resume_on_one_rank_without_expert_parallelism(tmp, init_model, ep2_killed, ep2_run):
    """The 2-rank, ep_size 2 run resumed from its step-4 checkpoint on 1 rank with ep_size 1 and
    the same global batch continues as the uninterrupted 2-rank run: the optimizer moments come
    from the checkpoint's topology-independent copy (experts gathered, then each rank's slice)."""
    out = _copy(ep2_killed, tmp, "ep2-to-1")
    assert os.path.isfile(os.path.join(out, "checkpoints", "step_00000004", "portable_optimizer.safetensors"))
    proc = _launch(tmp, out, "--resume", "model.checkpointing=[mamba,moe]", "blocks.E.ep_size=1",
                   "train.batch_size=8", ranks=1, zero=2)
    assert "written by 2 ranks, ep_size 2" in proc.stdout + proc.stderr
    _same_continuation(ep2_run, out, init_model, 4)


@slow
def test_resume_on_one_rank_plain_zero2(tmp, init_model, zero2_run):
    """2 -> 1 ranks without expert parallelism (ZeRO-2 partitions of every parameter)."""
    out = os.path.join(tmp, "z2-killed")
    proc = _launch(tmp, out, "--init-from", init_model, "model.checkpointing=[mamba,moe]", zero=2,
                   env={"HS_KILL_AT": "6"}, check=False)
    assert proc.returncode != 0
    _launch(tmp, out, "--resume", "model.checkpointing=[mamba,moe]", "train.batch_size=8", ranks=1, zero=2)
    _same_continuation(zero2_run, out, init_model, 4)


@slow
def test_resume_on_two_ranks_without_expert_parallelism(tmp, init_model, ep2_killed, ep2_run):
    """Same ranks, ep_size 2 -> 1: the experts become data-parallel."""
    out = _copy(ep2_killed, tmp, "ep2-to-dp")
    _launch(tmp, out, "--resume", "model.checkpointing=[mamba,moe]", "blocks.E.ep_size=1", zero=2)
    _same_continuation(ep2_run, out, init_model, 4)


# ---- the DeepSpeed config (no processes) -----------------------------------------------------
TC = {"batch_size": 4, "grad_accum": 2, "grad_clip": 0.5, "precision": "auto", "lr": 3e-4,
      "betas": [0.9, 0.95], "weight_decay": 0.1, "steps": 100, "warmup_steps": None, "min_lr_ratio": 0.1}


def test_ds_config_autos_filled_from_train_section():
    from hybridseq.train.deepspeed_engine import read_ds_config, resolve_ds_config

    raw = read_ds_config(os.path.join(REPO, "launch", "zero2.json"))
    ds = resolve_ds_config(raw, TC, world_size=4, device_type="cuda")
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 32 and ds["gradient_clipping"] == 0.5
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}     # auto -> bf16 on CUDA
    assert "torch_autocast" not in resolve_ds_config(raw, TC, 4, "cpu")       # auto -> fp32 on CPU
    # a number in the DeepSpeed file wins; train_batch_size alone determines the accumulation
    ds = resolve_ds_config({**raw, "train_batch_size": 64}, TC, world_size=4, device_type="cpu")
    assert ds["gradient_accumulation_steps"] == 4
    off = resolve_ds_config(read_ds_config(os.path.join(REPO, "launch", "zero3-offload.json")), TC, 2, "cuda")
    assert off["optimizer"]["params"] == {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
    assert off["scheduler"]["params"]["total_num_steps"] == 100
    assert off["scheduler"]["params"]["warmup_num_steps"] == 10
    from omegaconf import OmegaConf  # a layout's deepspeed: section

    section = OmegaConf.create({"zero_optimization": {"stage": 3}, "gradient_clipping": "auto"})
    assert resolve_ds_config(read_ds_config(section), TC, 2, "cpu")["gradient_clipping"] == 0.5
    for name in ("zero1", "zero3"):
        assert resolve_ds_config(read_ds_config(os.path.join(REPO, "launch", f"{name}.json")), TC, 2, "cuda")


def test_ds_config_errors_name_the_key(tmp_path):
    from hybridseq.errors import ConfigError
    from hybridseq.train.deepspeed_engine import read_ds_config, resolve_ds_config

    with pytest.raises(ConfigError, match="train_batch_size"):
        resolve_ds_config({"train_batch_size": 30}, TC, world_size=4, device_type="cpu")
    with pytest.raises(ConfigError, match="fp16"):
        resolve_ds_config({"fp16": {"enabled": True}}, TC, world_size=1, device_type="cuda")
    with pytest.raises(ConfigError, match="offload_optimizer needs an 'optimizer'"):
        resolve_ds_config({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}, TC, 1, "cuda")
    # DeepSpeed's native bf16 would cast the fp32-only parameters: it becomes torch_autocast
    ds = resolve_ds_config({"bf16": {"enabled": True}}, TC, 1, "cpu")
    assert "bf16" not in ds and ds["torch_autocast"]["enabled"] is True
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_ds_config(str(bad))
    yml = tmp_path / "ds.yaml"
    yml.write_text("zero_optimization: {stage: 3}\ntrain_micro_batch_size_per_gpu: auto\n")
    assert read_ds_config(str(yml))["zero_optimization"]["stage"] == 3
