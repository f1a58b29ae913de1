"""Validation of a merged, resolved config (plain Python containers): key names, types, choices
and shape checks that would otherwise fail deep inside a block's constructor.

Every error is a ``ConfigError``: ``<file>: key '<dotted.key>': <what is wrong> (<what is
allowed / did you mean>)``. Types follow the schema: the type of a key's default, or ``TYPES``
where the default is None or several types are allowed. An integer is accepted where a float is
expected (and converted to float); a bool is never accepted as a number.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

from ..errors import ConfigError
from .pattern import did_you_mean
from .schema import BLOCK_DEFAULTS, CHOICES, MODEL_DEFAULTS, TASK_DEFAULTS, TRAIN_DEFAULTS, TYPES

_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               list: "a list", dict: "a mapping", type(None): "null"}


def fail(file, key: str | None, what: str, allowed: str | None = None):
    """Raise the ConfigError ``<file>: key '<key>': <what> (<allowed>)``."""
    raise ConfigError(what + (f" ({allowed})" if allowed else ""), file=file, key=key)


def describe(value: Any) -> str:
    """A value as the user wrote it in YAML: true/false/null, quoted strings, numbers."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, Mapping):
        return "a mapping"
    return repr(value)


def join_key(prefix: str | None, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def check_keys(given: Mapping, allowed: Iterable[str], prefix: str | None, file, *, what: str = "key") -> None:
    """Every key of ``given`` must be in ``allowed``; else an error with a "did you mean"."""
    allowed = list(allowed)
    for k in given:
        if k in allowed:
            continue
        suggestion = did_you_mean(str(k), allowed)
        hint = f"did you mean '{suggestion}'?" if suggestion else "allowed: " + ", ".join(allowed)
        fail(file, join_key(prefix, k), f"unknown {what} '{k}'", hint)


def require_mapping(value: Any, key: str, file, *, none_ok: bool = True) -> dict:
    """``value`` as a dict (None -> {} when ``none_ok``), else an error."""
    if value is None and none_ok:
        return {}
    if not isinstance(value, Mapping):
        fail(file, key, f"expected a mapping, got {describe(value)}", "write 'key: value' lines under it")
    return dict(value)


def _is(value: Any, t: type) -> bool:
    if t is type(None):
        return value is None
    if t is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if t is float:
        return isinstance(value, (int, float))
    if t is list:
        return isinstance(value, (list, tuple))
    if t is dict:
        return isinstance(value, Mapping)
    return isinstance(value, t)


def check_type(value: Any, schema_key: str, default: Any, key: str, file) -> Any:
    """Check ``value`` against ``TYPES[schema_key]`` or the default's type, and ``CHOICES``.
    Returns the value, with an int converted to float where a float is expected."""
    allowed = TYPES.get(schema_key)
    if allowed is None:
        allowed = (float,) if isinstance(default, float) else (type(default),)
        if default is None:
            return value  # untyped (no TYPES entry): anything goes
    if not any(_is(value, t) for t in allowed):
        words = " or ".join(_TYPE_WORDS.get(t, t.__name__) for t in allowed if not (t is int and float in allowed))
        fail(file, key, f"expected {words}, got {describe(value)}")
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, tuple):
        value = list(value)
    choices = CHOICES.get(schema_key)
    if choices is not None and value not in choices:
        suggestion = did_you_mean(str(value), choices)
        hint = "one of: " + ", ".join(choices) + (f"; did you mean '{suggestion}'?" if suggestion else "")
        fail(file, key, f"{describe(value)} is not allowed", hint)
    return value


def check_section_types(section: dict, defaults: Mapping, schema_prefix: str, key_prefix: str, file) -> dict:
    """``check_type`` on every key of ``section`` that has a default; returns the new dict."""
    out = dict(section)
    for k, default in defaults.items():
        if k in out:
            out[k] = check_type(out[k], f"{schema_prefix}.{k}", default, f"{key_prefix}.{k}", file)
    return out


def _at_least(section: Mapping, name: str, low, key_prefix: str, file, *, none_ok: bool = False) -> None:
    v = section[name]
    if v is None and none_ok:
        return
    if v < low:
        fail(file, f"{key_prefix}.{name}", f"{describe(v)} is too small", f"must be >= {low}" + (" or null" if none_ok else ""))


