"""The ``attention`` kind's keys, checks and closed forms: causal multi-head attention with GQA,
optional RoPE, QK-norm and a sliding window. The module is ``block.AttentionBlock``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ...spec import fail, option
from ..spec import BlockSpec


@dataclass(eq=False)
class AttentionSpec(BlockSpec):
    kind: ClassVar[str] = "attention"
    megatron: ClassVar[str | None] = "*"
    documents: ClassVar[str] = "mask"

    n_heads: int = option(4, ge=1)
    n_kv_heads: int | None = option(None, ge=1, doc="None: = n_heads (MHA); fewer: GQA")
    head_dim: int | None = option(None, ge=1, doc="None: d_model // n_heads")
    rope_theta: float | None = option(10000.0, gt=0, doc="None: no positional encoding (Jamba)")
    window: int | None = option(None, ge=1, doc="None: full causal; N: sliding window of N tokens")
    qk_norm: bool = False
    bias: bool = False
    impl: Literal["auto", "flash_attn", "sdpa", "flex", "torch"] = "auto"

    def check(self, *, file=None, key: str = "", d_model: int | None = None, **context) -> None:
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

    # --- sizes ---------------------------------------------------------------------------------
    def dims(self, d_model: int) -> tuple[int, int, int]:
        """(n_heads, n_kv_heads, head_dim) with the defaults resolved."""
        h = int(self.n_heads)
        return h, int(self.n_kv_heads or h), int(self.head_dim or d_model // h)

    def cache_slots(self, max_seq_len: int) -> int:
        """KV slots of the inference cache: ``max_seq_len``, or the window (a ring buffer)."""
        return max_seq_len if self.window is None else min(int(self.window), max_seq_len)

    def param_count(self, d_model: int) -> tuple[int, int]:
        """Wq, Wo: d * h * hd each; Wk, Wv: d * h_kv * hd each; biases h hd + 2 h_kv hd + d;
        QK-norm weights 2 hd."""
        h, hkv, hd = self.dims(d_model)
        n = 2 * d_model * h * hd + 2 * d_model * hkv * hd
        if self.bias:
            n += h * hd + 2 * hkv * hd + d_model
        if self.qk_norm:
            n += 2 * hd
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
        if self.window:
            out += f" window={self.window}"
        return out

    def resolved(self, d_model: int) -> dict:
        h, hkv, hd = self.dims(d_model)
        return {**self.to_dict(), "n_kv_heads": hkv, "head_dim": hd}

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
