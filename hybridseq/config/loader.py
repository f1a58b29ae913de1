"""Loading a layout config: YAML (OmegaConf) -> overrides -> defaults -> interpolation ->
the typed ``HybridConfig`` (every section checked by its spec) -> the layout parsed into
``stack`` and ``stage_starts``.

    cfg = load_config("layouts/jamba.yaml", overrides=["model.d_model=128", "blocks.E.top_k=1"])

The result is a ``HybridConfig`` (``sections.py``): ``name``, ``description``, ``model``,
``blocks`` (symbol -> the kind's spec), ``layout`` (as written), ``train`` (``train.task`` the
task's spec), ``deepspeed`` (and ``compare`` when given), ``stack`` and ``stage_starts``. Every
section is complete (the defaults are the specs' own), every interpolation is resolved. It
round-trips: loading ``cfg.to_dict()`` gives an equal config. This is the only place a config
changes form; everything downstream reads the typed objects.
"""
from __future__ import annotations

import copy
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException as OmegaConfBaseError

from ..blocks import KINDS
from ..data.specs import TASKS
from ..errors import ConfigError
from ..spec import Spec, check_keys, describe, did_you_mean, fail, require_mapping
from .pattern import megatron_symbols_used, parse_layout, parse_layout_list, parse_megatron
from .schema import BLOCK_DEFAULTS, MODEL_DEFAULTS, TASK_DEFAULTS, TOP_LEVEL_KEYS, TRAIN_DEFAULTS
from .sections import Blocks, HybridConfig, ModelSpec, TrainSpec

_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # used with fullmatch: ASCII names only
MAX_FILE_BYTES = 1 << 20  # a layout file is a few KB: anything past 1 MiB is not one


# ----------------------------------------------------------------------------------------------
# public
# ----------------------------------------------------------------------------------------------
def load_config(source, overrides: Sequence[str] | Mapping[str, Any] | str | None = None) -> HybridConfig:
    """Load, complete and validate a layout config.

    ``source``: a path (str or Path) to a YAML file, a dict, a DictConfig or a ``HybridConfig``.
    ``overrides``:
    dotted ``key=value`` strings as on a command line (``model.d_model=512``,
    ``blocks.E.top_k=2``, ``train.task=mqar``); values are parsed as YAML. Only keys of the
    schema (or of ``deepspeed``/``compare``) may be overridden. Raises ``ConfigError``.
    """
    raw, file, default_name = _read_source(source)
    _normalise(raw, file)
    for text, value in _override_items(overrides):
        _apply_override(raw, text, value)
        _normalise(raw, file)
    merged = _merge_defaults(raw, file, default_name)
    resolved = _resolve_interpolations(merged, file)
    return _finish(resolved, file)


def save_config(cfg, path) -> None:
    """Write ``cfg`` (a ``HybridConfig``, a DictConfig or a dict) as resolved YAML, atomically
    (temp file + rename)."""
    if isinstance(cfg, HybridConfig):
        cfg = cfg.to_dict()
    if not isinstance(cfg, (DictConfig, ListConfig)):
        cfg = OmegaConf.create(cfg)
    text = OmegaConf.to_yaml(cfg, resolve=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------
def _plain(obj):
    """A deep copy of ``obj`` with OmegaConf containers and typed sections turned into plain
    dicts and lists (interpolations left unresolved)."""
    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=False)
    if isinstance(obj, Spec):  # a typed section of a loaded config
        return obj.to_dict()
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return copy.deepcopy(obj)


