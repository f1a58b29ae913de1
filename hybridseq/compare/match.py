"""``--match params|active_params|none``: rescale each layout's ``d_model`` so that its parameter
count agrees with the first (reference) layout's, using the closed-form counts only (no model is
built).

Search: every ``d_model`` that is a multiple of 8 (8, 16, ...) is tried, in increasing order, until
the count passes ``(1 + tol) * target`` (counts grow monotonically with ``d_model``); the candidate
whose count is nearest the target wins (ties: the one nearest the original ``d_model``). It must
land within ``tol`` (5%) of the target, else ``MatchError``.

What follows ``d_model`` (the layout's proportions are kept) is each block kind's own rule,
``spec.rescaled(d_old, d_new, ffn_scale)``: sizes derived from it (``d_ff: null``, ``dt_rank:
auto``, ``head_dim: null``) follow by themselves; an explicit ``d_ff`` / ``shared_d_ff`` scales by
``d_new / d_old``, rounded to a multiple of 8; an attention ``head_dim`` with ``n_heads *
head_dim == d_old`` becomes ``d_new / n_heads``; other explicit sizes stay. A kind may refuse a
``d_model`` (attention: ``n_heads`` must divide it when the head dim follows it, and RoPE needs
an even head dim): such a candidate is skipped. Small models: when steps of 8 in ``d_model``
alone cannot land within the tolerance and the layout has feed-forward widths, every one is also
scaled by one common factor (multiples of 8) around the best ``d_model`` (``_ffn_fallback``);
the overrides show what changed.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

from ..config import load_config
from ..errors import HybridSeqError

MODES = ("params", "active_params", "none")
DEFAULT_TOLERANCE = 0.05
MAX_D_MODEL = 65536


class MatchError(HybridSeqError):
    """No ``d_model`` brings a layout within the tolerance of the reference count."""


@dataclass
class MatchResult:
    """How one layout was rescaled. ``overrides``: dotted ``key=value`` strings that
    ``load_config`` applies; empty for the reference layout or ``--match none``."""

    mode: str
    d_model_original: int
    d_model: int
    count_original: int
    count: int
    target: int
    overrides: list[str] = field(default_factory=list)

    @property
    def rel_diff(self) -> float:
        return (self.count - self.target) / self.target if self.target else 0.0

    def as_dict(self) -> dict:
        return {"mode": self.mode, "d_model_original": self.d_model_original, "d_model": self.d_model,
                "count_original": self.count_original, "count": self.count, "target": self.target,
                "rel_diff": self.rel_diff, "overrides": list(self.overrides)}


def _plain(cfg) -> dict:
    if isinstance(cfg, dict):
        return copy.deepcopy(cfg)
    return cfg.to_dict()


def rescale_settings(cfg, d_new: int, ffn_scale: float = 1.0) -> dict[str, Any] | None:
    """The dotted settings (``model.d_model`` first) that move ``cfg`` to ``d_model = d_new``,
    or None when a block used by the layout cannot take ``d_new`` (unused block symbols are
    left as they are). ``ffn_scale`` (the fallback knob) further multiplies every feed-forward
    width (rounded to 8)."""
    c = load_config(cfg)
    d_old = c.model.d_model
    out: dict[str, Any] = {"model.d_model": int(d_new)}
    used = set(c.stack)
    for sym, spec in c.blocks.items():
        keys = spec.rescaled(d_old, int(d_new), ffn_scale)
        if keys is None:
            if sym in used:
                return None
            continue
        out.update({f"blocks.{sym}.{k}": v for k, v in keys.items()})
    return out


def _has_ffn(c: dict) -> bool:
    cfg = load_config(c)
    return any(cfg.blocks[s].has_ffn() for s in set(cfg.stack))


def _apply(c: dict, settings: dict[str, Any]) -> dict:
    c = copy.deepcopy(c)
    for key, value in settings.items():
        node = c
        parts = key.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = value
    return c


def _get(c: dict, key: str):
    node = c
    for p in key.split("."):
        node = node.get(p) if isinstance(node, dict) else None
    return node


def count_params(cfg, which: str = "params") -> int:
    """Closed-form total (``params``) or active (``active_params``) parameter count of a loaded
    config (embedding, head, norms and every block; see ``hybridseq.train.accounting``)."""
    from ..train.accounting import account

    return int(account(load_config(cfg), seq_len=1)["totals"][which])


def match_one(cfg, target: int, mode: str, tol: float = DEFAULT_TOLERANCE) -> MatchResult:
    """Rescale ``cfg``'s d_model so that its ``mode`` count is within ``tol`` of ``target``."""
    if mode not in ("params", "active_params"):
        raise HybridSeqError(f"--match: unknown mode {mode!r} (one of: {', '.join(MODES)})")
    c = _plain(cfg)
    d_old = int(c["model"]["d_model"])
    original = count_params(c, mode)
    if abs(original - target) <= tol * target:  # already within the tolerance: left as it is
        return MatchResult(mode, d_old, d_old, original, original, target)
    best = None  # (|diff|, |d - d_old|, d, count, settings)
    d = 8
    while d <= MAX_D_MODEL:
        settings = rescale_settings(c, d)
        if settings is not None:
            n = count_params(_apply(c, settings), mode)
            key = (abs(n - target), abs(d - d_old))
            if best is None or key < best[:2]:
                best = (*key, d, n, settings)
            if n > (1 + tol) * target:
                break
        d += 8
    if best is not None and abs(best[3] - target) > tol * target and _has_ffn(c):
        best = _ffn_fallback(c, target, mode, best, d_old, tol)
    name = c.get("name") or "layout"
    if best is None:
        raise MatchError(f"{name}: no d_model (multiple of 8) keeps its attention heads valid")
    _, _, d, n, settings = best
    if abs(n - target) > tol * target:
        raise MatchError(f"{name}: cannot match {mode} within {tol:.0%} of {target:,}: the nearest "
                         f"d_model={d} gives {n:,} ({(n - target) / target:+.1%}); d_model moves in "
                         f"steps of 8, too coarse at this size: use larger models, or --match none")
    current = {k: _get(c, k) for k in settings}
    changed = any(current[k] != v for k, v in settings.items())
    overrides = [f"{k}={v}" for k, v in settings.items()] if changed else []
    return MatchResult(mode, d_old, d if overrides else d_old, original, n if overrides else original,
                       target, overrides)


