"""Malformed layout files, configs and overrides: each must raise ConfigError with a message that
names the file and the key, says what is wrong and what is allowed (and, for patterns, the
column with a caret under it)."""
import copy
from pathlib import Path

import pytest
import yaml

from hybridseq.config import load_config
from hybridseq.errors import ConfigError, HybridSeqError

DATA = Path(__file__).parent / "data" / "layouts"

BASE = {
    "model": {"d_model": 64},
    "blocks": {
        "M": {"kind": "mamba"},
        "E": {"kind": "moe", "n_experts": 4},
        "A": {"kind": "attention", "n_heads": 4},
    },
    "layout": "(M E)*2 A",
}
DELETE = object()


def _patched(patch: dict) -> dict:
    def merge(dst, src):
        for k, v in src.items():
            if v is DELETE:
                dst.pop(k, None)
            elif isinstance(v, dict) and isinstance(dst.get(k), dict) and v:
                merge(dst[k], v)
            else:
                dst[k] = v
        return dst
    return merge(copy.deepcopy(BASE), patch)


def caret_column(message: str) -> int:
    lines = message.splitlines()
    carets = [ln for ln in lines if ln.strip() == "^"]
    assert len(carets) == 1, message
    return carets[0].index("^") - 2 + 1


def test_base_is_valid():
    assert load_config(BASE).stack == ["M", "E", "M", "E", "A"]