def _read_source(source) -> tuple[dict, str | None, str]:
    """-> (plain dict with interpolations unresolved, file label or None, default name)."""
    if isinstance(source, HybridConfig):
        return source.to_dict(), None, "model"
    if isinstance(source, DictConfig):
        return OmegaConf.to_container(source, resolve=False), None, "model"
    if isinstance(source, Mapping):  # may hold DictConfig/ListConfig values (e.g. {**cfg, ...})
        return _plain(source), None, "model"
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(f"cannot load a config from {type(source).__name__} (give a YAML path, a dict or a DictConfig)")
    file = str(source)
    path = Path(source)
    if not path.exists():
        raise ConfigError("no such file (give the path of a layout YAML file, e.g. layouts/mamba.yaml)", file=file)
    if path.is_dir():
        raise ConfigError("is a folder, not a YAML file", file=file)
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ConfigError(f"is {size / 2**20:.1f} MiB; a layout file is at most {MAX_FILE_BYTES >> 20} MiB "
                          "(is this the right file?)", file=file)
    try:
        conf = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"invalid YAML{where}: {problem} (check indentation, quotes and brackets)", file=file) from None
    except OmegaConfBaseError as e:
        raise _interpolation_error(e, file, {}) from None
    except UnicodeDecodeError:
        raise ConfigError("not a text file (YAML must be UTF-8)", file=file) from None
    except RecursionError:
        raise ConfigError("YAML nested too deeply (a layout file is a few levels deep)", file=file) from None
    if isinstance(conf, ListConfig):
        raise ConfigError("the top level is a list (a layout file is a mapping: name, model, blocks, layout, ...)", file=file)
    return OmegaConf.to_container(conf, resolve=False), file, path.stem


# ----------------------------------------------------------------------------------------------
# normalising (before overrides, and after each one)
# ----------------------------------------------------------------------------------------------
def _normalise(raw: dict, file) -> None:
    """In place: check top-level keys, drop computed keys, turn ``train.task`` into a mapping,
    and add default block specs for the symbols of a Megatron layout."""
    if not isinstance(raw, dict):
        fail(file, None, f"the top level is {describe(raw)} (a layout file is a mapping: name, model, blocks, layout, ...)")
    check_keys(raw, TOP_LEVEL_KEYS, None, file, what="top-level key")
    raw.pop("stack", None)
    raw.pop("stage_starts", None)
    if raw.get("train") is not None:
        train = require_mapping(raw["train"], "train", file)
        if "task" in train:
            train["task"] = _task_as_mapping(train["task"], file)
        raw["train"] = train
    layout = raw.get("layout")
    if isinstance(layout, Mapping):
        check_keys(layout, ("megatron",), "layout", file, what="layout form")
        if "megatron" not in layout:
            fail(file, "layout", "a layout mapping needs the key 'megatron'", "e.g. layout: {megatron: 'M-M*-ME'}")
        blocks = require_mapping(raw.get("blocks"), "blocks", file)
        for symbol, kind in megatron_symbols_used(str(layout["megatron"])):
            if symbol not in blocks:
                blocks[symbol] = {"kind": kind}
            elif isinstance(blocks[symbol], Mapping) and blocks[symbol].get("kind") != kind:
                # a declared kind may stand for the character if it claims it (M: mamba or mamba2)
                declared = blocks[symbol].get("kind")
                char = KINDS[kind].megatron
                if not (isinstance(declared, str) and declared in KINDS and KINDS[declared].megatron == char):
                    fail(file, f"blocks.{symbol}.kind",
                         f"{describe(declared)} conflicts with the Megatron pattern",
                         f"layout.megatron puts {kind} blocks under the symbol {symbol}")
        raw["blocks"] = blocks


def _task_as_mapping(task, file) -> dict:
    if isinstance(task, str):
        return {"name": task}
    if isinstance(task, Mapping):
        if "name" not in task:
            fail(file, "train.task", "the task mapping has no 'name'",
                 "one of: " + ", ".join(TASK_DEFAULTS) + "; e.g. task: {name: mqar, seq_len: 64}")
        return dict(task)
    fail(file, "train.task", f"expected a task name or a mapping, got {describe(task)}",
         "one of: " + ", ".join(TASK_DEFAULTS))


