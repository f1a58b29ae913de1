"""The single-process trainer: learning, logs, checkpoints (atomic, rotated), exact resume,
Ctrl-C, AdamW groups and the LR schedule."""
import json
import os
import signal

import pytest
import torch

import hybridseq as hs
from hybridseq.train import Trainer, TrainingInterrupted, train
from hybridseq.train import checkpoint as ckpt
from hybridseq.train.metrics import read_metrics
from hybridseq.train.optim import param_groups
from hybridseq.train.schedule import default_warmup, lr_factor


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models train faster on one thread (and are not slowed by other processes)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(**train):
    base = {"task": {"name": "selective_copy", "seq_len": 8, "n_data": 2, "vocab": 4},
            "steps": 40, "batch_size": 16, "lr": 1e-2, "warmup_steps": 4, "eval_every": 20,
            "eval_batches": 2, "log_every": 5, "save_every": 0, "keep_last": 2}
    base.update(train)
    return hs.load_config({
        "name": "tiny",
        "model": {"d_model": 32},
        "blocks": {"M": {"kind": "mamba", "d_state": 4, "expand": 2}, "F": {"kind": "mlp", "d_ff": 64}},
        "layout": "M F",
        "train": base,
    })


def losses(path):
    return {r["step"]: r["loss"] for r in read_metrics(path) if "loss" in r}


