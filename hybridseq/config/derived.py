"""Values derived from a config: resolved sizes, the kind of each sublayer, and a hash that
identifies a model (its weights' shapes and meaning)."""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Mapping

from .schema import HASH_EXCLUDE


def resolve_ffn_dim(d_model: int, d_ff: int | None, activation: str = "swiglu") -> int:
    """Hidden width of a feed-forward layer. ``d_ff`` when given; else swiglu:
    ``round_up(8 * d_model / 3, 8)`` (same parameters as a 4x GELU MLP), gelu: ``4 * d_model``."""
    if d_ff is not None:
        return int(d_ff)
    if activation == "swiglu":
        return ((-(-8 * d_model // 3)) + 7) // 8 * 8
    if activation == "gelu":
        return 4 * d_model
    raise ValueError(f"unknown activation {activation!r} (swiglu or gelu)")


def resolve_dt_rank(d_model: int, dt_rank: int | str) -> int:
    """Rank of the Mamba dt projection: ``"auto"`` -> ``ceil(d_model / 16)``, else the int."""
    if dt_rank == "auto":
        return math.ceil(d_model / 16)
    return int(dt_rank)


def block_kinds(cfg: Mapping) -> list[str]:
    """The block kind of each sublayer, in order (``cfg`` from ``load_config``)."""
    return [str(cfg["blocks"][symbol]["kind"]) for symbol in cfg["stack"]]


def _canonical_spec(spec: Mapping[str, Any], d_model: int) -> dict:
    """A block spec with derived sizes filled in (so that ``d_ff: null`` and its explicit value
    hash alike) and the keys of ``HASH_EXCLUDE`` removed."""
    s = dict(spec)
    kind = s["kind"]
    if kind in ("mlp", "moe"):
        s["d_ff"] = resolve_ffn_dim(d_model, s.get("d_ff"), s.get("activation", "swiglu"))
    if kind == "moe" and "shared_d_ff" in s and s["shared_d_ff"] is None:
        s["shared_d_ff"] = s["d_ff"]
    if kind == "mamba":
        s["dt_rank"] = resolve_dt_rank(d_model, s.get("dt_rank", "auto"))
    if kind == "attention":
        if s.get("n_kv_heads") is None:
            s["n_kv_heads"] = s["n_heads"]
        if s.get("head_dim") is None:
            s["head_dim"] = d_model // s["n_heads"]
    for k in HASH_EXCLUDE.get(kind, ()):
        s.pop(k, None)
    return {k: (float(v) if isinstance(v, float) else v) for k, v in sorted(s.items())}


def config_hash(cfg: Mapping) -> str:
    """sha256 (hex) of a canonical JSON of what defines the model's weights and computation:
    ``model`` (less init/checkpointing keys) and, per sublayer, its block spec (less ``impl``,
    init and training-only keys, derived sizes resolved). Symbol names, pipeline stages,
    ``train`` and ``deepspeed`` do not count. Call it after ``model.vocab_size`` is resolved
    (``"auto"`` hashes as the string)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    model = {k: v for k, v in cfg["model"].items() if k not in HASH_EXCLUDE["model"]}
    d_model = model["d_model"]
    specs = {s: _canonical_spec(cfg["blocks"][s], d_model) for s in set(cfg["stack"])}
    payload = {"version": 1, "model": model, "layers": [specs[s] for s in cfg["stack"]]}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