# id -> (patch of BASE, or raw YAML text; the key the message names; fragments it holds)
CASES = {
    "top-level typo": ({"modle": {"d_model": 32}}, "modle", ["unknown top-level key 'modle'", "did you mean 'model'?"]),
    "model key typo": ({"model": {"d_modle": 32}}, "model.d_modle", ["unknown key 'd_modle'", "did you mean 'd_model'?"]),
    "block key typo": ({"blocks": {"M": {"d_stat": 8}}}, "blocks.M.d_stat", ["unknown mamba key 'd_stat'", "did you mean 'd_state'?"]),
    "block key of other kind": ({"blocks": {"M": {"top_k": 2}}}, "blocks.M.top_k", ["unknown mamba key 'top_k'", "allowed: kind, d_state"]),
    "block without kind": ({"blocks": {"M": {"kind": DELETE, "d_state": 8}}}, "blocks.M", ["missing 'kind'", "one of: mamba, mamba2, attention, moe, mlp"]),
    "kind typo": ({"blocks": {"M": {"kind": "mamab"}}}, "blocks.M.kind", ["unknown block kind 'mamab'", "did you mean 'mamba'?"]),
    "kind is a list": ({"blocks": {"M": {"kind": ["mamba"]}}}, "blocks.M.kind", ["unknown block kind ['mamba']"]),
    "block not a mapping": ({"blocks": {"M": "mamba"}}, "blocks.M", ["expected a mapping, got 'mamba'"]),
    "symbol with dash": ({"blocks": {"M-1": {"kind": "mamba"}}}, "blocks.M-1", ["block symbol 'M-1' is not a name", "letters, digits and '_'"]),
    "symbol is a YAML bool": ("blocks:\n  on: {kind: mamba}\nlayout: M\n", "blocks.True", ["block symbol true is not a name", "quote YAML words"]),
    "d_model zero": ({"model": {"d_model": 0}}, "model.d_model", ["0 is too small", "must be >= 1"]),
    "d_model string": ({"model": {"d_model": "big"}}, "model.d_model", ["expected an integer, got 'big'"]),
    "d_model bool": ({"model": {"d_model": True}}, "model.d_model", ["expected an integer, got true"]),
    "vocab too small": ({"model": {"vocab_size": 1}}, "model.vocab_size", ["1 is too small", "an integer >= 2 or 'auto'"]),
    "vocab bad string": ({"model": {"vocab_size": "bytes"}}, "model.vocab_size", ["'bytes' is not allowed", "'auto'"]),
    "norm choice": ({"model": {"norm": "batchnorm"}}, "model.norm", ["'batchnorm' is not allowed", "one of: rmsnorm, layernorm"]),
    "checkpointing kind": ({"model": {"checkpointing": ["mamab"]}}, "model.checkpointing[0]", ["unknown block kind 'mamab'", "did you mean 'mamba'?"]),
    "heads do not divide d_model": ({"blocks": {"A": {"n_heads": 3}}}, "blocks.A.n_heads", ["n_heads=3 does not divide d_model=64", "set head_dim"]),
    "kv heads do not divide heads": ({"blocks": {"A": {"n_kv_heads": 3}}}, "blocks.A.n_kv_heads", ["n_kv_heads=3 does not divide n_heads=4"]),
    "rope with odd head_dim": ({"blocks": {"A": {"head_dim": 15}}}, "blocks.A.rope_theta", ["RoPE needs an even head_dim, got head_dim=15", "rope_theta: null"]),
    "window zero": ({"blocks": {"A": {"window": 0}}}, "blocks.A.window", ["0 is too small", ">= 1 or null"]),
    "window float": ({"blocks": {"A": {"window": 2.5}}}, "blocks.A.window", ["expected an integer or null, got 2.5"]),
    "impl typo": ({"blocks": {"M": {"impl": "trition"}}}, "blocks.M.impl", ["'trition' is not allowed", "one of: auto, triton, torch", "did you mean 'triton'?"]),
    "d_state too big": ({"blocks": {"M": {"d_state": 512}}}, "blocks.M.d_state", ["512 is out of range", "1 <= d_state <= 256"]),
    "d_conv too big": ({"blocks": {"M": {"d_conv": 9}}}, "blocks.M.d_conv", ["9 is out of range", "1 <= d_conv <= 8"]),
    "dt_min above dt_max": ({"blocks": {"M": {"dt_min": 0.2}}}, "blocks.M.dt_max", ["dt_max=0.1 is below dt_min=0.2", "0 < dt_min <= dt_max"]),
    "dt_min zero": ({"blocks": {"M": {"dt_min": 0}}}, "blocks.M.dt_min", ["not positive", "> 0"]),
    "dt_rank string": ({"blocks": {"M": {"dt_rank": "full"}}}, "blocks.M.dt_rank", ["'full' is not allowed", "'auto' (ceil(d_model / 16)) or an integer >= 1"]),
    "dt_rank zero": ({"blocks": {"M": {"dt_rank": 0}}}, "blocks.M.dt_rank", ["0 is too small"]),
    "expand float": ({"blocks": {"M": {"expand": 1.5}}}, "blocks.M.expand", ["expected an integer, got 1.5"]),
    "conv_bias not bool": ({"blocks": {"M": {"conv_bias": 1}}}, "blocks.M.conv_bias", ["expected true or false, got 1"]),
    "top_k above n_experts": ({"blocks": {"E": {"top_k": 5}}}, "blocks.E.top_k", ["top_k=5 is out of range", "1 <= top_k <= n_experts=4"]),
    "top_k zero": ({"blocks": {"E": {"top_k": 0}}}, "blocks.E.top_k", ["top_k=0 is out of range"]),
    "ep_size does not divide": ({"blocks": {"E": {"ep_size": 3}}}, "blocks.E.ep_size", ["ep_size=3 does not divide n_experts=4"]),
    "capacity factor zero": ({"blocks": {"E": {"capacity_factor": 0}}}, "blocks.E.capacity_factor", ["not positive", "> 0 or null"]),
    "negative shared experts": ({"blocks": {"E": {"shared_experts": -1}}}, "blocks.E.shared_experts", ["-1 is too small", ">= 0"]),
    "router typo": ({"blocks": {"E": {"router": "softmx"}}}, "blocks.E.router", ["did you mean 'softmax'?"]),
    "mlp d_ff zero": ({"blocks": {"F": {"kind": "mlp", "d_ff": 0}}}, "blocks.F.d_ff", ["0 is too small", ">= 1 or null"]),
    "mlp activation": ({"blocks": {"F": {"kind": "mlp", "activation": "relu"}}}, "blocks.F.activation", ["'relu' is not allowed", "one of: swiglu, gelu"]),
    "train key typo": ({"train": {"batchsize": 4}}, "train.batchsize", ["unknown key 'batchsize'", "did you mean 'batch_size'?"]),
    "steps zero": ({"train": {"steps": 0}}, "train.steps", ["0 is too small", ">= 1"]),
    "lr zero": ({"train": {"lr": 0}}, "train.lr", ["0.0 is not positive", "> 0"]),
    "lr bool": ({"train": {"lr": True}}, "train.lr", ["expected a number, got true"]),
    "grad_accum zero": ({"train": {"grad_accum": 0}}, "train.grad_accum", ["too small"]),
    "betas one value": ({"train": {"betas": [0.9]}}, "train.betas", ["[0.9] is not allowed", "two numbers in [0, 1)"]),
    "betas reach one": ({"train": {"betas": [0.9, 1.0]}}, "train.betas", ["two numbers in [0, 1)"]),
    "device": ({"train": {"device": "gpu"}}, "train.device", ["'gpu' is not allowed", "cuda:N"]),
    "precision choice": ({"train": {"precision": "fp8"}}, "train.precision", ["'fp8' is not allowed", "one of: auto, fp32, bf16, fp16"]),
    "task typo": ({"train": {"task": "mqr"}}, "train.task.name", ["unknown task 'mqr'", "did you mean 'mqar'?"]),
    "task key typo": ({"train": {"task": {"name": "mqar", "n_pair": 4}}}, "train.task.n_pair", ["unknown mqar task key 'n_pair'", "did you mean 'n_pairs'?"]),
    "task key of other task": ({"train": {"task": {"name": "mqar", "n_data": 4}}}, "train.task.n_data", ["unknown mqar task key 'n_data'", "allowed: name, seq_len"]),
    "task name is a list": ({"train": {"task": {"name": ["mqar"]}}}, "train.task.name", ["unknown task ['mqar']"]),
    "task without name": ({"train": {"task": {"seq_len": 64}}}, "train.task", ["the task mapping has no 'name'", "one of: selective_copy"]),
    "task of wrong type": ({"train": {"task": 3}}, "train.task", ["expected a task name or a mapping, got 3"]),
    "text task without path": ({"train": {"task": "text"}}, "train.task.path", ["the text task needs a path"]),
    "task seq_len type": ({"train": {"task": {"name": "mqar", "seq_len": "long"}}}, "train.task.seq_len", ["expected an integer, got 'long'"]),
    "n_data above seq_len": ({"train": {"task": {"name": "selective_copy", "seq_len": 8, "n_data": 9}}}, "train.task.n_data", ["n_data=9 exceeds seq_len=8"]),
    "name not a string": ({"name": 5}, "name", ["expected a non-empty string, got 5"]),
    "deepspeed not a mapping": ({"deepspeed": 3}, "deepspeed", ["expected a mapping (a DeepSpeed config) or a path, got 3"]),
    "model not a mapping": ({"model": [64]}, "model", ["expected a mapping, got [64]"]),
    "layout missing": ({"layout": DELETE}, "layout", ["missing", "layout: \"(M E)*4\""]),
    "layout empty": ({"layout": ""}, "layout", ["the layout is empty"]),
    "layout a number": ({"layout": 5}, "layout", ["expected a pattern string, a list of patterns or {megatron: ...}, got 5"]),
    "layout list element": ({"layout": ["M", "E", "Q"]}, "layout[2]", ["unknown symbol 'Q' at column 1"]),
    "layout list not strings": ({"layout": ["M", {"E": 2}]}, "layout[1]", ["expected a pattern string, got dict"]),
    "layout mapping typo": ({"layout": {"megatorn": "M-M"}}, "layout.megatorn", ["unknown layout form 'megatorn'", "did you mean 'megatron'?"]),
    "megatron conflict": ({"layout": {"megatron": "M*M"}, "blocks": {"A": {"kind": "mlp"}}}, "blocks.A.kind", ["'mlp' conflicts with the Megatron pattern", "layout.megatron puts attention blocks under the symbol A"]),
    "bad interpolation key": ({"blocks": {"E": {"d_ff": "${model.dmodel}"}}}, "blocks.E.d_ff", ["bad interpolation", "Interpolation key 'model.dmodel' not found", "did you mean '${model.d_model}'?"]),
    "unresolved resolver": ({"blocks": {"E": {"d_ff": "${nope:1}"}}}, "blocks.E.d_ff", ["bad interpolation", "Unsupported interpolation type nope"]),
    "malformed interpolation": ("blocks:\n  M: {kind: mamba, d_state: '${model.d_model'}\nlayout: M\n", "blocks.M.d_state", ["bad interpolation"]),
    "duplicate key": ("blocks:\n  M: {kind: mamba}\n  M: {kind: moe}\nlayout: M\n", None, ["invalid YAML at line 3, column 3", "found duplicate key M"]),
    "top-level list": ("- M\n- E\n", None, ["the top level is a list"]),
    "top-level scalar": ("just a string\n", "just a string", ["unknown top-level key 'just a string'", "allowed: name"]),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_malformed_file(tmp_path, case):
    content, key, fragments = CASES[case]
    path = tmp_path / "bad.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(_patched(content), sort_keys=False))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    prefix = f"{path}: key '{key}': " if key else f"{path}: "
    assert msg.startswith(prefix), msg
    for fragment in fragments:
        assert fragment in msg, msg
    assert info.value.file == str(path) and info.value.key == key


def test_same_errors_from_a_dict_omit_the_file():
    with pytest.raises(ConfigError) as info:
        load_config(_patched({"model": {"d_modle": 32}}))
    assert str(info.value) == "key 'model.d_modle': unknown key 'd_modle' (did you mean 'd_model'?)"
    assert info.value.file is None


def test_exact_message_format(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(_patched({"blocks": {"A": {"n_kv_heads": 3}}})))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (f"{path}: key 'blocks.A.n_kv_heads': n_kv_heads=3 does not divide n_heads=4 "
                               "(query heads are shared evenly among key/value heads)")


# ---------------------------------------------------------------------------------------------
# pattern errors through a file: column and caret
# ---------------------------------------------------------------------------------------------
def test_pattern_error_in_fixture_file():
    path = DATA / "bad_pattern.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (f"{path}: key 'layout': unknown symbol 'Q' at column 8 (defined: A, E, M)\n"
                               "  (M E M Q)*2\n"
                               "         ^")


