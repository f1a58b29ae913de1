"""Typed config sections: a dataclass is its own schema.

Every section of a layout file (``model``, each block kind, ``train``, each task) is a dataclass
deriving from ``Spec``. Its fields are the keys, their defaults the defaults, their annotations
the types, and ``option(...)`` adds ranges:

    @dataclass
    class MambaSpec(Spec):
        d_state: int = option(16, range=(1, 256))
        dt_rank: int | str = "auto"
        impl: Literal["auto", "triton", "torch"] = "auto"

``MambaSpec.from_mapping(data, file=..., key="blocks.M")`` checks the keys (unknown ones get a
"did you mean"), the types (``bool`` is never a number, an int is accepted where a float is
expected, every float must be finite), the choices of ``Literal`` fields and the ranges, then
calls the class's own ``check`` for rules between keys. Every error is a ``ConfigError`` that
names the file and the dotted key: ``<file>: key 'blocks.M.d_state': 512 is out of range
(1 <= d_state <= 256)``.

A spec reads like a mapping too (``spec["d_state"]``, ``spec.get(...)``, ``spec.items()``, and it
compares equal to its mapping form), and ``to_dict()`` gives the plain YAML form. Subclasses are
``@dataclass(eq=False)`` so that they keep this comparison. This module imports nothing heavy (no torch, no
OmegaConf): ``hybridseq show`` builds and checks every spec without loading torch.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, ClassVar, Iterable, Literal, Mapping

from .errors import ConfigError

_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               list: "a list", dict: "a mapping", type(None): "null"}


# ----------------------------------------------------------------------------------------------
# messages
# ----------------------------------------------------------------------------------------------
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


def did_you_mean(word: str, options: Iterable[str]) -> str | None:
    """The closest option to ``word`` (case-insensitive match first, then difflib), or None."""
    options = [str(o) for o in options]
    for o in options:
        if o.lower() == str(word).lower() and o != word:
            return o
    close = difflib.get_close_matches(str(word)[:200], options, n=1, cutoff=0.6)
    return close[0] if close else None


def join_key(prefix: str | None, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def check_keys(given: Mapping, allowed: Iterable[str], prefix: str | None, file, *,
               what: str = "key") -> None:
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


# ----------------------------------------------------------------------------------------------
# fields
# ----------------------------------------------------------------------------------------------
def option(default: Any = dataclasses.MISSING, *, ge=None, gt=None, le=None, range=None,
           doc: str = ""):
    """A dataclass field with a range: ``ge`` (>=), ``gt`` (>), ``le`` (<=), or ``range=(lo, hi)``
    (both ends included; its error reads ``lo <= key <= hi``). Lists are copied per instance."""
    meta = {"ge": ge, "gt": gt, "le": le, "range": range, "doc": doc}
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _allowed(hint) -> tuple[tuple, tuple | None]:
    """(types, Literal choices or None) of a resolved annotation."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return (str,), tuple(typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        out, choices = [], None
        for arg in typing.get_args(hint):
            t, c = _allowed(arg)
            out += list(t)
            choices = c or choices
        return tuple(out), choices
    if origin in (list, tuple):
        return (list,), None
    if origin in (dict, Mapping):
        return (dict,), None
    if hint is Any:
        return (), None
    return (hint,), None


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