# ----------------------------------------------------------------------------------------------
# overrides
# ----------------------------------------------------------------------------------------------
def _override_items(overrides) -> list[tuple[str, Any]]:
    """-> [(dotted key, value)], values parsed as YAML like OmegaConf's dotlist."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [(str(k), v) for k, v in overrides.items()]
    if isinstance(overrides, str):
        overrides = [overrides]
    items = []
    for text in overrides:
        if not isinstance(text, str) or "=" not in text:
            raise ConfigError(f"override {text!r} is not key=value (e.g. model.d_model=128)")
        key, value = text.split("=", 1)
        key = key.strip()
        if key.startswith(("+", "~")):
            raise ConfigError(f"override {text!r}: adding or deleting keys ('+', '~') is not supported "
                              "(override an existing key: key=value)")
        try:
            parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={value}"]), resolve=False)["value"]
        except (OmegaConfBaseError, yaml.YAMLError) as e:
            raise ConfigError(f"override {text!r}: cannot parse the value ({str(e).splitlines()[0]})", key=key) from None
        items.append((key, parsed))
    return items


def _unknown_override(key: str, prefix: str, names: Sequence[str], word: str, what: str = "key"):
    """Raise for an override naming ``word`` (not in ``names``) under ``prefix``."""
    full = [f"{prefix}.{n}" if prefix else str(n) for n in names]
    suggestion = did_you_mean(word, names)
    if suggestion is not None:
        hint = f"did you mean '{prefix + '.' if prefix else ''}{suggestion}'?"
    else:
        hint = "allowed: " + ", ".join(full)
    raise ConfigError(f"unknown {what} '{word}' in override ({hint})", key=key)


def _apply_override(raw: dict, key: str, value: Any) -> None:
    """Set ``raw[key]`` (dotted) after checking that the key exists in the schema."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"malformed override key {key!r} (dotted names such as model.d_model)")
    top = parts[0]
    if top not in TOP_LEVEL_KEYS:
        _unknown_override(key, "", [k for k in TOP_LEVEL_KEYS if k not in ("stack", "stage_starts")], top, "top-level key")
    if top in ("stack", "stage_starts"):
        raise ConfigError("is computed from 'layout' (override layout=... instead)", key=key)
    depth = len(parts)
    if top in ("name", "description") and depth > 1:
        raise ConfigError(f"'{top}' is a string, it has no sub-keys (override {top}=...)", key=key)
    elif top == "model" and depth > 1:
        if depth > 2 or parts[1] not in MODEL_DEFAULTS:
            _unknown_override(key, "model", list(MODEL_DEFAULTS), ".".join(parts[1:]))
    elif top == "layout" and depth > 1:
        if depth > 2 or parts[1] != "megatron" or not isinstance(raw.get("layout"), Mapping):
            raise ConfigError("unknown key in override (override the whole pattern: layout=...)", key=key)
    elif top == "train" and depth > 1:
        if parts[1] not in TRAIN_DEFAULTS or (depth > 2 and parts[1] != "task"):
            _unknown_override(key, "train", list(TRAIN_DEFAULTS), parts[1])
        if depth > 3:
            raise ConfigError("unknown key in override (task keys are train.task.<key>)", key=key)
        if depth == 3:
            if raw.get("train") is None:
                raw["train"] = {}
            train = raw["train"]
            if not isinstance(train.get("task"), Mapping):
                train["task"] = {"name": TRAIN_DEFAULTS["task"]}  # the default task, made explicit
            task = train["task"]
            name = task.get("name")
            known = TASK_DEFAULTS.get(name) if isinstance(name, str) else None
            if parts[2] == "name" and value != name and value in TASK_DEFAULTS:
                # another task: keep only the keys it has too (a new task starts from its defaults)
                train["task"] = {k: v for k, v in task.items() if k in TASK_DEFAULTS[value]}
            elif known is not None and parts[2] != "name" and parts[2] not in known:
                _unknown_override(key, "train.task", ["name", *known], parts[2], f"{task.get('name')} task key")
    elif top == "blocks" and depth > 2:
        blocks = raw.get("blocks") or {}
        if parts[1] not in blocks:
            _unknown_override(key, "blocks", list(blocks), parts[1], "block symbol")
        spec = blocks[parts[1]]
        kind = spec.get("kind") if isinstance(spec, Mapping) else None
        kind = kind if isinstance(kind, str) else None
        known = ("kind", *BLOCK_DEFAULTS.get(kind, {}))
        if depth > 3 or (kind in BLOCK_DEFAULTS and parts[2] not in known):
            _unknown_override(key, f"blocks.{parts[1]}", list(known), ".".join(parts[2:]), f"{kind} key")
    _set_dotted(raw, parts, value, key)


