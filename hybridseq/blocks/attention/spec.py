"""The ``attention`` kind's keys, checks and closed forms: causal multi-head attention with GQA,
optional RoPE (scaled, partial), QK-norm, clipping of the projections and a sliding window. The
module is ``block.AttentionBlock``.

- ``qk_norm``: null (none), ``per_head`` (RMSNorm over each head's head_dim channels, Qwen3) or
  ``full`` (RMSNorm over the whole q projection and the whole k projection, OLMoE); the
  booleans of older files still read: true is ``per_head``, false null. Epsilon ``qk_norm_eps``.
- ``clip_qkv``: the q, k and v projections clamped to [-c, c] (after a ``full`` norm; OLMoE).
- ``rope_scaling``: null, or ``{type: linear|llama3|yarn, ...}`` (``rope.py``).
- ``partial_rotary``: the fraction of head_dim that RoPE rotates (the first channels).
- ``softmax_scale``: the score scale (null: head_dim ** -0.5; Granite's attention_multiplier).
- ``bias``: biases on q, k, v and o (true), none (false), or on q, k, v only (``qkv``: Qwen2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ...spec import describe, fail, option
from ..spec import BlockSpec

# the keys each rope_scaling type takes: required, then optional
ROPE_SCALING_KEYS = {
    "linear": (("factor",), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), ()),
    "yarn": (("factor", "original_max_position_embeddings"),
             ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")),
}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(eq=False)
class AttentionSpec(BlockSpec):
    kind: ClassVar[str] = "attention"
    megatron: ClassVar[str | None] = "*"
    documents: ClassVar[str] = "mask"
    hash_optional: ClassVar[dict] = {"qk_norm_eps": 1e-6, "clip_qkv": None, "rope_scaling": None,
                                     "partial_rotary": 1.0, "softmax_scale": None}

    n_heads: int = option(4, ge=1)
    n_kv_heads: int | None = option(None, ge=1, doc="None: = n_heads (MHA); fewer: GQA")
    head_dim: int | None = option(None, ge=1, doc="None: d_model // n_heads")
    rope_theta: float | None = option(10000.0, gt=0, doc="None: no positional encoding (Jamba)")
    window: int | None = option(None, ge=1, doc="None: full causal; N: sliding window of N tokens")
    qk_norm: Literal["per_head", "full"] | bool | None = None
    qk_norm_eps: float = option(1e-6, gt=0)
    clip_qkv: float | None = option(None, gt=0)
    rope_scaling: dict | None = None
    partial_rotary: float = option(1.0, gt=0, le=1)
    softmax_scale: float | None = option(None, gt=0, doc="None: head_dim ** -0.5")
    bias: Literal["qkv"] | bool = False
    impl: Literal["auto", "flash_attn", "sdpa", "flex", "torch"] = "auto"

    def check(self, *, file=None, key: str = "", d_model: int | None = None, **context) -> None:
        # the booleans of older files: true is a per-head norm, false none
        if self.qk_norm is True:
            self.qk_norm = "per_head"
        elif self.qk_norm is False:
            self.qk_norm = None
        self._check_rope_scaling(file, key)
        h, kv = self.n_heads, self.n_kv_heads
        if kv is not None and h % kv != 0:
            fail(file, f"{key}.n_kv_heads", f"n_kv_heads={kv} does not divide n_heads={h}",
                 "query heads are shared evenly among key/value heads")
        head_dim = self.head_dim
        if head_dim is None and d_model is not None:
            if d_model % h != 0:
                fail(file, f"{key}.n_heads", f"n_heads={h} does not divide d_model={d_model}",
                     "pick n_heads dividing d_model, or set head_dim")
            head_dim = d_model // h
        if self.rope_theta is not None and head_dim is not None and head_dim % 2 != 0:
            fail(file, f"{key}.rope_theta", f"RoPE needs an even head_dim, got head_dim={head_dim}",
                 "make head_dim even, or set rope_theta: null for no positional encoding")
        if self.rope_theta is not None and head_dim is not None and self.partial_rotary != 1.0:
            rot = int(head_dim * self.partial_rotary)
            if rot < 2 or rot % 2:
                fail(file, f"{key}.partial_rotary", f"partial_rotary={self.partial_rotary} rotates "
                     f"{rot} of head_dim={head_dim} channels", "the rotated channels must be an even number >= 2")

    def _check_rope_scaling(self, file, key: str) -> None:
        rs = self.rope_scaling
        if rs is None:
            return
        k = f"{key}.rope_scaling"
        kind = rs.get("type")
        if kind not in ROPE_SCALING_KEYS:
            fail(file, f"{k}.type", f"{describe(kind)} is not allowed", "one of: " + ", ".join(ROPE_SCALING_KEYS))
        required, optional = ROPE_SCALING_KEYS[kind]
        for name in rs:
            if name != "type" and name not in required and name not in optional:
                fail(file, f"{k}.{name}", f"unknown {kind} rope_scaling key '{name}'",
                     "allowed: " + ", ".join(("type", *required, *optional)))
        for name in required:
            if name not in rs:
                fail(file, f"{k}.{name}", "missing", f"{kind} rope_scaling needs: " + ", ".join(required))
        out: dict[str, Any] = {"type": kind}
        for name, v in rs.items():
            if name == "type":
                continue
            if name == "truncate":
                if not isinstance(v, bool):
                    fail(file, f"{k}.{name}", f"expected true or false, got {describe(v)}")
                out[name] = v
            elif v is None and name in optional:
                out[name] = None
            elif not _number(v) or v <= 0:
                fail(file, f"{k}.{name}", f"{describe(v)} is not allowed", "a positive number")
            else:
                out[name] = int(v) if name == "original_max_position_embeddings" else float(v)
        if kind == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
            fail(file, f"{k}.high_freq_factor", "high_freq_factor must exceed low_freq_factor")
        self.rope_scaling = out

    def rope_dim(self, d_model: int) -> int:
        """The channels of a head that RoPE rotates: int(head_dim * partial_rotary)."""
        return int(self.dims(d_model)[2] * self.partial_rotary)

    def qk_norm_kind(self) -> str | None:
        """``per_head``, ``full`` or None (the booleans read as ``check`` maps them, also on a
        spec built without ``from_mapping``)."""
        q = self.qk_norm
        return "per_head" if q is True or q == "per_head" else ("full" if q == "full" else None)

    def qk_norm_sizes(self, d_model: int) -> tuple[int, int]:
        """The widths of the q and k norms' weights: (head_dim, head_dim) per head, (h hd, h_kv hd)
        for ``full``, (0, 0) without a norm."""
        h, hkv, hd = self.dims(d_model)
        kind = self.qk_norm_kind()
        if kind == "full":
            return h * hd, hkv * hd
        if kind == "per_head":
            return hd, hd
        return 0, 0

    # --- sizes ---------------------------------------------------------------------------------
    def dims(self, d_model: int) -> tuple[int, int, int]:
        """(n_heads, n_kv_heads, head_dim) with the defaults resolved."""
        h = int(self.n_heads)
        return h, int(self.n_kv_heads or h), int(self.head_dim or d_model // h)

    def cache_slots(self, max_seq_len: int) -> int:
        """KV slots of the inference cache: ``max_seq_len``, or the window (a ring buffer)."""
        return max_seq_len if self.window is None else min(int(self.window), max_seq_len)

    def param_count(self, d_model: int) -> tuple[int, int]:
        """Wq, Wo: d * h * hd each; Wk, Wv: d * h_kv * hd each; biases h hd + 2 h_kv hd (+ d for
        o unless ``bias: qkv``); QK-norm weights 2 hd per head, h hd + h_kv hd ``full``."""
        h, hkv, hd = self.dims(d_model)
        n = 2 * d_model * h * hd + 2 * d_model * hkv * hd
        if self.bias:
            n += h * hd + 2 * hkv * hd + (0 if self.bias == "qkv" else d_model)
        n += sum(self.qk_norm_sizes(d_model))
        return n, n

    def flops_per_token(self, d_model: int, seq_len: int) -> float:
        """Projections: 2 d (2 h hd + 2 h_kv hd). Scores and values: 4 h hd * c, with c the mean
        number of keys a query sees over a sequence of ``seq_len`` tokens (exactly causal:
        (L + 1) / 2 without a window; mean of min(i + 1, W) with one)."""
        h, hkv, hd = self.dims(d_model)
        proj = 2 * d_model * (2 * h * hd + 2 * hkv * hd)
        L = max(int(seq_len), 1)
        w = self.window
        if w is None or w >= L:
            ctx = (L + 1) / 2
        else:
            ctx = (w * (w + 1) / 2 + (L - w) * w) / L
        return float(proj + 4 * h * hd * ctx)

    def state_bytes(self, d_model: int, max_seq_len: int, dtype_bytes: int = 2) -> int:
        """K and V: 2 * n_kv_heads * head_dim * min(window or T, T) * dtype_bytes."""
        _, hkv, hd = self.dims(d_model)
        return 2 * hkv * hd * self.cache_slots(max_seq_len) * dtype_bytes

    def activation_elements(self, d_model: int) -> int:
        """q, k, v and the attention output (fused attention keeps O(L) statistics, not the
        L x L scores)."""
        h, hkv, hd = self.dims(d_model)
        return 2 * h * hd + 2 * hkv * hd

    # --- texts ---------------------------------------------------------------------------------
    def _settings(self, d_model: int) -> str:
        kv = self.n_kv_heads or self.n_heads
        out = f"heads={self.n_heads}/{kv}"
        if self.head_dim:
            out += f" head_dim={self.head_dim}"
        out += " rope" if self.rope_theta else " nope"
        if self.rope_theta and self.partial_rotary != 1.0:
            out += f"x{self.partial_rotary:g}"
        if self.rope_theta and self.rope_scaling:
            out += f"({self.rope_scaling['type']})"
        if self.qk_norm_kind():
            out += f" qk_norm={self.qk_norm_kind()}"
        if self.window:
            out += f" window={self.window}"
        return out

    def resolved(self, d_model: int) -> dict:
        h, hkv, hd = self.dims(d_model)
        return {**self.to_dict(), "n_kv_heads": hkv, "head_dim": hd}

    def canonical(self, d_model: int) -> dict:
        """As ``BlockSpec.canonical``, with ``qk_norm`` hashed in its boolean form (null: false,
        per_head: true), so that configs that write the booleans keep their hash."""
        out = super().canonical(d_model)
        kind = self.qk_norm_kind()
        out["qk_norm"] = {None: False, "per_head": True}.get(kind, kind)
        return out

    def rescaled(self, d_old: int, d_new: int, ffn_scale: float = 1.0):
        """The head dim follows d_model when it was derived from it (null, or n_heads * head_dim
        == d_old); ``n_heads`` must then divide the new d_model, and RoPE needs it even."""
        out = {}
        h, hd = int(self.n_heads), self.head_dim
        if hd is None or int(hd) * h == d_old:
            if d_new % h:
                return None
            new_hd = d_new // h
            if hd is not None:
                out["head_dim"] = new_hd
        else:
            new_hd = int(hd)
        if self.rope_theta is not None and new_hd % 2:
            return None
        if self.rope_theta is not None and self.partial_rotary != 1.0:
            rot = int(new_hd * self.partial_rotary)
            if rot < 2 or rot % 2:
                return None
        return out

    def backend(self, device) -> tuple[str, str]:
        from .backends import describe_attention_backend

        full = describe_attention_backend(self, device)
        window = describe_attention_backend(self.replace(window=256), device)
        docs = describe_attention_backend(self, device, documents=True)
        why = f"{full[1]} (sliding window: {window[0]}, {window[1]})" if window != full else full[1]
        return full[0], f"{why} (document masks: {docs[0]}, {docs[1]})"

    def build(self, d_model: int, *, layer_idx: int = 0, n_layers: int = 1):
        from .block import AttentionBlock

        return AttentionBlock(d_model, self, layer_idx=layer_idx, n_layers=n_layers)
