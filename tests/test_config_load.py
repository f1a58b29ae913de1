"""load_config on valid inputs: files, dicts, DictConfigs, defaults, interpolation, overrides, the
three layout forms, round trip, save_config, config_hash and the derived helpers."""
import copy
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import hybridseq as hs
from hybridseq.blocks.mamba import MambaSpec
from hybridseq.config import (BLOCK_DEFAULTS, MODEL_DEFAULTS, TASK_DEFAULTS, TRAIN_DEFAULTS, HybridConfig,
                              block_kinds, config_hash, load_config, resolve_ffn_dim, save_config)

DATA = Path(__file__).parent / "data" / "layouts"
HYBRID = DATA / "hybrid.yaml"

TINY = {
    "model": {"d_model": 32},
    "blocks": {"M": {"kind": "mamba"}, "E": {"kind": "moe", "n_experts": 4}},
    "layout": "(M E)*2",
}


def test_file_loads_with_defaults_interpolation_and_stages():
    cfg = load_config(HYBRID)
    assert isinstance(cfg, HybridConfig)
    assert cfg.name == "tiny-hybrid"
    assert cfg.description.startswith("Mamba + MoE")
    assert cfg.stack == ["M", "E", "M", "E", "A", "M", "E", "M", "E", "mlp_wide"]
    assert cfg.stage_starts == [0, 5]
    assert cfg.blocks.E.d_ff == 48  # ${model.d_model}
    assert cfg.blocks.E.top_k == 2 and cfg.blocks.E.router == BLOCK_DEFAULTS["moe"]["router"]
    assert cfg.blocks.M.d_conv == BLOCK_DEFAULTS["mamba"]["d_conv"]
    assert cfg.blocks.A.window == 16 and cfg.blocks.A.head_dim is None
    assert cfg.model.norm == MODEL_DEFAULTS["norm"]
    assert cfg.train.task == {"name": "mqar", "seq_len": 32, "n_pairs": 4, "vocab": TASK_DEFAULTS["mqar"]["vocab"]}
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)  # int accepted where a float is expected
    assert cfg.train.batch_size == TRAIN_DEFAULTS["batch_size"]
    assert cfg.layout == "(M E)*2 A | (ME)*2 mlp_wide"  # kept as written
    assert cfg.deepspeed is None
    assert list(cfg.keys()) == ["name", "description", "model", "blocks", "layout", "train", "deepspeed",
                                "stack", "stage_starts"]
    assert block_kinds(cfg) == ["mamba", "moe", "mamba", "moe", "attention", "mamba", "moe", "mamba", "moe", "mlp"]


def test_top_level_api_and_str_path():
    cfg = hs.load_config(str(HYBRID), overrides=["model.d_model=64"])
    assert cfg.model.d_model == 64 and cfg.blocks.E.d_ff == 64  # the interpolation follows the override


def test_name_defaults():
    assert load_config(DATA / "megatron.yaml").name == "megatron"  # the file stem
    assert load_config(TINY).name == "model"


def test_dict_and_dictconfig_sources_and_defaults():
    cfg = load_config(TINY)
    assert cfg.stack == ["M", "E", "M", "E"] and cfg.stage_starts == [0]
    assert cfg.train.task == {"name": TRAIN_DEFAULTS["task"], **TASK_DEFAULTS[TRAIN_DEFAULTS["task"]]}
    assert set(cfg.blocks.M) == {"kind", *BLOCK_DEFAULTS["mamba"]}
    assert load_config(OmegaConf.create(TINY)) == cfg
    assert TINY["layout"] == "(M E)*2" and "stack" not in TINY  # the source is not modified


def test_round_trip():
    cfg = load_config(HYBRID, overrides=["train.task=selective_copy", "blocks.E.capacity_factor=2"])
    again = load_config(cfg.to_dict())
    assert again == cfg
    assert load_config(cfg) == cfg


