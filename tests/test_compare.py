"""`hybridseq compare`: equal-terms runs, the report (markdown, json, PNG), --match, reuse of
finished runs, and a bad layout among good ones. CPU, tiny models, a few steps."""
from __future__ import annotations

import importlib.util
import json
import os
import re

import pytest

from hybridseq.cli import main

MAMBA = """
name: tiny-mamba
model: {d_model: 16}
blocks:
  M: {kind: mamba, d_state: 4, expand: 2}
layout: "M"
train:
  task: {name: induction_heads, seq_len: 8, vocab: 6}
  steps: 3
  batch_size: 2
  lr: 3e-3
  eval_every: 2
  log_every: 1
  eval_batches: 1
"""
# its own train section differs on purpose: compare must train it with the first layout's
ATTENTION = """
name: tiny-attn
model: {d_model: 32}
blocks:
  A: {kind: attention, n_heads: 2, rope_theta: 10000.0}
  F: {kind: mlp, d_ff: 64}
layout: "A F"
train: {steps: 50, batch_size: 64}
"""
BAD = """
name: broken
model: {d_model: 16}
blocks:
  A: {kind: attention, n_heads: 3}
layout: "A"
"""
# loads fine but cannot train here (no flash-attn package / no CUDA): fails at run time
NO_BACKEND = """
name: no-backend
model: {d_model: 16}
blocks:
  A: {kind: attention, n_heads: 2, impl: flash_attn}
  F: {kind: mlp, d_ff: 24}
layout: "A F"
"""
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COMMON = ["--eval-lengths", "1x,2x", "--decode-tokens", "2", "--decode-batch", "1", "--sweep-iters", "1",
          "--no-progress", "--match", "params", "--seeds", "2"]


def _write(folder, name, text):
    path = folder / name
    path.write_text(text)
    return str(path)


def _table_rows(md: str) -> list[str]:
    """The body rows of the table under '## Summary' (header and rule left out)."""
    section = md.split("## Summary", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("|")][2:]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """One comparison of two good layouts and a broken one (the expensive part, shared)."""
    folder = tmp_path_factory.mktemp("compare")
    m = _write(folder, "mamba.yaml", MAMBA)
    a = _write(folder, "attn.yaml", ATTENTION)
    bad = _write(folder, "broken.yaml", BAD)
    nob = _write(folder, "nobackend.yaml", NO_BACKEND)
    out = folder / "out"
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["compare", m, nob, a, bad, "--out", str(out), *COMMON])
    return {"folder": folder, "out": out, "rc": rc, "layouts": (m, a, bad), "stderr": err.getvalue()}


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn installed")
def test_bad_layout_is_reported_and_others_kept(compared):
    out = compared["out"]
    assert compared["rc"] == 2
    err = compared["stderr"]
    assert "2 of 4 layouts failed" in err
    assert "broken" in err and "n_heads=3 does not divide d_model=16" in err
    assert "no-backend" in err and "flash_attn" in err
    report = json.loads((out / "report.json").read_text())
    fails = {f["label"]: f for f in report["failures"]}
    assert set(fails) == {"no-backend", "broken"}
    assert "n_heads=3 does not divide d_model=16" in fails["broken"]["error"]
    assert fails["broken"]["failed_at"] == "load"
    assert fails["no-backend"]["failed_at"] == "run" and "flash_attn" in fails["no-backend"]["error"]
    assert (out / "runs" / "no-backend" / "seed0" / "error.txt").is_file()
    status = {x["label"]: x["status"] for x in report["layouts"]}
    assert status == {"tiny-mamba": "ok", "no-backend": "failed", "tiny-attn": "ok", "broken": "failed"}
    for label in ("tiny-mamba", "tiny-attn"):
        for seed in (0, 1):
            assert (out / "runs" / label / f"seed{seed}" / "done.json").is_file()
    md = (out / "report.md").read_text()
    assert "## Failures" in md and "broken" in md and "n_heads=3" in md
    rows = _table_rows(md)
    assert len(rows) == 4 and "FAILED" in rows[1] and "FAILED" in rows[3] and "FAILED" not in rows[2]