@pytest.mark.parametrize(
    "layout, key, fragment, column",
    [
        ("(M E M E", "layout", "unmatched '('", 1),
        ("M E M E)", "layout", "unmatched ')'", 8),
        ("(M E)*0", "layout", "repeat count must be >= 1", 7),
        ("(M E)*x", "layout", "'*' needs a repeat count", 7),
        ("M E | | A", "layout", "empty stage", 7),
        ("M E mamba", "layout", "unknown symbol 'mamba'", 5),
        ({"megatron": "M-M*-ME-x"}, "layout.megatron", "unexpected character 'x'", 9),
        (["M E", "(A A", "M"], "layout[1]", "unmatched '('", 1),
    ],
)
def test_pattern_errors_show_column_and_caret(tmp_path, layout, key, fragment, column):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(_patched({"layout": layout})))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: key '{key}': ") and fragment in msg, msg
    assert f"at column {column}" in msg and caret_column(msg) == column


def test_invalid_yaml_fixture_names_line():
    path = DATA / "bad_yaml.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: invalid YAML at line 5") and "check indentation, quotes and brackets" in msg


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="cannot load a config from int"):
        load_config(3)


def test_config_error_is_a_hybridseq_error():
    with pytest.raises(HybridSeqError):
        load_config(_patched({"layout": "Q"}))