def test_training_lowers_loss_writes_metrics_config_and_checkpoint(tmp_path):
    out = tmp_path / "run"
    summary = train(tiny(), out_dir=str(out), progress=False)
    recs = read_metrics(out / "metrics.jsonl")
    for key in ("step", "loss", "lr", "tokens_per_s", "acc", "grad_norm"):
        assert key in recs[0], key
    evals = [r for r in recs if "eval_loss" in r]
    assert [r["step"] for r in evals] == [20, 40] and all("eval_acc" in r and "eval_seq_acc" in r for r in evals)
    first, last = recs[0]["loss"], recs[-1]["loss"]
    assert last < first - 0.2, (first, last)
    assert summary["final_loss"] < summary["first_loss"]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
    # the resolved config and a checkpoint that hs.load_pretrained accepts
    assert hs.load_config(str(out / "config.yaml")).stack == ["M", "F"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000040"
    folder = out / "checkpoints" / "step_00000040"
    assert {"model.safetensors", "config.yaml", "trainer_state.json", "trainer_state.safetensors",
            "manifest.json"} <= set(os.listdir(folder))
    model = hs.load_pretrained(str(folder))
    from hybridseq.data import make_task

    x, y = make_task(tiny().train.task, seed=5).next_batch(4)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(x).logits.reshape(-1, model.vocab_size), y.reshape(-1))
    assert float(loss) < recs[0]["loss"]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    cfg = tiny(steps=16, log_every=1, save_every=5, eval_every=8)
    full = train(cfg, out_dir=str(tmp_path / "a"), progress=False)

    def crash(trainer, rec):
        if rec["step"] == 13:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(cfg, out_dir=str(tmp_path / "b"), progress=False, hooks=[crash]).fit()
    assert ckpt.latest_checkpoint(str(tmp_path / "b" / "checkpoints")).endswith("step_00000010")
    resumed = train(cfg, out_dir=str(tmp_path / "b"), resume=True, progress=False)
    assert resumed["resumed_from"] == 10
    a, b = losses(tmp_path / "a" / "metrics.jsonl"), losses(tmp_path / "b" / "metrics.jsonl")
    assert sorted(a) == sorted(b) == list(range(1, 17))  # steps 11-13 of the crashed run dropped
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5, abs=1e-6), step
    ev_a = [r["eval_loss"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if "eval_loss" in r]
    ev_b = [r["eval_loss"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if "eval_loss" in r]
    assert ev_a == pytest.approx(ev_b, rel=1e-5)
    assert full["eval_loss"] == pytest.approx(resumed["eval_loss"], rel=1e-5)
    # keep_last=2: only the two newest checkpoints remain
    names = sorted(n for n in os.listdir(tmp_path / "b" / "checkpoints") if n.startswith("step_"))
    assert names == ["step_00000015", "step_00000016"]


def test_interrupted_checkpoint_write_leaves_the_previous_one(tmp_path, monkeypatch):
    cfg = tiny(steps=10, save_every=5, eval_every=0)
    import hybridseq.train.engine as engine_mod

    real_save = engine_mod.save_state
    calls = {"n": 0}

    def failing_save(obj, folder, name):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: write part of a file, then fail
            with open(os.path.join(folder, name + ".safetensors"), "wb") as fh:
                fh.write(b"partial")
            raise OSError("disk full (simulated)")
        return real_save(obj, folder, name)

    monkeypatch.setattr(engine_mod, "save_state", failing_save)
    with pytest.raises(OSError, match="simulated"):
        train(cfg, out_dir=str(tmp_path), progress=False)
    root = tmp_path / "checkpoints"
    assert sorted(os.listdir(root)) == ["latest", "step_00000005"]  # no temp folder, no step 10
    assert (root / "latest").read_text().strip() == "step_00000005"
    monkeypatch.setattr(engine_mod, "save_state", real_save)
    from hybridseq.train.state_io import load_state

    state = load_state(str(root / "step_00000005"), ckpt.STATE)
    assert state["client"]["step"] == 5
    assert ckpt.verify(str(root / "step_00000005")) is None
    hs.load_pretrained(str(root / "step_00000005"))
    resumed = train(cfg, out_dir=str(tmp_path), resume=True, progress=False)
    assert resumed["resumed_from"] == 5 and resumed["steps"] == 10


def test_save_checkpoint_is_atomic_and_rotates(tmp_path):
    root = str(tmp_path)

    def good(tag):
        def write(folder):
            with open(os.path.join(folder, "state.txt"), "w") as fh:
                fh.write(tag)
        return write

    for step in (1, 2, 3):
        ckpt.save_checkpoint(root, step, good(str(step)), keep_last=2)
    assert sorted(os.listdir(root)) == ["latest", "step_00000002", "step_00000003"]

    def bad(folder):
        with open(os.path.join(folder, "state.txt"), "w") as fh:
            fh.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(root, 4, bad, keep_last=2)
    assert sorted(os.listdir(root)) == ["latest", "step_00000002", "step_00000003"]
    assert ckpt.latest_checkpoint(root).endswith("step_00000003")
    os.remove(os.path.join(root, "latest"))  # a missing marker falls back to the newest folder
    assert ckpt.latest_checkpoint(root).endswith("step_00000003")


def test_ctrl_c_stops_after_the_step_with_a_checkpoint(tmp_path):
    def ctrl_c(trainer, rec):
        if rec["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted) as e:
        Trainer(tiny(steps=10, eval_every=0), out_dir=str(tmp_path), progress=False, hooks=[ctrl_c]).fit()
    assert e.value.step == 3 and e.value.checkpoint.endswith("step_00000003")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    resumed = train(tiny(steps=10, eval_every=0), out_dir=str(tmp_path), resume=True, progress=False)
    assert resumed["resumed_from"] == 3 and resumed["steps"] == 10


def test_grad_accumulation_counts_tokens(tmp_path):
    s = train(tiny(steps=3, grad_accum=2, batch_size=4, eval_every=0, log_every=1), out_dir=str(tmp_path),
              progress=False)
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["tokens"] for r in recs] == [i * 2 * 4 * 10 for i in (1, 2, 3)]
    assert s["steps"] == 3


def test_param_groups():
    model = hs.build_model(hs.load_config({
        "model": {"d_model": 32, "tie_embeddings": False},
        "blocks": {"M": {"kind": "mamba", "d_state": 4}, "E": {"kind": "moe", "n_experts": 2, "top_k": 1},
                   "A": {"kind": "attention", "n_heads": 2, "bias": True}},
        "layout": "M E A", "train": {"task": "selective_copy"}}))
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert not decay & no_decay and decay | no_decay == set(names.values())
    assert any(n.endswith("A_log") for n in no_decay) and any(n.endswith(".D") for n in no_decay)
    assert "embed.weight" in no_decay and "lm_head.weight" in decay
    assert all(p.ndim >= 2 for p in groups["decay"]["params"])
    assert not any("norm" in n for n in decay)
    for n, p in model.named_parameters():
        if getattr(p, "_no_weight_decay", False):
            assert n in no_decay, n


def test_lr_schedule():
    kw = dict(total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, **kw) == pytest.approx(0.1)
    assert lr_factor(9, **kw) == pytest.approx(1.0)
    assert lr_factor(10, **kw) == pytest.approx(1.0)
    assert lr_factor(55, **kw) == pytest.approx(0.55)  # half way: r + (1 - r) / 2
    assert lr_factor(100, **kw) == pytest.approx(0.1) and lr_factor(500, **kw) == pytest.approx(0.1)
    f = [lr_factor(s, **kw) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(f, f[1:]))
    assert default_warmup(300) == 30 and default_warmup(5000) == 100 and default_warmup(300, 7) == 7


def test_metrics_are_json_lines(tmp_path):
    train(tiny(steps=5, eval_every=0, log_every=2), out_dir=str(tmp_path), progress=False)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 4, 5]


def test_resume_without_a_run_folder_is_a_clear_error(tmp_path):
    with pytest.raises(hs.HybridSeqError, match="no run folder"):
        train(tiny(), out_dir=str(tmp_path / "nope"), resume=True, progress=False)


def test_a_fresh_run_refuses_a_folder_with_checkpoints(tmp_path):
    train(tiny(steps=2, eval_every=0), out_dir=str(tmp_path), progress=False)
    with pytest.raises(hs.HybridSeqError, match="--resume"):
        train(tiny(steps=2, eval_every=0), out_dir=str(tmp_path), progress=False)
    done = train(tiny(steps=2, eval_every=0), out_dir=str(tmp_path), resume=True, progress=False)
    assert done["steps"] == 2 and done["first_loss"] is None  # nothing left to do


def test_init_from_loads_weights_and_refuses_a_foreign_model(tmp_path):
    from hybridseq.errors import HybridSeqError

    train(tiny(steps=5, eval_every=5), out_dir=str(tmp_path / "a"), progress=False)
    folder = tmp_path / "a" / "checkpoints" / "step_00000005"
    saved = hs.load_pretrained(str(folder)).state_dict()
    t = Trainer(tiny(steps=5), out_dir=str(tmp_path / "b"), progress=False, init_from=str(folder))
    for k, v in t.model.state_dict().items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0, msg=k)
    fresh = Trainer(tiny(steps=5), out_dir=str(tmp_path / "c"), progress=False)
    assert any(not torch.equal(v, saved[k]) for k, v in fresh.model.state_dict().items())
    wider = hs.load_config({**hs.load_config(str(folder / "config.yaml")), "model": {"d_model": 48}})
    with pytest.raises(HybridSeqError, match="--init-from .*do not match"):
        Trainer(wider, out_dir=str(tmp_path / "d"), progress=False, init_from=str(folder))