def _ffn_fallback(c: dict, target: int, mode: str, best: tuple, d_old: int, tol: float) -> tuple:
    """When steps of 8 in d_model alone miss the tolerance (small models): around the best
    d_model (+-16), also scale every FFN width by one common factor (0.25x .. 4x, steps of 2%).
    Among the candidates within ``tol`` the one changing the FFN least (then nearest the best
    d_model) wins; if none is within ``tol``, the nearest count."""
    d_best = best[2]
    within = None   # (|log scale|, |d - d_best|, d, n, settings)
    for d in range(max(8, d_best - 16), d_best + 17, 8):
        scale = 0.25
        while scale <= 4.0:
            settings = rescale_settings(c, d, scale)
            if settings is None:
                break
            n = count_params(_apply(c, settings), mode)
            if abs(n - target) <= tol * target:
                key = (abs(math.log(scale)), abs(d - d_best))
                if within is None or key < within[:2]:
                    within = (*key, d, n, settings)
            key = (abs(n - target), abs(d - d_old))
            if key < best[:2]:
                best = (*key, d, n, settings)
            if n > 1.1 * target:
                break
            scale *= 1.02
    if within is not None:
        _, _, d, n, settings = within
        return (abs(n - target), abs(d - d_old), d, n, settings)
    return best


def match_layouts(cfgs: list, mode: str, tol: float = DEFAULT_TOLERANCE) -> list[MatchResult]:
    """One ``MatchResult`` per config; the first config is the reference (unchanged)."""
    if mode not in MODES:
        raise HybridSeqError(f"--match: unknown mode {mode!r} (one of: {', '.join(MODES)})")
    if not cfgs:
        return []
    which = "active_params" if mode == "active_params" else "params"
    ref = count_params(cfgs[0], which)
    out = []
    for i, cfg in enumerate(cfgs):
        d = int(_plain(cfg)["model"]["d_model"])
        n = count_params(cfg, which)
        if mode == "none" or i == 0:
            out.append(MatchResult(mode, d, d, n, n, ref))
        else:
            out.append(match_one(cfg, ref, which, tol))
    return out


__all__ = ["MODES", "DEFAULT_TOLERANCE", "MatchError", "MatchResult", "count_params", "match_layouts",
           "match_one", "rescale_settings"]