def test_report_json_has_every_metric(compared):
    report = json.loads((compared["out"] / "report.json").read_text())
    env = report["environment"]
    for key in ("torch", "hybridseq", "python", "device"):
        assert env.get(key)
    assert report["train"]["steps"] == 3 and report["train"]["batch_size"] == 2  # the first layout's
    for item in [x for x in report["layouts"] if x["status"] == "ok"]:
        s = item["summary"]
        for key in ("final_eval_loss", "best_eval_loss", "eval_acc", "train_tokens_per_s", "peak_memory_bytes",
                    "decode_tokens_per_s", "cache_bytes_per_seq", "params", "active_params",
                    "flops_per_token", "state_bytes"):
            assert key in s, (item["label"], key)
            assert s[key]["n"] == 2 and s[key]["std"] >= 0
        assert s["best_eval_loss"]["mean"] <= s["final_eval_loss"]["mean"] + 1e-9
        assert s["train_tokens_per_s"]["mean"] > 0 and s["decode_tokens_per_s"]["mean"] > 0
        assert s["tokens_seen"]["mean"] == 3 * 2 * 8  # equal budget: steps x batch x length
        assert [x["seq_len"] for x in item["lengths"]] == [8, 16]
        assert all(x["status"] == "ok" and 0 <= x["eval_acc"]["mean"] <= 1 for x in item["lengths"])
        assert [r["seq_len"] for r in item["sweep"]] == [8, 16]
        assert all(r["train_tokens_per_s"] > 0 for r in item["sweep"])
        seeds = sorted(r["seed"] for r in item["runs"])
        assert seeds == [0, 1]
    # equal terms: both layouts' seed-k runs trained with the same train section and train.seed
    # (the task's data order is a function of train.seed only)
    import yaml

    for seed in (0, 1):
        cfgs = [yaml.safe_load((compared["out"] / "runs" / label / f"seed{seed}" / "config.yaml").read_text())
                for label in ("tiny-mamba", "tiny-attn")]
        assert cfgs[0]["train"] == cfgs[1]["train"] and cfgs[0]["train"]["seed"] == seed


def test_match_params_within_5_percent(compared):
    import hybridseq as hs
    from hybridseq.config import load_config

    report = json.loads((compared["out"] / "report.json").read_text())
    ref, other = report["layouts"][0], report["layouts"][2]
    assert ref["match"]["overrides"] == []
    m = other["match"]
    assert m["mode"] == "params" and abs(m["rel_diff"]) <= 0.05
    assert m["d_model"] != m["d_model_original"] and other["d_model"] == m["d_model"]
    assert abs(m["count_original"] - m["target"]) > 0.05 * m["target"]  # matching was needed
    # the real models agree with the closed forms
    real = []
    for path, item in zip(compared["layouts"][:2], (ref, other)):
        cfg = load_config(path, overrides=item["match"]["overrides"] + ["train.task.name=induction_heads",
                                                                         "train.task.seq_len=8",
                                                                         "train.task.vocab=6"])
        model = hs.build_model(cfg)
        real.append(sum(p.numel() for p in model.parameters()))
    assert abs(real[1] - real[0]) <= 0.05 * real[0]
    assert real[1] == m["count"] and real[0] == m["target"]


def test_match_presets_closed_form():
    from hybridseq.compare.match import count_params
    from hybridseq.compare.runner import CompareOptions, load_entries

    for mode in ("params", "active_params"):
        entries = load_entries(["layouts/mamba.yaml", "layouts/transformer.yaml", "layouts/blackmamba.yaml"],
                               CompareOptions(out="unused", match=mode), log=lambda msg: None)
        target = count_params(entries[0].cfg, mode)
        for e in entries:
            assert e.ok, e.error
            assert abs(count_params(e.cfg, mode) - target) <= 0.05 * target
            if e.label == "transformer":  # 64 -> 72: steps of 8 in d_model suffice here
                assert e.match.d_model != e.match.d_model_original
            for spec in e.cfg.blocks.values():
                if spec.kind == "attention":
                    assert e.cfg.model.d_model % spec.n_heads == 0