def _positive(section: Mapping, name: str, key_prefix: str, file, *, none_ok: bool = False) -> None:
    v = section[name]
    if v is None and none_ok:
        return
    if not v > 0:
        fail(file, f"{key_prefix}.{name}", f"{describe(v)} is not positive", "must be > 0" + (" or null" if none_ok else ""))


# ----------------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------------
def validate_model(model: dict, file) -> dict:
    """Types and ranges of the ``model`` section (already merged with MODEL_DEFAULTS)."""
    model = check_section_types(model, MODEL_DEFAULTS, "model", "model", file)
    _at_least(model, "d_model", 1, "model", file)
    vs = model["vocab_size"]
    if isinstance(vs, str) and vs != "auto":
        fail(file, "model.vocab_size", f"{describe(vs)} is not allowed", "an integer >= 2 or 'auto'")
    if isinstance(vs, int) and vs < 2:
        fail(file, "model.vocab_size", f"{vs} is too small", "an integer >= 2 or 'auto'")
    _positive(model, "norm_eps", "model", file)
    _positive(model, "init_std", "model", file)
    _at_least(model, "pad_vocab_multiple", 1, "model", file)
    for i, kind in enumerate(model["checkpointing"]):
        if kind not in BLOCK_DEFAULTS:
            suggestion = did_you_mean(str(kind), BLOCK_DEFAULTS)
            fail(file, f"model.checkpointing[{i}]", f"unknown block kind {describe(kind)}",
                 f"did you mean '{suggestion}'?" if suggestion else "one of: " + ", ".join(BLOCK_DEFAULTS))
    return model


def validate_block(symbol: str, spec: dict, d_model: int, file) -> dict:
    """Types, choices and shape checks of one block spec (merged with its kind's defaults)."""
    kind = spec["kind"]
    p = f"blocks.{symbol}"
    spec = check_section_types(spec, BLOCK_DEFAULTS[kind], kind, p, file)
    checker = _BLOCK_CHECKS.get(kind)
    if checker is not None:
        checker(spec, d_model, p, file)
    return spec


def _check_mamba(s: dict, d_model: int, p: str, file) -> None:
    if not 1 <= s["d_state"] <= 256:
        fail(file, f"{p}.d_state", f"{s['d_state']} is out of range", "1 <= d_state <= 256")
    if not 1 <= s["d_conv"] <= 8:
        fail(file, f"{p}.d_conv", f"{s['d_conv']} is out of range",
             "1 <= d_conv <= 8; the fused conv kernels are fastest at 2..4")
    _at_least(s, "expand", 1, p, file)
    r = s["dt_rank"]
    if isinstance(r, str) and r != "auto":
        fail(file, f"{p}.dt_rank", f"{describe(r)} is not allowed", "'auto' (ceil(d_model / 16)) or an integer >= 1")
    if isinstance(r, int) and r < 1:
        fail(file, f"{p}.dt_rank", f"{r} is too small", "'auto' (ceil(d_model / 16)) or an integer >= 1")
    _positive(s, "dt_min", p, file)
    if s["dt_max"] < s["dt_min"]:
        fail(file, f"{p}.dt_max", f"dt_max={s['dt_max']} is below dt_min={s['dt_min']}", "0 < dt_min <= dt_max")
    _positive(s, "dt_scale", p, file)
    _at_least(s, "dt_init_floor", 0, p, file)


def _check_attention(s: dict, d_model: int, p: str, file) -> None:
    _at_least(s, "n_heads", 1, p, file)
    _at_least(s, "n_kv_heads", 1, p, file, none_ok=True)
    _at_least(s, "head_dim", 1, p, file, none_ok=True)
    h, kv = s["n_heads"], s["n_kv_heads"]
    if kv is not None and h % kv != 0:
        fail(file, f"{p}.n_kv_heads", f"n_kv_heads={kv} does not divide n_heads={h}",
             "query heads are shared evenly among key/value heads")
    head_dim = s["head_dim"]
    if head_dim is None:
        if d_model % h != 0:
            fail(file, f"{p}.n_heads", f"n_heads={h} does not divide d_model={d_model}",
                 "pick n_heads dividing d_model, or set head_dim")
        head_dim = d_model // h
    if s["rope_theta"] is not None:
        _positive(s, "rope_theta", p, file)
        if head_dim % 2 != 0:
            fail(file, f"{p}.rope_theta", f"RoPE needs an even head_dim, got head_dim={head_dim}",
                 "make head_dim even, or set rope_theta: null for no positional encoding")
    _at_least(s, "window", 1, p, file, none_ok=True)


