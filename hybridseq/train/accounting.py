"""Closed-form accounting of a config, without building the model: what ``hybridseq show`` prints
and what MFU and ``compare`` use.

Per sublayer (pre-norm residual ``x + block(norm(x))``): the block's ``param_count``,
``flops_per_token`` and ``state_bytes`` (static methods of the Block classes in
``hybridseq.blocks.BLOCKS``) plus its norm (``d_model`` gains for RMSNorm, ``2 * d_model`` for
LayerNorm; no FLOPs counted for norms). Model level: token embedding ``V * d_model`` (not a
matmul: 0 FLOPs), final norm, LM head ``V * d_model`` parameters unless tied (``2 * d_model * V``
FLOPs per token either way). ``V`` is ``model.vocab_size``, or the task's vocabulary when
``auto``, rounded up to ``pad_vocab_multiple``. FLOPs are forward FLOPs per token (2 per
multiply-accumulate) at ``seq_len`` (default: the task's sequence length); a training step costs
about 3x that.
"""
from __future__ import annotations

from typing import Any, Mapping


def _plain(node) -> Any:
    if isinstance(node, (dict, list, str, int, float, bool)) or node is None:
        return node
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)


def resolve_vocab_size(cfg) -> int:
    """``model.vocab_size`` (``auto``: the task's vocabulary), rounded up to ``pad_vocab_multiple``."""
    model = _plain(cfg["model"])
    v = model.get("vocab_size", "auto")
    if v == "auto" or v is None:
        from ..data import task_vocab_size

        v = task_vocab_size(_plain(cfg["train"]["task"]) if cfg.get("train") else "selective_copy")
    mult = int(model.get("pad_vocab_multiple") or 1)
    return -(-int(v) // mult) * mult


def train_seq_len(cfg) -> int:
    """The sequence length the model trains at (the task's batch length)."""
    from ..data import make_task, task_spec

    task = _plain(cfg["train"]["task"]) if cfg.get("train") else "selective_copy"
    try:
        return make_task(task).seq_len
    except Exception:  # e.g. a text task whose files are elsewhere: the configured length
        return int(task_spec(task)["seq_len"])


def key_settings(kind: str, spec: Mapping[str, Any], d_model: int | None = None) -> str:
    """A short human summary of a block spec for tables (derived sizes resolved when
    ``d_model`` is given)."""
    s = dict(spec)
    if d_model and kind in ("mlp", "moe"):
        from ..config import resolve_ffn_dim

        s["d_ff"] = resolve_ffn_dim(d_model, s.get("d_ff"), s.get("activation", "swiglu"))
    if kind == "mamba":
        out = f"d_state={s.get('d_state')} d_conv={s.get('d_conv')} expand={s.get('expand')}"
    elif kind == "attention":
        kv = s.get("n_kv_heads") or s.get("n_heads")
        out = f"heads={s.get('n_heads')}/{kv}"
        if s.get("head_dim"):
            out += f" head_dim={s['head_dim']}"
        out += " rope" if s.get("rope_theta") else " nope"
        if s.get("window"):
            out += f" window={s['window']}"
    elif kind == "moe":
        out = f"experts={s.get('n_experts')} top_k={s.get('top_k')}"
        if s.get("d_ff"):
            out += f" d_ff={s['d_ff']}"
        if s.get("shared_experts"):
            out += f" shared={s['shared_experts']}"
        if s.get("capacity_factor"):
            out += f" cf={s['capacity_factor']}"
    elif kind == "mlp":
        out = (f"d_ff={s['d_ff']} " if s.get("d_ff") else "") + f"{s.get('activation')}"
    else:
        out = " ".join(f"{k}={v}" for k, v in s.items() if k not in ("kind", "impl"))
    if s.get("impl") not in (None, "auto"):
        out += f" impl={s['impl']}"
    return out


def account(cfg, seq_len: int | None = None, dtype_bytes: int = 2) -> dict:
    """``{"rows": [...], "totals": {...}}`` for a loaded config.

    Each row: ``index, symbol, kind, params, active_params, flops_per_token, state_bytes,
    settings`` (params include the sublayer's norm). Totals: ``params``, ``active_params``,
    ``embedding_params``, ``head_params``, ``flops_per_token``, ``state_bytes`` (inference
    state per sequence at ``seq_len`` for KV caches, ``dtype_bytes`` per element), ``vocab_size``,
    ``seq_len``, ``n_sublayers``."""
    from ..blocks import BLOCKS, norm_param_count

    model = _plain(cfg["model"])
    blocks = _plain(cfg["blocks"])
    stack = list(_plain(cfg["stack"]))
    d = int(model["d_model"])
    V = resolve_vocab_size(cfg)
    L = int(seq_len) if seq_len else train_seq_len(cfg)
    norm_params = norm_param_count(model.get("norm", "rmsnorm"), d)
    rows = []
    for i, symbol in enumerate(stack):
        spec = dict(blocks[symbol])
        kind = spec.pop("kind")
        cls = BLOCKS[kind]
        total, active = cls.param_count(d, spec)
        rows.append({
            "index": i, "symbol": symbol, "kind": kind,
            "params": int(total) + norm_params, "active_params": int(active) + norm_params,
            "flops_per_token": float(cls.flops_per_token(d, spec, L)),
            "state_bytes": int(cls.state_bytes(d, spec, L, dtype_bytes)),
            "settings": key_settings(kind, spec, d),
        })
    emb = V * d
    head = 0 if model.get("tie_embeddings", True) else V * d
    fixed = emb + head + norm_params
    totals = {
        "params": fixed + sum(r["params"] for r in rows),
        "active_params": fixed + sum(r["active_params"] for r in rows),
        "embedding_params": emb, "head_params": head,
        "flops_per_token": 2.0 * d * V + sum(r["flops_per_token"] for r in rows),
        "state_bytes": sum(r["state_bytes"] for r in rows),
        "vocab_size": V, "seq_len": L, "n_sublayers": len(rows), "d_model": d,
    }
    return {"rows": rows, "totals": totals}


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M' (base 10; bytes use base 2: 'KiB', 'MiB')."""
    if unit == "B":
        for u in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(n) < 1024 or u == "TiB":
                return f"{n:.0f} {u}" if u == "B" else f"{n:.2f} {u}"
            n /= 1024
    for u in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000 or u == "P":
            return f"{n:.0f}{u}" if u == "" else f"{n:.3g}{u}"
        n /= 1000
    return str(n)
