"""Causal multi-head attention block (kind ``attention``): GQA, optional RoPE, QK-norm, window.

    q = x Wq  (h heads),  k = x Wk,  v = x Wv  (h_kv heads, h % h_kv == 0)
    q, k = rmsnorm(q), rmsnorm(k)    over the whole projections, when spec.qk_norm == "full"
    q, k, v = clamp(., -c, c)        when spec.clip_qkv = c
    q, k = rmsnorm(q), rmsnorm(k)    per head, when spec.qk_norm == "per_head"
    q, k = rope(q, pos), rope(k, pos) when spec.rope_theta is not None (None: no positions, Jamba);
                                     the first int(head_dim * partial_rotary) channels, with the
                                     frequencies of spec.rope_scaling (``rope.py``)
    o = softmax(q k^T * scale + causal/window mask) v,  out = o Wo
                                     scale = spec.softmax_scale, or 1 / sqrt(head_dim)

Every option runs in the block's own PyTorch code around the backends, so it holds on every
backend and in both the sequence forward and the one-token ``step``.

The attention itself runs on a backend of ``backends.py`` chosen by ``spec.impl``.

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
attends to the cached keys plus the chunk's own, then stores the chunk's last cap keys. One token
goes through ``step``: its key/value written at its slot, the query attending to the whole
buffer under a mask of the visible slots (static shapes: the step can be captured in a CUDA
graph).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import HybridSeqError
from ..base import Block
from ..norm import RMSNorm
from .backends import attention, attention_tail, attention_with_positions, document_layout
from .rope import apply_rope, rope_tables
from .spec import AttentionSpec

class AttentionBlock(Block):
    spec_class = AttentionSpec

    def __init__(self, d_model: int, spec, *, layer_idx: int = 0, n_layers: int = 1):
        super().__init__(d_model, spec, layer_idx=layer_idx, n_layers=n_layers)
        spec = self.spec
        self.n_heads, self.n_kv_heads, self.head_dim = spec.dims(d_model)
        self.window = None if spec.window is None else int(spec.window)
        self.rope_theta = None if spec.rope_theta is None else float(spec.rope_theta)
        self.rope_dim = spec.rope_dim(d_model)
        self.rope_scaling = spec.rope_scaling
        self.qk_norm = spec.qk_norm_kind()
        self.clip_qkv = None if spec.clip_qkv is None else float(spec.clip_qkv)
        self.scale = None if spec.softmax_scale is None else float(spec.softmax_scale)
        self.impl = spec.impl
        bias = bool(spec.bias)
        h, hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        self.q_proj = nn.Linear(d_model, h * hd, bias=bias)
        self.k_proj = nn.Linear(d_model, hkv * hd, bias=bias)
        self.v_proj = nn.Linear(d_model, hkv * hd, bias=bias)
        self.o_proj = nn.Linear(h * hd, d_model, bias=bias and spec.bias != "qkv")
        if self.qk_norm:
            qn, kn = spec.qk_norm_sizes(d_model)
            self.q_norm = RMSNorm(qn, spec.qk_norm_eps)
            self.k_norm = RMSNorm(kn, spec.qk_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def _project(self, x: torch.Tensor):
        """q (b, l, h, hd), k and v (b, l, h_kv, hd) from the normed input, with the QK-norm and
        the clipping of the spec (module docstring), before RoPE."""
        b, l, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            c = self.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        q = q.view(b, l, self.n_heads, self.head_dim)
        k = k.view(b, l, self.n_kv_heads, self.head_dim)
        v = v.view(b, l, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def _rope(self, q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor):
        cos, sin = rope_tables(pos, self.rope_dim, self.rope_theta, self.rope_scaling)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    # --- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, state=None, offset: int = 0, doc_ids: torch.Tensor | None = None,
                restart_positions: bool = True) -> torch.Tensor:
        b, l, _ = x.shape
        if state is not None and l == 1 and doc_ids is None:
            self._check_room(state, offset, 1)
            return self.step(x, state, torch.tensor(offset, device=x.device))
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
        q, k, v = self._project(x)
        if self.rope_theta is not None:
            if layout is not None and restart_positions:
                pos = layout.positions  # (b, l): restart at each document start
            else:
                pos = torch.arange(offset, offset + l, device=x.device)
            q, k = self._rope(q, k, pos)
        if state is None:
            if offset:
                raise HybridSeqError("attention: offset > 0 needs the cached keys (pass state)")
            o = attention(q, k, v, window=self.window, impl=self.impl, doc_ids=doc_ids, scale=self.scale)
        else:
            o = self._attend_cached(q, k, v, state, offset).to(x.dtype)
        return self.o_proj(o.reshape(b, l, self.n_heads * self.head_dim))

    def _check_room(self, state: dict, offset: int, n: int) -> None:
        cap = self.state_capacity(state)
        if cap is not None and offset + n > cap:
            raise HybridSeqError(
                f"attention KV cache is full: it holds max_seq_len={cap} tokens, but {offset} are "
                f"cached and {n} more were given (make the cache with a larger max_seq_len)")

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
        self._check_room(state, offset, l)
        if offset == 0:
            # first chunk: nothing cached yet, so the chunk attends to itself on the fast path
            out = attention(q, k, v, window=self.window, impl=self.impl, scale=self.scale)
            self._store(kc, vc, k, v, offset, ring)
            return out
        if not ring:
            # linear cache: slot == position
            self._store(kc, vc, k, v, offset, ring)
            keys = kc[:, :, :offset + l].transpose(1, 2)
            vals = vc[:, :, :offset + l].transpose(1, 2)
            # no window reaches past the cache here (a window is >= cap when the cache is
            # linear), so the chunk's queries see every earlier key: bottom-right causal
            return attention_tail(q, keys, vals, impl=self.impl, scale=self.scale)
        w = cap  # ring buffer of the last `window` keys
        n_past = min(offset, w)
        keys = torch.cat([kc[:, :, :n_past].transpose(1, 2), k], dim=1)
        vals = torch.cat([vc[:, :, :n_past].transpose(1, 2), v], dim=1)
        k_pos = torch.cat([self._slot_positions(w, offset, n_past, dev),
                           torch.arange(offset, offset + l, device=dev)])
        q_pos = torch.arange(offset, offset + l, device=dev)
        out = attention_with_positions(q, keys, vals, q_pos, k_pos, window=self.window,
                                       impl=self.impl, scale=self.scale)
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

    # --- one-token step ----------------------------------------------------------------------
    def step(self, x: torch.Tensor, state: dict, pos: torch.Tensor) -> torch.Tensor:
        """One token per row at the device position ``pos`` (0-d int64): writes its key/value
        into ``state`` at slot ``pos`` (``pos % cap`` for a sliding-window ring buffer), then the
        query attends to every slot ``<= pos`` of the whole buffer (a mask, so the shapes do not
        depend on ``pos`` and the step can be captured in a CUDA graph). x (b, 1, d_model)."""
        b = x.shape[0]
        H, hd = self.n_heads, self.head_dim
        q, k, v = self._project(x)
        if self.rope_theta is not None:
            q, k = self._rope(q, k, pos.view(1))
        kc, vc = state["k"], state["v"]
        cap = kc.shape[2]
        ring = self.window is not None and cap >= self.window
        slot = (pos % cap if ring else pos).view(1)
        kc.index_copy_(2, slot, k.to(kc.dtype).transpose(1, 2))
        vc.index_copy_(2, slot, v.to(vc.dtype).transpose(1, 2))
        valid = torch.arange(cap, device=kc.device) <= pos
        if self.impl == "torch":
            o = _decode_attention(q.float(), kc.float(), vc.float(), valid, "matmul", self.scale)
        else:
            o = _decode_attention(q.to(kc.dtype), kc, vc, valid, "sdpa", self.scale)
        return self.o_proj(o.to(x.dtype).reshape(b, 1, H * hd))

    # --- inference state ---------------------------------------------------------------------
    def new_state(self, batch_size: int, max_seq_len: int, device=None, dtype=None):
        cap = self.spec.cache_slots(max_seq_len)
        dtype = dtype or self.q_proj.weight.dtype
        shape = (batch_size, self.n_kv_heads, cap, self.head_dim)
        return {"k": torch.zeros(shape, device=device, dtype=dtype),
                "v": torch.zeros(shape, device=device, dtype=dtype)}

    def state_capacity(self, state: dict) -> int | None:
        """Tokens this state can still hold past its capacity (None: a ring buffer, unbounded)."""
        cap = state["k"].shape[2]
        return None if self.window is not None and cap >= self.window else cap

    def residual_out_params(self) -> list[nn.Parameter]:
        return [self.o_proj.weight]


def _decode_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, valid: torch.Tensor,
                      method: str, scale: float | None = None) -> torch.Tensor:
    """One query token per row against a whole KV buffer: q (b, 1, h, d); kc, vc (b, h_kv, cap,
    d); valid (cap,) bool, the visible slots. Query head i reads key head i // (h / h_kv): the
    GQA heads of one key head form a short query axis (b, h_kv, h / h_kv, d). ``sdpa``: fused
    attention with a boolean mask (fp32 accumulation inside); ``matmul``: two batched matmuls and
    an fp32 softmax. ``scale``: the score scale (None: d ** -0.5). Returns (b, 1, h, d)."""
    b, _, h, d = q.shape
    hkv, cap = kc.shape[1], kc.shape[2]
    qg = q.reshape(b, hkv, h // hkv, d)
    scale = d ** -0.5 if scale is None else scale
    if method == "sdpa":
        o = F.scaled_dot_product_attention(qg, kc, vc, attn_mask=valid.view(1, 1, 1, cap), scale=scale)
    else:
        s = torch.matmul(qg, kc.transpose(-1, -2)).float() * scale
        p = torch.softmax(s.masked_fill(~valid, float("-inf")), dim=-1)
        o = torch.matmul(p.to(vc.dtype), vc)
    return o.reshape(b, 1, h, d)