def _check_moe(s: dict, d_model: int, p: str, file) -> None:
    _at_least(s, "n_experts", 1, p, file)
    e, k = s["n_experts"], s["top_k"]
    if not 1 <= k <= e:
        fail(file, f"{p}.top_k", f"top_k={k} is out of range", f"1 <= top_k <= n_experts={e}")
    _at_least(s, "d_ff", 1, p, file, none_ok=True)
    _positive(s, "capacity_factor", p, file, none_ok=True)
    for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
        _at_least(s, name, 0, p, file)
    _at_least(s, "shared_experts", 0, p, file)
    _at_least(s, "shared_d_ff", 1, p, file, none_ok=True)
    _at_least(s, "ep_size", 1, p, file)
    if e % s["ep_size"] != 0:
        fail(file, f"{p}.ep_size", f"ep_size={s['ep_size']} does not divide n_experts={e}",
             "each expert-parallel rank holds n_experts / ep_size experts")


def _check_mlp(s: dict, d_model: int, p: str, file) -> None:
    _at_least(s, "d_ff", 1, p, file, none_ok=True)


_BLOCK_CHECKS = {"mamba": _check_mamba, "attention": _check_attention, "moe": _check_moe, "mlp": _check_mlp}

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def validate_train(train: dict, file) -> dict:
    """Types and ranges of the ``train`` section (merged with TRAIN_DEFAULTS; ``task`` already a
    dict with ``name``, merged with its task's defaults)."""
    defaults = {k: v for k, v in TRAIN_DEFAULTS.items() if k != "task"}
    train = check_section_types(train, defaults, "train", "train", file)
    for name in ("steps", "batch_size", "grad_accum", "eval_batches", "log_every"):
        _at_least(train, name, 1, "train", file)
    for name in ("eval_every", "save_every", "keep_last", "weight_decay", "grad_clip"):
        _at_least(train, name, 0, "train", file)
    _at_least(train, "warmup_steps", 0, "train", file, none_ok=True)
    _positive(train, "lr", "train", file)
    if not 0 <= train["min_lr_ratio"] <= 1:
        fail(file, "train.min_lr_ratio", f"{train['min_lr_ratio']} is out of range", "0 <= min_lr_ratio <= 1")
    betas = train["betas"]
    if len(betas) != 2 or not all(_is(b, float) and 0 <= b < 1 for b in betas):
        fail(file, "train.betas", f"{describe(list(betas))} is not allowed", "two numbers in [0, 1), like [0.9, 0.95]")
    train["betas"] = [float(b) for b in betas]
    if not _DEVICE.match(train["device"]):
        fail(file, "train.device", f"{describe(train['device'])} is not allowed", "auto, cpu, mps, cuda or cuda:N")
    if train["out_dir"] is not None and not train["out_dir"].strip():
        fail(file, "train.out_dir", "empty path", "a folder, or null for runs/<name>-<time>")
    train["task"] = validate_task(train["task"], file)
    return train


def validate_task(task: dict, file) -> dict:
    """Types and ranges of ``train.task`` ({name, <keys of TASK_DEFAULTS[name]>})."""
    name = task["name"]
    p = "train.task"
    task = check_section_types(task, TASK_DEFAULTS[name], f"task.{name}", p, file)
    if "seq_len" in task:
        _at_least(task, "seq_len", 2, p, file)
    if "vocab" in task:
        _at_least(task, "vocab", 2, p, file)
    for k in ("n_data", "n_pairs"):
        if k in task:
            _at_least(task, k, 1, p, file)
    if name == "selective_copy" and task["n_data"] > task["seq_len"]:
        fail(file, f"{p}.n_data", f"n_data={task['n_data']} exceeds seq_len={task['seq_len']}",
             "the data tokens are scattered among the first seq_len positions")
    if name == "text":
        if task["path"] is None or not str(task["path"]).strip():
            fail(file, f"{p}.path", "the text task needs a path", "a text file, a folder of text files, or a .bin token file")
        if not 0 <= task["val_fraction"] < 1:
            fail(file, f"{p}.val_fraction", f"{task['val_fraction']} is out of range", "0 <= val_fraction < 1")
    return task