def test_round_trip_megatron_and_list(tmp_path):
    for cfg in (load_config(DATA / "megatron.yaml"),
                load_config({**TINY, "layout": ["M E", "|", "(M E)*2"], "deepspeed": {"zero_optimization": {"stage": 2}}})):
        assert load_config(cfg.to_dict()) == cfg


def test_given_stack_is_recomputed():
    cfg = load_config({**TINY, "stack": ["E"], "stage_starts": [0, 1]})
    assert cfg.stack == ["M", "E", "M", "E"] and cfg.stage_starts == [0]


@pytest.mark.parametrize(
    "overrides, check",
    [
        (["model.d_model=512"], lambda c: c.model.d_model == 512),
        (["blocks.E.top_k=1"], lambda c: c.blocks.E.top_k == 1),
        (["blocks.E.capacity_factor=1.25"], lambda c: c.blocks.E.capacity_factor == 1.25),
        (["blocks.M.kind=mlp"], lambda c: c.blocks.M.kind == "mlp" and "d_state" not in c.blocks.M),
        (["train.task=mqar"], lambda c: c.train.task.name == "mqar" and c.train.task.n_pairs == 8),
        (["train.task=mqar", "train.task.seq_len=64"], lambda c: c.train.task.seq_len == 64),
        (["train.task.vocab=8"], lambda c: c.train.task == {**TASK_DEFAULTS["selective_copy"], "name": "selective_copy", "vocab": 8}),
        (["train.lr=3e-4"], lambda c: c.train.lr == 3e-4),
        (["train.betas=[0.8,0.9]"], lambda c: list(c.train.betas) == [0.8, 0.9]),
        (["train.warmup_steps=null"], lambda c: c.train.warmup_steps is None),
        (["layout=M E A"], lambda c: c.stack == ["M", "E", "A"]),
        (["layout=[M, E]"], lambda c: c.stack == ["M", "E"]),
        (["blocks.A={kind: attention, n_heads: 2}", "layout=(M A)*2"], lambda c: c.stack == ["M", "A"] * 2),
        (["name=run7", "description=hello"], lambda c: c.name == "run7" and c.description == "hello"),
        (["deepspeed.zero_optimization.stage=2"], lambda c: c.deepspeed.zero_optimization.stage == 2),
        (["model.d_model=${blocks.E.n_experts}"], lambda c: c.model.d_model == 4),
        ({"model.d_model": 16}, lambda c: c.model.d_model == 16),
    ],
)
def test_overrides(overrides, check):
    base = {**TINY, "blocks": {**TINY["blocks"], "A": {"kind": "attention", "n_heads": 2}}}
    assert check(load_config(base, overrides=overrides))


def test_override_of_megatron_default_block():
    cfg = load_config(DATA / "megatron.yaml", overrides=["blocks.M.d_state=4", "layout.megatron=M*M"])
    assert cfg.blocks.M.d_state == 4 and cfg.stack == ["M", "A", "M"]


def test_megatron_layout_adds_default_blocks_unless_given():
    cfg = load_config(DATA / "megatron.yaml")
    assert cfg.stack == ["M", "F", "M", "A", "F", "M", "F", "M", "F"]
    assert cfg.stage_starts == [0, 5]
    assert list(cfg.blocks) == ["A", "M", "F"]  # E is not used: not added
    assert cfg.blocks.A.n_heads == 2 and cfg.blocks.A.rope_theta is None  # the user's spec
    assert cfg.blocks.F == {"kind": "mlp", **BLOCK_DEFAULTS["mlp"]}
    assert cfg.layout == {"megatron": "M-M*-|M-M-"}


def test_interpolation_across_sections():
    cfg = load_config({
        **TINY,
        "blocks": {"M": {"kind": "mamba", "d_state": "${train.task.vocab}"}},
        "layout": "M",
        "train": {"task": {"name": "induction_heads", "vocab": 8}, "steps": "${blocks.M.d_state}"},
    })
    assert cfg.blocks.M.d_state == 8 and cfg.train.steps == 8