def _set_dotted(raw: dict, parts: list[str], value: Any, key: str) -> None:
    node = raw
    for i, p in enumerate(parts[:-1]):
        if node.get(p) is None:
            node[p] = {}
        if not isinstance(node[p], dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"cannot set {key!r}: '{where}' is {describe(node[p])}, not a mapping", key=key)
        node = node[p]
    node[parts[-1]] = value


# ----------------------------------------------------------------------------------------------
# defaults
# ----------------------------------------------------------------------------------------------
def _merge_defaults(raw: dict, file, default_name: str) -> dict:
    """Plain dict with every section completed from the schema (values may still hold
    ``${...}`` interpolations). Unknown keys and block kinds are errors here."""
    out: dict = {"name": raw.get("name", default_name), "description": raw.get("description")}

    model = require_mapping(raw.get("model"), "model", file)
    check_keys(model, MODEL_DEFAULTS, "model", file)
    out["model"] = {**copy.deepcopy(MODEL_DEFAULTS), **model}

    blocks = require_mapping(raw.get("blocks"), "blocks", file)
    out["blocks"] = {symbol: _merge_block(symbol, spec, file) for symbol, spec in blocks.items()}

    if "layout" not in raw:
        fail(file, "layout", "missing", "the stack of blocks, e.g. layout: \"(M E)*4\"")
    out["layout"] = raw["layout"]

    train = require_mapping(raw.get("train"), "train", file)
    check_keys(train, TRAIN_DEFAULTS, "train", file)
    task = train.get("task", {"name": TRAIN_DEFAULTS["task"]})
    out["train"] = {**copy.deepcopy(TRAIN_DEFAULTS), **train, "task": _merge_task(task, file)}

    out["deepspeed"] = raw.get("deepspeed")
    if "compare" in raw:
        out["compare"] = raw["compare"]
    return out


def _merge_block(symbol, spec, file) -> dict:
    if not isinstance(symbol, str) or not _SYMBOL.fullmatch(symbol):
        fail(file, f"blocks.{symbol}", f"block symbol {describe(symbol)} is not a name",
             "letters, digits and '_', starting with a letter; quote YAML words such as on/off/yes/no")
    key = f"blocks.{symbol}"
    spec = require_mapping(spec, key, file, none_ok=False)
    if "kind" not in spec:
        fail(file, key, "missing 'kind'", "one of: " + ", ".join(BLOCK_DEFAULTS))
    kind = spec["kind"]
    if not isinstance(kind, str) or kind not in BLOCK_DEFAULTS:
        suggestion = did_you_mean(str(kind), BLOCK_DEFAULTS)
        fail(file, f"{key}.kind", f"unknown block kind {describe(kind)}",
             (f"did you mean '{suggestion}'? " if suggestion else "") + "one of: " + ", ".join(BLOCK_DEFAULTS))
    defaults = BLOCK_DEFAULTS[kind]
    check_keys(spec, ("kind", *defaults), key, file, what=f"{kind} key")
    return {"kind": kind, **copy.deepcopy(defaults), **{k: v for k, v in spec.items() if k != "kind"}}


def _merge_task(task: dict, file) -> dict:
    name = task.get("name")
    if not isinstance(name, str) or name not in TASK_DEFAULTS:
        suggestion = did_you_mean(str(name), TASK_DEFAULTS)
        fail(file, "train.task.name", f"unknown task {describe(name)}",
             (f"did you mean '{suggestion}'? " if suggestion else "") + "one of: " + ", ".join(TASK_DEFAULTS))
    check_keys(task, ("name", *TASK_DEFAULTS[name]), "train.task", file, what=f"{name} task key")
    return {"name": name, **copy.deepcopy(TASK_DEFAULTS[name]), **{k: v for k, v in task.items() if k != "name"}}


# ----------------------------------------------------------------------------------------------
# interpolation
# ----------------------------------------------------------------------------------------------
def _dotted_keys(node, prefix: str = "") -> list[str]:
    out = []
    if isinstance(node, Mapping):
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            out.append(key)
            out.extend(_dotted_keys(v, key))
    return out