def test_log_records_moe_load_and_mfu_with_a_known_peak(tmp_path, monkeypatch):
    """metrics.jsonl carries per-layer MoE load (fractions summing to 1) and, when the device peak
    is known (here given by HYBRIDSEQ_PEAK_TFLOPS), MFU = 3 x FLOPs/token x tokens/s / peak."""
    monkeypatch.setenv("HYBRIDSEQ_PEAK_TFLOPS", "1")
    cfg = hs.load_config({**tiny(steps=4, eval_every=4, log_every=2),
                          "blocks": {"M": {"kind": "mamba", "d_state": 4},
                                     "E": {"kind": "moe", "n_experts": 4, "top_k": 2, "d_ff": 32}},
                          "layout": "M E"})
    t = Trainer(cfg, out_dir=str(tmp_path / "run"), progress=False)
    t.fit()
    recs = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    r = recs[-1]
    assert len(r["moe_load/1"]) == 4 and abs(sum(r["moe_load/1"]) - 1) < 1e-4
    assert r["moe_max_load"] >= 1.0
    assert t.flops_per_token == t.model.flops_per_token(t.task.seq_len) > 0
    assert r["mfu"] == pytest.approx(3 * t.flops_per_token * r["tokens_per_s"] / 1e12, rel=1e-6)


def test_no_mfu_without_a_known_peak(tmp_path, monkeypatch):
    monkeypatch.delenv("HYBRIDSEQ_PEAK_TFLOPS", raising=False)
    train(tiny(steps=2, eval_every=2, log_every=1), out_dir=str(tmp_path / "run"), progress=False)
    assert all("mfu" not in r for r in read_metrics(tmp_path / "run" / "metrics.jsonl"))


def test_tensorboard_switch(tmp_path):
    """train.tensorboard: true writes event files, or names the missing package clearly."""
    import importlib.util

    from hybridseq.errors import HybridSeqError

    cfg = tiny(steps=2, eval_every=2, log_every=1, tensorboard=True)
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(HybridSeqError, match="tensorboard package"):
            train(cfg, out_dir=str(tmp_path / "run"), progress=False)
    else:
        train(cfg, out_dir=str(tmp_path / "run"), progress=False)
        assert any(f.startswith("events.") for f in os.listdir(tmp_path / "run" / "tensorboard"))
