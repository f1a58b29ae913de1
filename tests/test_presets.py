"""The shipped layouts: each loads, builds, counts its parameters exactly, trains a step on its
own task; the published sizes quoted in each file's comments are reached by the overrides the
comments give."""
import glob
import os
import re
import shlex

import pytest
import torch

import hybridseq as hs
from hybridseq.data import make_task
from hybridseq.train.accounting import account
from hybridseq.train.trainer import lm_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = sorted(glob.glob(os.path.join(ROOT, "layouts", "*.yaml")))
NAMES = ["mamba", "mamba2", "transformer", "moe-mamba", "blackmamba", "jamba", "samba", "nemotron-h",
         "granite-4-h", "text-hybrid"]

# Published (total, active) parameters for the commands in each file's comments, in order.
PUBLISHED = {
    "mamba": [(130e6, 130e6), (2.8e9, 2.8e9)],
    "transformer": [(125e6, 125e6), (1.3e9, 1.3e9)],
    "blackmamba": [(1.5e9, 340e6), (2.8e9, 630e6)],
    "jamba": [(52e9, 12e9)],
    "samba": [(421e6, 421e6), (1.3e9, 1.3e9)],
    "nemotron-h": [(8e9, 8e9)],
    "mamba2": [(130e6, 130e6)],
}


def comment_commands(path):
    """The `hybridseq show ...` commands written in a preset's comment block (with \\ joins)."""
    lines = [line[1:].strip() for line in open(path) if line.startswith("#")]
    text = "\n".join(lines).replace("\\\n", " ")
    return [shlex.split(line)[2:] for line in text.splitlines() if line.startswith("hybridseq show")]


def test_every_preset_is_shipped():
    assert sorted(os.path.basename(p)[:-5] for p in PRESETS) == sorted(NAMES)


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: os.path.basename(p))
def test_preset_builds_counts_and_trains_a_step(path):
    cfg = hs.load_config(path)
    assert cfg.name == os.path.basename(path)[:-5]
    model = hs.build_model(cfg)
    real = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    totals = account(cfg)["totals"]
    assert totals["params"] == real == model.num_params()
    assert totals["active_params"] == model.num_params(active=True) <= real
    assert real < 2_000_000  # tiny by default: trains on a CPU in minutes
    if cfg.train.task.name == "text":  # its data is a prepared folder (scripts/text_example.sh)
        x = torch.randint(0, model.vocab_size_unpadded, (2, 33))
        x, y = x[:, :-1], x[:, 1:]
    else:
        task = make_task(cfg.train.task, seed=0)
        assert task.name == "selective_copy"
        x, y = task.next_batch(2)
    out = model(x)
    loss = lm_loss(out.logits, y) + out.aux_loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_sizes_in_the_comments(name):
    path = os.path.join(ROOT, "layouts", f"{name}.yaml")
    commands = comment_commands(path)
    assert len(commands) == len(PUBLISHED[name]), commands
    for argv, (total, active) in zip(commands, PUBLISHED[name]):
        assert argv[0] == f"layouts/{name}.yaml"
        t = account(hs.load_config(os.path.join(ROOT, argv[0]), overrides=argv[1:]))["totals"]
        assert t["params"] == pytest.approx(total, rel=0.06), (argv, t["params"])
        assert t["active_params"] == pytest.approx(active, rel=0.06), (argv, t["active_params"])


def test_comment_blocks_describe_the_published_models():
    for path in PRESETS:
        head = open(path).read().split("\nname:")[0]
        assert re.search(r"Published (sizes|size|setup)", head), path
        assert "hybridseq show" in head, path