def _interpolation_error(e: OmegaConfBaseError, file, merged: dict) -> ConfigError:
    key = getattr(e, "full_key", None) or None
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    hint = "interpolations look like ${model.d_model}"
    missing = re.match(r"Interpolation key '(.+)' not found", msg)
    if missing:
        suggestion = did_you_mean(missing.group(1), _dotted_keys(merged))
        if suggestion:
            hint = f"did you mean '${{{suggestion}}}'?"
    return ConfigError(f"bad interpolation: {msg} ({hint})", file=file, key=key)


def _has_interpolation(node) -> bool:
    if isinstance(node, str):
        return "${" in node
    if isinstance(node, Mapping):
        return any(_has_interpolation(v) for v in node.values())
    if isinstance(node, (list, tuple)):
        return any(_has_interpolation(v) for v in node)
    return False


def _resolve_interpolations(merged: dict, file) -> dict:
    """Resolve every ``${...}`` (OmegaConf semantics) over the merged config."""
    if not _has_interpolation(merged):
        return merged  # OmegaConf.create is slow: skip it when there is nothing to resolve
    try:
        conf = OmegaConf.create(merged)
        OmegaConf.resolve(conf)
    except OmegaConfBaseError as e:
        raise _interpolation_error(e, file, merged) from None
    return OmegaConf.to_container(conf, resolve=False)


# ----------------------------------------------------------------------------------------------
# validation and layout
# ----------------------------------------------------------------------------------------------
def _finish(cfg: dict, file) -> HybridConfig:
    name = cfg["name"]
    if not isinstance(name, str) or not name.strip():
        fail(file, "name", f"expected a non-empty string, got {describe(name)}")
    description = cfg["description"]
    if description is not None and not isinstance(description, str):
        fail(file, "description", f"expected a string, got {describe(description)}")
    model = ModelSpec.from_mapping(cfg["model"], file=file, key="model")
    blocks = Blocks()
    for s, spec in cfg["blocks"].items():
        blocks[s] = KINDS[spec["kind"]].from_mapping({k: v for k, v in spec.items() if k != "kind"},
                                                     file=file, key=f"blocks.{s}",
                                                     what=f"{spec['kind']} key", d_model=model.d_model)
    layout = cfg["layout"]
    if isinstance(layout, str):
        stack, stage_starts = parse_layout(layout, blocks, file=file, key="layout")
    elif isinstance(layout, list):
        stack, stage_starts = parse_layout_list(layout, blocks, file=file, key="layout")
    elif isinstance(layout, Mapping):
        stack, stage_starts = parse_megatron(layout["megatron"], file=file, key="layout.megatron")
    else:
        fail(file, "layout", f"expected a pattern string, a list of patterns or {{megatron: ...}}, got {describe(layout)}",
             "e.g. layout: \"(M E)*4\"")
    task_raw = cfg["train"]["task"]
    task = TASKS[task_raw["name"]].from_mapping({k: v for k, v in task_raw.items() if k != "name"},
                                               file=file, key="train.task",
                                               what=f"{task_raw['name']} task key")
    train = TrainSpec.from_mapping({k: v for k, v in cfg["train"].items() if k != "task"},
                                   file=file, key="train")
    train.task = task
    deepspeed = cfg["deepspeed"]
    if deepspeed is not None and not isinstance(deepspeed, (Mapping, str)):
        fail(file, "deepspeed", f"expected a mapping (a DeepSpeed config) or a path, got {describe(deepspeed)}")
    compare = cfg.get("compare")
    if compare is not None and not isinstance(compare, Mapping):
        fail(file, "compare", f"expected a mapping, got {describe(compare)}")
    # the pass-through sections stay data, readable by attribute (OmegaConf nodes)
    as_node = lambda v: OmegaConf.create(v) if isinstance(v, Mapping) else v  # noqa: E731
    return HybridConfig(name=name, description=description, model=model, blocks=blocks,
                        layout=layout, train=train, stack=list(stack),
                        stage_starts=list(stage_starts), deepspeed=as_node(deepspeed),
                        compare=as_node(compare), has_compare="compare" in cfg, source=file)