def test_unused_blocks_are_fine():
    cfg = load_config({**TINY, "layout": "M"})
    assert "E" in cfg.blocks and cfg.stack == ["M"]


def test_save_config_writes_resolved_yaml_atomically(tmp_path):
    cfg = load_config(HYBRID)
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert "${" not in path.read_text()
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temp file left behind
    assert load_config(path) == cfg
    save_config(cfg.to_dict(), path)  # a dict works too, and replaces the file
    assert load_config(path) == cfg


def test_config_hash():
    cfg = load_config(HYBRID)
    h = config_hash(cfg)
    base = cfg.to_dict()  # resolved: reloads skip the interpolation pass
    assert config_hash(base) == h
    assert len(h) == 64 and int(h, 16) >= 0
    same = [
        ["blocks.M.impl=torch", "blocks.E.impl=loop", "blocks.A.impl=sdpa"],
        ["train.steps=99", "train.task=selective_copy", "name=other"],
        ["blocks.M.dt_min=0.002", "model.init_std=0.01", "blocks.E.aux_loss_coef=0.1"],
        ["layout=(M E)*2 A (ME)*2 mlp_wide"],                 # stage marks do not change the model
    ]
    for ov in same:
        assert config_hash(load_config(base, overrides=ov)) == h, ov
    # gelu with d_ff null resolves to 4 * d_model; explicit 4 * d_model hashes alike
    assert config_hash(load_config(base, overrides=["blocks.mlp_wide.d_ff=null", "model.d_model=24"])) == \
        config_hash(load_config(base, overrides=["blocks.mlp_wide.d_ff=96", "model.d_model=24"]))
    different = [
        ["model.d_model=64"], ["blocks.M.d_state=4"], ["blocks.E.top_k=1"], ["blocks.A.window=null"],
        ["layout=(M E)*2 A | (ME)*2"], ["layout=(E M)*2 A | (ME)*2 mlp_wide"], ["model.vocab_size=65"],
    ]
    for ov in different:
        assert config_hash(load_config(base, overrides=ov)) != h, ov
    # symbol names do not count: the same blocks under other names hash alike
    renamed = copy.deepcopy(base)
    renamed["blocks"]["X"] = renamed["blocks"].pop("M")
    renamed["layout"] = "(X E)*2 A | (X E)*2 mlp_wide"
    assert config_hash(load_config(renamed)) == h


@pytest.mark.parametrize(
    "d_model, d_ff, activation, expected",
    [(64, None, "swiglu", 176), (48, None, "swiglu", 128), (3, None, "swiglu", 8), (64, None, "gelu", 256),
     (64, 100, "swiglu", 100), (512, None, "swiglu", 1368)],
)
def test_resolve_ffn_dim(d_model, d_ff, activation, expected):
    assert resolve_ffn_dim(d_model, d_ff, activation) == expected


def test_resolve_ffn_dim_unknown_activation():
    with pytest.raises(ValueError, match="relu"):
        resolve_ffn_dim(64, None, "relu")
    assert resolve_ffn_dim(64, None, "relu2") == 256


@pytest.mark.parametrize("d_model, dt_rank, expected", [(64, "auto", 4), (65, "auto", 5), (1, "auto", 1), (64, 7, 7)])
def test_resolve_dt_rank(d_model, dt_rank, expected):
    assert MambaSpec(dt_rank=dt_rank).dims(d_model)[1] == expected


def test_dict_holding_omegaconf_values_loads_like_plain_data():
    """{**cfg, ...} keeps DictConfig/ListConfig values (e.g. train.betas): they are data, not errors."""
    cfg = load_config({"model": {"d_model": 32}, "blocks": {"M": {"kind": "mamba"}}, "layout": "M*2"})
    again = load_config({**cfg, "model": {"d_model": 48}})
    assert again.model.d_model == 48 and list(again.train.betas) == [0.9, 0.95] and again.stack == ["M", "M"]