def test_pngs_are_valid(compared):
    import matplotlib.image as mpimg

    out = compared["out"]
    md = (out / "report.md").read_text()
    names = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md)
    assert sorted(names) == sorted(["loss_curves.png", "accuracy_vs_length.png", "throughput_vs_seqlen.png",
                                    "memory_vs_seqlen.png"])
    for name in names:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE
        img = mpimg.imread(str(out / name))
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_rerun_reuses_finished_runs(compared, capfd):
    out = compared["out"]
    m, a, _ = compared["layouts"]
    done = {p: (os.stat(p).st_mtime_ns, p.read_bytes()) for p in out.glob("runs/*/seed*/done.json")}
    logs = {p: os.stat(p).st_mtime_ns for p in out.glob("runs/tiny-*/seed*/metrics.jsonl")}
    assert len(done) == 4 and len(logs) == 4
    capfd.readouterr()
    rc = main(["compare", m, a, "--out", str(out), *COMMON])
    err = capfd.readouterr().err
    assert rc == 0
    assert err.count("finished earlier, reusing") == 4
    assert "training" not in err
    for p, (mtime, data) in done.items():
        assert os.stat(p).st_mtime_ns == mtime and p.read_bytes() == data
    for p, mtime in logs.items():
        assert os.stat(p).st_mtime_ns == mtime
    md = (out / "report.md").read_text()
    rows = _table_rows(md)
    assert len(rows) == 2 and rows[0].startswith("| tiny-mamba") and rows[1].startswith("| tiny-attn")
    assert "## Failures" not in md


def test_usage_errors_exit_2(tmp_path, capfd):
    assert main(["compare", "--out", str(tmp_path / "o")]) == 2
    assert "at least one LAYOUT" in capfd.readouterr().err
    assert main(["compare", "layouts/mamba.yaml", "--out", str(tmp_path / "o"), "--eval-lengths", "2y"]) == 2
    assert "--eval-lengths" in capfd.readouterr().err
    assert main(["compare", "layouts/mamba.yaml", "--out", str(tmp_path / "o"), "--match", "flops"]) == 2
    assert main(["compare", "layouts/mamba.yaml", "--out", str(tmp_path / "o"), "blocks.Z.d_ff=8"]) == 2
    assert "none of the layouts" in capfd.readouterr().err


def test_parse_lengths():
    from hybridseq.compare.measure import parse_lengths

    assert parse_lengths("1x,2x,0.5x,64", 32) == [16, 32, 64]
    assert parse_lengths(None, 7) == [7]
    with pytest.raises(ValueError):
        parse_lengths("0x", 8)


def test_match_keeps_heads_valid():
    """3 RoPE heads: d_model (a multiple of 8) must be a multiple of 3 with an even head dim: 24,
    48, 72, ...; an explicit head_dim tied to d_model follows it."""
    from hybridseq.compare.match import count_params, match_one, rescale_settings
    from hybridseq.config import load_config

    base = {"model": {"d_model": 48}, "layout": "A F",
            "blocks": {"A": {"kind": "attention", "n_heads": 3, "head_dim": 16}, "F": {"kind": "mlp"}},
            "train": {"task": {"name": "induction_heads", "seq_len": 8, "vocab": 6}}}
    cfg = load_config(base)
    assert rescale_settings(cfg, 40) is None            # 40 / 3 is not whole
    assert rescale_settings(cfg, 56) is None
    assert rescale_settings(cfg, 72)["blocks.A.head_dim"] == 24
    s = rescale_settings(cfg, 96)
    assert s["model.d_model"] == 96 and s["blocks.A.head_dim"] == 32
    target = count_params(load_config(base, overrides=["model.d_model=144", "blocks.A.head_dim=48"]))
    r = match_one(cfg, target, "params")
    assert abs(r.rel_diff) <= 0.05 and r.d_model % 24 == 0 and r.d_model != 48
    matched = load_config(base, overrides=r.overrides)
    assert matched.blocks.A.head_dim * 3 == matched.model.d_model
