"""Causal multi-head attention block (kind ``attention``): GQA, optional RoPE, QK-norm, window.

    q = x Wq  (h heads),  k = x Wk,  v = x Wv  (h_kv heads, h % h_kv == 0)
    q, k = rmsnorm(q), rmsnorm(k)    per head, when spec.qk_norm
    q, k = rope(q, pos), rope(k, pos) when spec.rope_theta is not None (None: no positions, Jamba)
    o = softmax(q k^T / sqrt(head_dim) + causal/window mask) v,  out = o Wo

The attention itself runs on a backend of ``attention_backends`` chosen by ``spec.impl``.

Packed sequences: ``forward(x, doc_ids=ids)`` with ``ids`` (b, l) integer adds a document mask:
position t sees s only when s <= t, within the window, and s, t lie in the same document (a
maximal run of equal ids in the row). RoPE positions then restart at each document start
(``t - start of t's document``) unless ``restart_positions=False`` (positions 0..l-1 of the
row). Restarting is the default, as in packed pretraining: with RoPE the scores depend on
``t - s`` only, so the choice changes results only through rounding, and restarting makes a
document's numbers those it would get alone. Document masks are for cache-free forwards
(training, scoring); with an inference cache (``state``) they raise NotImplementedError.

Inference state (``new_state``): ``{"k", "v"}`` of shape (b, h_kv, cap, head_dim), keys stored
after RoPE. Full attention: cap = max_seq_len, token at position p in slot p. Sliding window of W:
a ring buffer of cap = min(W, max_seq_len) slots, position p in slot p % cap. The slot positions
follow from the offset alone, so there is no other bookkeeping. Prefilling a chunk of any length
attends to the cached keys plus the chunk's own, then stores the chunk's last cap keys.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..config.schema import BLOCK_DEFAULTS
from ..errors import ConfigError, HybridSeqError
from .attention_backends import attention, attention_tail, attention_with_positions, document_layout
from .base import Block
from .norm import RMSNorm
from .rope import apply_rope, rope_tables

QK_NORM_EPS = 1e-6


def _spec(spec: Mapping[str, Any]) -> dict:
    return {**BLOCK_DEFAULTS["attention"], **dict(spec)}


def _dims(d_model: int, spec: Mapping[str, Any]) -> tuple[int, int, int]:
    """(n_heads, n_kv_heads, head_dim) with the defaults resolved and checked."""
    h = int(spec["n_heads"])
    hkv = int(spec["n_kv_heads"] or h)
    if h < 1 or hkv < 1 or h % hkv:
        raise ConfigError(f"n_kv_heads={hkv} must divide n_heads={h}", key="attention.n_kv_heads")
    if spec["head_dim"] is None:
        if d_model % h:
            raise ConfigError(f"n_heads={h} must divide d_model={d_model} (or set head_dim)",
                              key="attention.n_heads")
        hd = d_model // h
    else:
        hd = int(spec["head_dim"])
    if spec["rope_theta"] is not None and hd % 2:
        raise ConfigError(f"RoPE needs an even head_dim, got {hd}", key="attention.head_dim")
    return h, hkv, hd


class AttentionBlock(Block):
    kind = "attention"

    def __init__(self, d_model: int, spec: Mapping[str, Any], *, layer_idx: int = 0, n_layers: int = 1):
        spec = _spec(spec)
        super().__init__(d_model, spec, layer_idx=layer_idx, n_layers=n_layers)
        self.n_heads, self.n_kv_heads, self.head_dim = _dims(d_model, spec)
        self.window = None if spec["window"] is None else int(spec["window"])
        if self.window is not None and self.window < 1:
            raise ConfigError(f"window must be >= 1 token, got {self.window}", key="attention.window")
        self.rope_theta = None if spec["rope_theta"] is None else float(spec["rope_theta"])
        self.impl = spec["impl"]
        bias = bool(spec["bias"])
        h, hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        self.q_proj = nn.Linear(d_model, h * hd, bias=bias)
        self.k_proj = nn.Linear(d_model, hkv * hd, bias=bias)
        self.v_proj = nn.Linear(d_model, hkv * hd, bias=bias)
        self.o_proj = nn.Linear(h * hd, d_model, bias=bias)
        if spec["qk_norm"]:
            self.q_norm = RMSNorm(hd, QK_NORM_EPS)
            self.k_norm = RMSNorm(hd, QK_NORM_EPS)
        else:
            self.q_norm = self.k_norm = None

    # --- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, state=None, offset: int = 0, doc_ids: torch.Tensor | None = None,
                restart_positions: bool = True) -> torch.Tensor:
        b, l, _ = x.shape
        layout = None
        if doc_ids is not None:
            if state is not None or offset:
                raise NotImplementedError(
                    f"attention layer {self.layer_idx}: doc_ids (document masks) with an inference "
                    "cache or offset are not supported; pass doc_ids only to cache-free forwards")
            layout = document_layout(doc_ids, x.device)
            if layout.shape != (b, l):
                raise HybridSeqError(f"attention layer {self.layer_idx}: doc_ids has shape "
                                     f"{tuple(doc_ids.shape)}, the input (batch, seqlen) = {(b, l)}")
        q = self.q_proj(x).view(b, l, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, l, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, l, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_theta is not None:
            if layout is not None and restart_positions:
                pos = layout.positions  # (b, l): restart at each document start
            else:
                pos = torch.arange(offset, offset + l, device=x.device)
            cos, sin = rope_tables(pos, self.head_dim, self.rope_theta)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if state is None:
            if offset:
                raise HybridSeqError("attention: offset > 0 needs the cached keys (pass state)")
            o = attention(q, k, v, window=self.window, impl=self.impl, doc_ids=doc_ids)
        else:
            o = self._attend_cached(q, k, v, state, offset).to(x.dtype)
        return self.o_proj(o.reshape(b, l, self.n_heads * self.head_dim))

    def _slot_positions(self, cap: int, offset: int, n: int, device) -> torch.Tensor:
        """Positions held by ring slots 0..n-1 before this chunk: the largest p < offset with
        p % cap == slot."""
        s = torch.arange(n, device=device)
        return s + cap * torch.div(offset - 1 - s, cap, rounding_mode="floor")

    def _attend_cached(self, q, k, v, state, offset: int) -> torch.Tensor:
        kc, vc = state["k"], state["v"]  # (b, h_kv, cap, hd)
        b, l = q.shape[0], q.shape[1]
        cap = kc.shape[2]
        if kc.shape[0] != b:
            raise HybridSeqError(f"attention cache holds batch {kc.shape[0]}, input has batch {b}")
        dev = q.device
        q = q.to(kc.dtype)
        k = k.to(kc.dtype)
        v = v.to(vc.dtype)
        ring = self.window is not None and cap >= self.window
        if offset == 0:
            # first chunk: nothing cached yet, so the chunk attends to itself on the fast path
            if not ring and l > cap:
                raise HybridSeqError(
                    f"attention KV cache is full: it holds max_seq_len={cap} tokens, {l} were given")
            out = attention(q, k, v, window=self.window, impl=self.impl)
            self._store(kc, vc, k, v, offset, ring)
            return out
        if not ring:
            # linear cache: slot == position
            if offset + l > cap:
                raise HybridSeqError(
                    f"attention KV cache is full: it holds max_seq_len={cap} tokens, but "
                    f"{offset} are cached and {l} more were given (make the cache with a larger "
                    "max_seq_len)")
            self._store(kc, vc, k, v, offset, ring)
            keys = kc[:, :, :offset + l].transpose(1, 2)
            vals = vc[:, :, :offset + l].transpose(1, 2)
            # no window reaches past the cache here (a window is >= cap when the cache is
            # linear), so the chunk's queries see every earlier key: bottom-right causal
            if l == 1:  # the newest position sees every cached key: no mask at all
                return attention_with_positions(q, keys, vals, impl=self.impl)
            return attention_tail(q, keys, vals, impl=self.impl)
        w = cap  # ring buffer of the last `window` keys
        if l == 1:
            # decode: store first; the ring then holds exactly the visible keys (in ring order,
            # which softmax attention does not care about): no mask
            slot = offset % w
            kc[:, :, slot] = k[:, 0]
            vc[:, :, slot] = v[:, 0]
            n = min(offset + 1, w)
            keys, vals = kc[:, :, :n].transpose(1, 2), vc[:, :, :n].transpose(1, 2)
            return attention_with_positions(q, keys, vals, impl=self.impl)
        n_past = min(offset, w)
        keys = torch.cat([kc[:, :, :n_past].transpose(1, 2), k], dim=1)
        vals = torch.cat([vc[:, :, :n_past].transpose(1, 2), v], dim=1)
        k_pos = torch.cat([self._slot_positions(w, offset, n_past, dev),
                           torch.arange(offset, offset + l, device=dev)])
        q_pos = torch.arange(offset, offset + l, device=dev)
        out = attention_with_positions(q, keys, vals, q_pos, k_pos, window=self.window,
                                       impl=self.impl)
        self._store(kc, vc, k, v, offset, ring)
        return out

    @staticmethod
    def _store(kc, vc, k, v, offset: int, ring: bool) -> None:
        """Write a chunk's keys/values (b, l, h_kv, hd) at positions offset.. into the cache."""
        l = k.shape[1]
        if not ring:
            kc[:, :, offset:offset + l] = k.transpose(1, 2)
            vc[:, :, offset:offset + l] = v.transpose(1, 2)
            return
        w = kc.shape[2]
        m = min(l, w)  # only the chunk's last m keys can still be seen
        slots = torch.arange(offset + l - m, offset + l, device=k.device) % w
        kc.index_copy_(2, slots, k[:, l - m:].transpose(1, 2))
        vc.index_copy_(2, slots, v[:, l - m:].transpose(1, 2))

    # --- inference state ---------------------------------------------------------------------
    def new_state(self, batch_size: int, max_seq_len: int, device=None, dtype=None):
        cap = max_seq_len if self.window is None else min(self.window, max_seq_len)
        dtype = dtype or self.q_proj.weight.dtype
        shape = (batch_size, self.n_kv_heads, cap, self.head_dim)
        return {"k": torch.zeros(shape, device=device, dtype=dtype),
                "v": torch.zeros(shape, device=device, dtype=dtype)}

    @staticmethod
    def state_bytes(d_model: int, spec: Mapping[str, Any], max_seq_len: int, dtype_bytes: int = 2) -> int:
        """K and V: 2 * n_kv_heads * head_dim * min(window or L, L) * dtype_bytes."""
        spec = _spec(spec)
        _, hkv, hd = _dims(d_model, spec)
        cap = max_seq_len if spec["window"] is None else min(int(spec["window"]), max_seq_len)
        return 2 * hkv * hd * cap * dtype_bytes

    # --- accounting --------------------------------------------------------------------------
    @staticmethod
    def param_count(d_model: int, spec: Mapping[str, Any]) -> tuple[int, int]:
        """Wq, Wo: d * h * hd each; Wk, Wv: d * h_kv * hd each; biases h hd + 2 h_kv hd + d;
        QK-norm weights 2 hd."""
        spec = _spec(spec)
        h, hkv, hd = _dims(d_model, spec)
        n = 2 * d_model * h * hd + 2 * d_model * hkv * hd
        if spec["bias"]:
            n += h * hd + 2 * hkv * hd + d_model
        if spec["qk_norm"]:
            n += 2 * hd
        return n, n

    @staticmethod
    def flops_per_token(d_model: int, spec: Mapping[str, Any], seq_len: int) -> float:
        """Projections: 2 d (2 h hd + 2 h_kv hd). Scores and values: 4 h hd * c, with c the mean
        number of keys a query sees over a sequence of ``seq_len`` tokens (exactly causal:
        (L + 1) / 2 without a window; mean of min(i + 1, W) with one)."""
        spec = _spec(spec)
        h, hkv, hd = _dims(d_model, spec)
        proj = 2 * d_model * (2 * h * hd + 2 * hkv * hd)
        L = max(int(seq_len), 1)
        w = spec["window"]
        if w is None or w >= L:
            ctx = (L + 1) / 2
        else:
            w = int(w)
            ctx = (w * (w + 1) / 2 + (L - w) * w) / L
        return float(proj + 4 * h * hd * ctx)

    def residual_out_params(self) -> list[nn.Parameter]:
        return [self.o_proj.weight]