# ---------------------------------------------------------------------------------------------
# overrides
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, key, fragments",
    [
        ("model.d_modle=128", "model.d_modle", ["unknown key 'd_modle' in override", "did you mean 'model.d_model'?"]),
        ("modle.d_model=128", "modle.d_model", ["unknown top-level key 'modle' in override", "did you mean 'model'?"]),
        ("blocks.Q.d_state=4", "blocks.Q.d_state", ["unknown block symbol 'Q' in override", "allowed: blocks.M, blocks.E, blocks.A"]),
        ("blocks.m.d_state=4", "blocks.m.d_state", ["unknown block symbol 'm' in override", "did you mean 'blocks.M'?"]),
        ("blocks.M.top_k=2", "blocks.M.top_k", ["unknown mamba key 'top_k' in override", "allowed: blocks.M.kind, blocks.M.d_state"]),
        ("blocks.E.topk=2", "blocks.E.topk", ["did you mean 'blocks.E.top_k'?"]),
        ("train.stpes=5", "train.stpes", ["did you mean 'train.steps'?"]),
        ("train.task.seq_lem=3", "train.task.seq_lem", ["unknown selective_copy task key 'seq_lem' in override", "did you mean 'train.task.seq_len'?"]),
        ("stack=[M]", "stack", ["is computed from 'layout'"]),
        ("layout.megatron=M", "layout.megatron", ["override the whole pattern: layout=..."]),
        ("name.first=x", "name.first", ["'name' is a string"]),
    ],
)
def test_override_errors(override, key, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(BASE, overrides=[override])
    msg = str(info.value)
    assert msg.startswith(f"key '{key}': "), msg
    for fragment in fragments:
        assert fragment in msg, msg


@pytest.mark.parametrize(
    "override, fragment",
    [("model.d_model", "is not key=value"), ("+model.extra=1", "adding or deleting keys"),
     ("model..d_model=1", "malformed override key")],
)
def test_malformed_overrides(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("+", r"\+")):
        load_config(BASE, overrides=[override])


def test_override_values_are_validated():
    with pytest.raises(ConfigError, match=r"key 'blocks.E.top_k': top_k=9 is out of range \(1 <= top_k <= n_experts=4\)"):
        load_config(BASE, overrides=["blocks.E.top_k=9"])
