"""``BlockSpec``: what every block kind knows about itself without building a module.

A block kind is a folder under ``hybridseq/blocks/`` holding a ``spec.py`` (its ``BlockSpec``
subclass: keys and defaults, validation, closed forms and texts; no torch) and a ``block.py``
(its ``Block``, an ``nn.Module``). ``registry.KINDS`` lists the kinds. Everything outside
``hybridseq/blocks/`` asks the spec, never switches on a kind's name:

    spec.param_count(d_model)            -> (total, active) parameters, exact
    spec.flops_per_token(d_model, L)     -> forward FLOPs per token at training length L
    spec.state_bytes(d_model, T, b)      -> inference state bytes per sequence of T tokens
    spec.activation_elements(d_model)    -> activation elements saved per token for backward
                                            (``hybridseq plan``; the sublayer's input excluded)
    spec.expert_params(d_model)          -> routed-expert weights (``plan``'s expert sharding)
    spec.settings(d_model)               -> the short text ``hybridseq show`` prints
    spec.canonical(d_model)              -> what identifies the weights (``config_hash``)
    spec.rescaled(d_old, d_new, s)       -> keys that follow a new d_model (``compare --match``)
    spec.backend(device)                 -> (backend, why) for ``hybridseq doctor``
    spec.build(d_model, layer_idx=, n_layers=)  -> the Block module

Class attributes: ``kind`` (the YAML name), ``megatron`` (its character in Megatron-LM hybrid
patterns, or None), ``documents`` (how it takes packed-document boundaries: ``tokenwise``,
``mask`` or ``state``), ``hash_exclude`` (keys that do not change what the weights mean) and
``hash_optional`` (``{key: default}``: keys left out of the hash while they hold their default,
so that a config that does not use such a key hashes as if the key did not exist).
"""
from __future__ import annotations

from typing import Any, ClassVar

from ..spec import Spec


def ffn_dim(d_model: int, d_ff: int | None, activation: str = "swiglu") -> int:
    """Hidden width of a feed-forward layer: ``d_ff`` when given; else swiglu
    ``round_up(8 * d_model / 3, 8)`` (the parameters of a 4x GELU MLP), otherwise ``4 * d_model``."""
    if activation not in ("swiglu", "gelu", "relu2"):
        raise ValueError(f"unknown activation {activation!r} (swiglu, gelu or relu2)")
    if d_ff is not None:
        return int(d_ff)
    if activation == "swiglu":
        return ((-(-8 * d_model // 3)) + 7) // 8 * 8
    return 4 * d_model


def norm_param_count(kind: str, dim: int) -> int:
    """Parameters of one norm layer over ``dim`` features: RMSNorm a gain, LayerNorm a gain and
    a bias."""
    return {"rmsnorm": 1, "layernorm": 2}[kind] * dim


def round8(x: float) -> int:
    """The nearest multiple of 8, at least 8 (widths that ``compare --match`` rescales)."""
    return max(8, int(round(x / 8.0)) * 8)


def drop_defaults(values: dict, optional: dict) -> dict:
    """Remove, in place, the keys of ``optional`` whose value in ``values`` equals their default
    there (``hash_optional``: a key added later hashes only when it is set to something else)."""
    for k, default in optional.items():
        if k in values and _same(values[k], default):
            del values[k]
    return values


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


class BlockSpec(Spec):
    """Base of the kinds' specs (module docstring)."""

    kind: ClassVar[str] = ""
    megatron: ClassVar[str | None] = None
    documents: ClassVar[str] = "tokenwise"
    hash_exclude: ClassVar[tuple] = ("impl",)
    hash_optional: ClassVar[dict] = {}

    # --- reading -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"kind": self.kind, **super().to_dict()}

    # --- closed forms --------------------------------------------------------------------------
    def param_count(self, d_model: int) -> tuple[int, int]:
        raise NotImplementedError

    def flops_per_token(self, d_model: int, seq_len: int) -> float:
        raise NotImplementedError

    def state_bytes(self, d_model: int, max_seq_len: int, dtype_bytes: int = 2) -> int:
        return 0

    def activation_elements(self, d_model: int) -> int:
        raise NotImplementedError

    def expert_params(self, d_model: int) -> int:
        return 0

    # --- texts ---------------------------------------------------------------------------------
    def settings(self, d_model: int) -> str:
        """Short summary for tables; kinds override ``_settings`` and ``impl`` is appended."""
        out = self._settings(d_model)
        impl = getattr(self, "impl", "auto")
        return out + (f" impl={impl}" if impl != "auto" else "")

    def _settings(self, d_model: int) -> str:
        return " ".join(f"{k}={v}" for k, v in super().to_dict().items() if k != "impl")

    def backend(self, device) -> tuple[str, str]:
        return "torch", "PyTorch ops"

    # --- identity and scaling ------------------------------------------------------------------
    def resolved(self, d_model: int) -> dict:
        """The spec with sizes derived from ``d_model`` filled in (``d_ff: null`` and its explicit
        value then compare equal). Kinds with derived sizes override."""
        return self.to_dict()

    def canonical(self, d_model: int) -> dict:
        """``resolved`` less ``hash_exclude`` and less the ``hash_optional`` keys that hold their
        default, keys sorted, floats as floats: what ``config_hash`` hashes for one sublayer."""
        s = self.resolved(d_model)
        for k in self.hash_exclude:
            s.pop(k, None)
        drop_defaults(s, self.hash_optional)
        return {k: (float(v) if isinstance(v, float) else v) for k, v in sorted(s.items())}

    def rescaled(self, d_old: int, d_new: int, ffn_scale: float = 1.0) -> dict[str, Any] | None:
        """The keys (relative to this spec) that change when ``d_model`` goes from ``d_old`` to
        ``d_new`` with feed-forward widths scaled by ``ffn_scale``; None when ``d_new`` cannot
        work for this spec. Default: nothing follows ``d_model`` explicitly."""
        return {}

    def has_ffn(self) -> bool:
        """Whether ``rescaled`` scales a feed-forward width (``compare --match``'s fallback)."""
        return False

    # --- building ------------------------------------------------------------------------------
    def build(self, d_model: int, *, layer_idx: int = 0, n_layers: int = 1):
        raise NotImplementedError


__all__ = ["BlockSpec", "drop_defaults", "ffn_dim", "norm_param_count", "round8"]
