"""``hybridseq plan``: memory per GPU against hand-computed values of the documented formula."""
from __future__ import annotations

import json

import pytest

from hybridseq.cli import main
from hybridseq.config import load_config
from hybridseq.errors import HybridSeqError
from hybridseq.train.plan import GIB, activation_elements_per_token, expert_params, plan

LAYOUT = {
    "name": "plan-tiny",
    "model": {"d_model": 64, "vocab_size": 100},
    "blocks": {"M": {"kind": "mamba", "d_state": 8, "expand": 2},
               "E": {"kind": "moe", "n_experts": 4, "top_k": 2, "d_ff": 96},
               "F": {"kind": "mlp", "d_ff": 128}},
    "layout": "MEF",
    "train": {"task": {"name": "selective_copy", "seq_len": 32}, "batch_size": 4},
}


@pytest.fixture(scope="module")
def cfg():
    return load_config(LAYOUT)


def test_expert_params_and_activations_by_hand(cfg):
    assert expert_params(cfg) == 4 * 3 * 64 * 96          # E * (n_in + 1) * d * d_ff, swiglu
    d, e, r, n = 64, 2, 4, 8                              # dt_rank = ceil(64 / 16)
    mamba = 2 * d + 7 * e * d + r + 2 * n
    moe = 2 * d + 2 * (2 * d + 3 * 96) + 4
    mlp = 2 * d + 3 * 128
    per = activation_elements_per_token(cfg)
    assert per == {"blocks": mamba + moe + mlp, "head": 300}


def test_zero_stages_by_hand(cfg):
    from hybridseq.train.accounting import account

    P = account(cfg)["totals"]["params"]
    Pe = expert_params(cfg)
    Pd = P - Pe
    G = 4
    p0 = plan(cfg, gpus=G, zero=0)
    assert p0["params"] == P and p0["expert_params"] == Pe
    assert p0["params_gib"] * GIB == pytest.approx(4 * P)
    assert p0["grads_gib"] * GIB == pytest.approx(4 * P)
    assert p0["optimizer_gib"] * GIB == pytest.approx(8 * P)
    p1, p2, p3 = (plan(cfg, gpus=G, zero=z) for z in (1, 2, 3))
    assert p1["optimizer_gib"] * GIB == pytest.approx(8 * P / G) and p1["grads_gib"] == p0["grads_gib"]
    assert p2["grads_gib"] * GIB == pytest.approx(4 * P / G) and p2["params_gib"] == p0["params_gib"]
    assert p3["params_gib"] * GIB == pytest.approx(4 * P / G)
    assert p0["total_gib"] > p1["total_gib"] > p2["total_gib"] > p3["total_gib"]
    # expert parallelism: each rank owns Pe / E experts, sharded over G / E ranks
    pe = plan(cfg, gpus=G, zero=1, ep=2)
    assert pe["params_gib"] * GIB == pytest.approx(4 * (Pd + Pe / 2))
    assert pe["optimizer_gib"] * GIB == pytest.approx(8 * (Pd / G + (Pe / 2) / (G / 2)))
    # activations: B * L * (2 bytes * blocks + 2 * head), bf16
    per = activation_elements_per_token(cfg)
    L = p0["seq_len"]  # the task's batch length (selective copy: seq_len + 2 n_data)
    assert L == 48
    assert p0["activations_gib"] * GIB == pytest.approx(4 * L * (2 * per["blocks"] + 2 * per["head"]))
    off = plan(cfg, gpus=G, zero=3, offload=True)
    assert off["optimizer_gib"] == 0 and off["host_optimizer_gib"] == pytest.approx(p3["optimizer_gib"])


def test_checkpointing_shrinks_activations(cfg):
    ck = load_config(LAYOUT, overrides=["model.checkpointing=[mamba,moe]"])
    assert activation_elements_per_token(ck)["blocks"] == 64 + 64 + (2 * 64 + 3 * 128)
    assert plan(ck, gpus=1, zero=2)["activations_gib"] < plan(cfg, gpus=1, zero=2)["activations_gib"]


def test_bad_settings_raise(cfg):
    with pytest.raises(HybridSeqError, match="--ep 3 must divide"):
        plan(cfg, gpus=4, zero=1, ep=3)
    with pytest.raises(HybridSeqError, match="--zero 1 or 2"):
        plan(cfg, gpus=4, zero=3, ep=2)
    with pytest.raises(HybridSeqError, match="n_experts"):
        plan(cfg, gpus=8, zero=1, ep=8)


def test_cli(tmp_path, capsys):
    import yaml

    path = tmp_path / "l.yaml"
    path.write_text(yaml.safe_dump(LAYOUT))
    assert main(["plan", str(path), "--gpus", "2", "--zero", "3", "--micro-batch", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["zero"] == 3 and out["micro_batch"] == 2 and out["seq_len"] == 48
    assert main(["plan", str(path), "--gpus", "2", "--zero", "2", "--gpu-mem", "80"]) == 0
    text = capsys.readouterr().out
    assert "total per GPU" in text and "fits in 80 GiB" in text
    assert main(["plan", str(path), "--gpus", "3", "--ep", "2"]) == 2
    assert "must divide" in capsys.readouterr().err