def check_value(value: Any, hint, name: str, key: str, file, meta: Mapping | None = None) -> Any:
    """``value`` checked against the annotation ``hint`` (types, Literal choices, finiteness) and
    ``meta`` (``option`` ranges); returns it with an int turned into a float where a float is
    expected and a tuple into a list."""
    allowed, choices = _allowed(hint)
    if allowed and not any(_is(value, t) for t in allowed):
        words = " or ".join(_TYPE_WORDS.get(t, getattr(t, "__name__", str(t))) for t in allowed
                            if not (t is int and float in allowed))
        fail(file, key, f"expected {words}, got {describe(value)}")
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, float) and not math.isfinite(value):
        fail(file, key, f"{value} is not a finite number", "write a finite number")
    if isinstance(value, tuple):
        value = list(value)
    if choices is not None and isinstance(value, str) and value not in choices:
        suggestion = did_you_mean(value, choices)
        hint_ = "one of: " + ", ".join(choices) + (f"; did you mean '{suggestion}'?" if suggestion else "")
        fail(file, key, f"{describe(value)} is not allowed", hint_)
    if meta and isinstance(value, (int, float)) and not isinstance(value, bool):
        none_ok = type(None) in allowed
        tail = " or null" if none_ok else ""
        if meta.get("range") is not None:
            lo, hi = meta["range"]
            if not lo <= value <= hi:
                fail(file, key, f"{describe(value)} is out of range", f"{lo} <= {name} <= {hi}")
        if meta.get("ge") is not None and value < meta["ge"]:
            fail(file, key, f"{describe(value)} is too small", f"must be >= {meta['ge']}{tail}")
        if meta.get("gt") is not None and not value > meta["gt"]:
            what = "is not positive" if meta["gt"] == 0 else "is too small"
            fail(file, key, f"{describe(value)} {what}", f"must be > {meta['gt']}{tail}")
        if meta.get("le") is not None and value > meta["le"]:
            fail(file, key, f"{describe(value)} is too large", f"must be <= {meta['le']}{tail}")
    return value


class Spec:
    """Base of every typed config section (module docstring). Subclasses are dataclasses."""

    _hints: ClassVar[dict | None] = None

    # --- the schema ----------------------------------------------------------------------------
    @classmethod
    def fields(cls) -> tuple:
        return tuple(f for f in dataclasses.fields(cls) if f.init)

    @classmethod
    def keys_(cls) -> list[str]:
        return [f.name for f in cls.fields()]

    @classmethod
    def defaults(cls) -> dict:
        """{key: default} (a list default is copied)."""
        out = {}
        for f in cls.fields():
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out

    @classmethod
    def hints(cls) -> dict:
        if cls.__dict__.get("_hints") is None:
            cls._hints = typing.get_type_hints(cls)
        return cls._hints

    # --- building ------------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, data: Mapping, *, file=None, key: str = "", what: str = "key",
                     **context):
        """A checked instance from ``data`` (defaults filled in). ``key``: the dotted prefix the
        errors name (``blocks.M``); ``context``: what ``check`` needs (e.g. ``d_model``)."""
        data = require_mapping(data, key, file)
        check_keys(data, cls.keys_(), key or None, file, what=what)
        hints = cls.hints()
        values = {}
        for f in cls.fields():
            if f.name in data:
                values[f.name] = check_value(data[f.name], hints[f.name], f.name,
                                             join_key(key, f.name), file, f.metadata)
        obj = cls(**values)
        obj.check(file=file, key=key, **context)
        return obj

    def check(self, *, file=None, key: str = "", **context) -> None:
        """Rules between keys (ranges of single keys are ``option`` metadata). Override."""

    def replace(self, **changes):
        """A copy with ``changes`` (not re-checked: use ``from_mapping`` for user input)."""
        return dataclasses.replace(self, **changes)

    # --- reading -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {}
        for f in self.fields():
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, Spec) else (list(v) if isinstance(v, tuple) else v)
        return out

    def __getitem__(self, name: str):
        if name not in self.keys():
            raise KeyError(name)
        return getattr(self, name)

    def get(self, name: str, default=None):
        return getattr(self, name) if name in self.keys() else default

    def keys(self):
        return self.to_dict().keys()

    def items(self):
        return self.to_dict().items()

    def values(self):
        return self.to_dict().values()

    def __contains__(self, name) -> bool:
        return name in self.to_dict()

    def __iter__(self):
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    def __eq__(self, other) -> bool:
        """Equal to a spec of the same class with the same values, or to its mapping form."""
        if isinstance(other, Spec):
            return type(self) is type(other) and self.to_dict() == other.to_dict()
        if isinstance(other, Mapping):
            return self.to_dict() == dict(other)
        return NotImplemented

    __hash__ = None


__all__ = ["Spec", "check_keys", "check_value", "describe", "did_you_mean", "fail", "join_key",
           "option", "require_mapping"]
