"""Closed-form accounting of a config, without building the model: what ``hybridseq show`` prints
and what MFU and ``compare`` use.

Per sublayer (pre-norm residual ``x + block(norm(x))``): its block spec's ``param_count``,
``flops_per_token`` and ``state_bytes`` plus its norm (``d_model`` gains for RMSNorm,
``2 * d_model`` for LayerNorm; no FLOPs counted for norms). Model level: token embedding
``V * d_model`` (not a matmul: 0 FLOPs), final norm, LM head ``V * d_model`` parameters unless
tied (``2 * d_model * V`` FLOPs per token either way). ``V`` is ``model.vocab_size``, or the
task's vocabulary when ``auto``, rounded up to ``pad_vocab_multiple``. FLOPs are forward FLOPs
per token (2 per multiply-accumulate) at ``seq_len`` (default: the task's sequence length); a
training step costs about 3x that. Nothing here imports torch.
"""
from __future__ import annotations

from ..blocks.spec import norm_param_count
from ..config import HybridConfig, load_config


def _typed(cfg) -> HybridConfig:
    return cfg if isinstance(cfg, HybridConfig) else load_config(cfg)


def resolve_vocab_size(cfg) -> int:
    """``model.vocab_size`` (``auto``: the task's vocabulary), rounded up to ``pad_vocab_multiple``."""
    c = _typed(cfg)
    v = c.model.vocab_size
    if v == "auto":
        from ..data import task_vocab_size

        v = task_vocab_size(c.train.task)
    return c.model.padded_vocab(int(v))


def train_seq_len(cfg) -> int:
    """The sequence length the model trains at (the task's batch length)."""
    return _typed(cfg).train.task.batch_len()


def account(cfg, seq_len: int | None = None, dtype_bytes: int = 2) -> dict:
    """``{"rows": [...], "totals": {...}}`` for a loaded config.

    Each row: ``index, symbol, kind, params, active_params, flops_per_token, state_bytes,
    settings`` (params include the sublayer's norm). Totals: ``params``, ``active_params``,
    ``embedding_params``, ``head_params``, ``flops_per_token``, ``state_bytes`` (inference
    state per sequence at ``seq_len`` for KV caches, ``dtype_bytes`` per element), ``vocab_size``,
    ``seq_len``, ``n_sublayers``."""
    c = _typed(cfg)
    d = c.model.d_model
    V = resolve_vocab_size(c)
    L = int(seq_len) if seq_len else train_seq_len(c)
    norm_params = norm_param_count(c.model.norm, d)
    rows = []
    for i, (symbol, spec) in enumerate(c.layers()):
        total, active = spec.param_count(d)
        rows.append({
            "index": i, "symbol": symbol, "kind": spec.kind,
            "params": int(total) + norm_params, "active_params": int(active) + norm_params,
            "flops_per_token": float(spec.flops_per_token(d, L)),
            "state_bytes": int(spec.state_bytes(d, L, dtype_bytes)),
            "settings": spec.settings(d),
        })
    emb = V * d
    head = 0 if c.model.tie_embeddings else V * d
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


from ..tables import human  # noqa: E402,F401 (show, plan and compare print with it)
