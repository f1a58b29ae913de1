"""One decoding step of a ``HybridLM`` on static buffers, optionally captured in a CUDA graph.

``GraphedDecodeStep(model, cache, capture=...)`` runs

    logits = lm_head(norm_f(x_n)),  x_i = x_{i-1} + block_i(norm_i(x_{i-1})),  x_0 = embed(ids)

for one token per row, with every tensor it reads or writes at a fixed address, so one CUDA
graph serves every step:

- inputs: ``ids`` (B, 1) int64 and ``pos`` (a 0-d int64 *device* tensor: the position of the
  token, = the number of tokens already in the cache); output ``logits`` (B, V).
- the cache's tensors are the static state buffers. Mamba: the functional one-token kernels
  (``kernels.causal_conv1d_update``, ``kernels.selective_state_update``, unchanged) compute the
  new conv/SSM states, which are ``copy_``-ed into the buffers. Attention: the new key/value is
  written with ``index_copy_`` at slot ``pos`` (full attention) or ``pos % window`` (ring
  buffer), then the query attends to *all* ``cap`` slots with the mask ``slot <= pos`` (a slot
  not yet written is hidden; once ``pos >= cap`` every slot is visible). That is exactly the
  set of keys the ordinary decode path slices out (``kv[:, :, :min(pos + 1, cap)]``), but the
  shapes no longer depend on ``pos``. MoE and MLP blocks are stateless: their own forward.
- costs of the fixed shapes: every step reads each attention layer's *whole* KV buffer (cap
  slots, masked), so a cache made much larger than the sequence costs bandwidth in proportion;
  and each Mamba state is written twice (the kernel's new state, then the copy into the buffer).
- ``pos`` is incremented inside the step (``pos += 1``), so a replayed graph advances by itself;
  the host mirrors it in ``cache.seqlen_offset``.

The ordinary forward (``model(ids, cache=cache)``, e.g. a prefill) may *replace* a state tensor
in ``cache.states`` (Mamba returns new states). Before each step, entries that are not the static
buffers any more are copied into them and the dict is pointed back at the buffers, so prefill,
steps, further chunks, ``cache.save`` and ``hs.load_cache`` mix freely.

Decode attention (``decode_attn``, default from the env var ``HYBRIDSEQ_DECODE_ATTN``, else
``sdpa``): ``sdpa`` = ``F.scaled_dot_product_attention`` with the GQA query heads of one key head
as a short query axis (b, h_kv, h / h_kv, d) and a boolean slot mask (fp32 accumulation inside
the kernel); ``matmul`` = two batched matmuls (scores in the cache dtype, fp32 softmax). An
attention block with ``impl: torch`` always uses ``matmul`` in float32.

Capture (CUDA only): two warm-up steps on a side stream (Triton compilation, cuBLAS workspaces),
then one captured step; what the warm-up wrote (Mamba states, the KV slot at ``pos``) is saved
before and restored after, so capturing does not change the cache. Sampling stays outside the
graph (``hybridseq.generate.sample_next``).

Not capturable (``graph_blockers`` lists why; ``generate(cuda_graph="auto")`` then runs the
ordinary loop): MoE with a ``capacity_factor`` (a host synchronisation per forward), MoE
``impl: loop`` (one per expert), MoE outside bfloat16 on CUDA (the padded grouped GEMM reads the
group sizes on the host), MoE ``megablocks`` and expert parallelism.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import kernels
from .blocks.rope import apply_rope, rope_tables
from .errors import HybridSeqError

DECODE_ATTN = ("sdpa", "matmul")
WARMUP_STEPS = 2


def default_decode_attn() -> str:
    """``HYBRIDSEQ_DECODE_ATTN`` (sdpa | matmul), else ``sdpa``."""
    v = os.environ.get("HYBRIDSEQ_DECODE_ATTN", "sdpa").strip().lower()
    if v not in DECODE_ATTN:
        raise HybridSeqError(f"HYBRIDSEQ_DECODE_ATTN={v!r}: expected one of {', '.join(DECODE_ATTN)}")
    return v


def graph_blockers(model, device, dtype) -> list[str]:
    """Reasons why the decode step of ``model`` cannot be captured on ``device`` with
    activations of ``dtype`` (empty: it can)."""
    device = torch.device(device)
    out = []
    if device.type != "cuda":
        out.append(f"CUDA graphs need a CUDA device, the model is on {device}")
    for i, layer in enumerate(model.layers):
        blk = layer.block
        if layer.kind != "moe":
            continue
        impl = getattr(blk, "impl", "auto")
        if getattr(blk, "capacity_factor", None) is not None:
            out.append(f"layer {i} (moe): capacity_factor drops tokens with a host synchronisation")
        elif getattr(blk, "ep_size", 1) > 1:
            out.append(f"layer {i} (moe): expert parallelism (all-to-all) is not captured")
        elif impl in ("loop", "megablocks"):
            out.append(f"layer {i} (moe): impl {impl!r} synchronises with the host")
        elif device.type == "cuda" and dtype != torch.bfloat16:
            out.append(f"layer {i} (moe): the grouped GEMM reads group sizes on the host outside "
                       f"bfloat16 (activations are {dtype})")
    return out


# ----------------------------------------------------------------------------------------------
# per-block static steps (functional math, results copied into the state buffers)
# ----------------------------------------------------------------------------------------------
def mamba_step(blk, h: torch.Tensor, state: dict) -> torch.Tensor:
    """Mamba block, one token: h (b, 1, d_model) normed input; updates ``state["conv"]`` and
    ``state["ssm"]`` in place; returns (b, 1, d_model). The same ops as ``MambaBlock._step``."""
    di, r, n = blk.d_inner, blk.dt_rank, blk.d_state
    A = -torch.exp(blk.A_log.float())
    xz = blk.in_proj(h)
    xs, z = xz[:, 0, :di], xz[:, 0, di:]
    conv_w = blk.conv_weight.to(xs.dtype)
    conv_b = None if blk.conv_bias is None else blk.conv_bias.to(xs.dtype)
    xc, conv_state = kernels.causal_conv1d_update(xs, state["conv"].to(xs.dtype), conv_w, conv_b,
                                                  activation="silu", impl=blk.impl)
    dt_in, B, C = blk.x_proj(xc).split([r, n, n], dim=-1)
    delta = F.linear(dt_in, blk.dt_proj.weight)
    y, ssm = kernels.selective_state_update(state["ssm"], xc, delta, A, B, C, D=blk.D.float(), z=z,
                                            dt_bias=blk.dt_proj.bias.float(), dt_softplus=True,
                                            impl=blk.impl)
    state["conv"].copy_(conv_state)
    state["ssm"].copy_(ssm)
    return blk.out_proj(y).unsqueeze(1)


def decode_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, valid: torch.Tensor,
                     method: str = "sdpa") -> torch.Tensor:
    """One query token per row against a whole static KV buffer.

    q (b, 1, h, d); kc, vc (b, h_kv, cap, d); valid (cap,) bool (the visible slots). Query head i
    reads key head i // (h / h_kv). Returns (b, 1, h, d) in kc's dtype (fp32 for ``matmul`` on
    fp32 caches)."""
    b, _, h, d = q.shape
    hkv, cap = kc.shape[1], kc.shape[2]
    g = h // hkv
    qg = q.reshape(b, hkv, g, d)  # heads kv*g .. kv*g+g-1 share key head kv
    scale = d ** -0.5
    if method == "sdpa":
        o = F.scaled_dot_product_attention(qg, kc, vc, attn_mask=valid.view(1, 1, 1, cap),
                                           scale=scale)
    elif method == "matmul":
        s = torch.matmul(qg, kc.transpose(-1, -2)).float() * scale
        s = s.masked_fill(~valid, float("-inf"))
        p = torch.softmax(s, dim=-1)
        o = torch.matmul(p.to(vc.dtype), vc)
    else:
        raise HybridSeqError(f"unknown decode attention {method!r} ({' | '.join(DECODE_ATTN)})")
    return o.reshape(b, 1, h, d)


def attention_step(blk, h: torch.Tensor, state: dict, pos: torch.Tensor, slots: torch.Tensor,
                   method: str) -> torch.Tensor:
    """Attention block, one token at device position ``pos`` (0-d int64): writes its key/value
    into ``state["k"]/["v"]`` at slot ``pos`` (or ``pos % cap`` for a ring buffer), attends to
    the slots ``<= pos``; ``slots`` = arange(cap) on the device. Returns (b, 1, d_model)."""
    b = h.shape[0]
    H, hkv, hd = blk.n_heads, blk.n_kv_heads, blk.head_dim
    q = blk.q_proj(h).view(b, 1, H, hd)
    k = blk.k_proj(h).view(b, 1, hkv, hd)
    v = blk.v_proj(h).view(b, 1, hkv, hd)
    if blk.q_norm is not None:
        q, k = blk.q_norm(q), blk.k_norm(k)
    if blk.rope_theta is not None:
        cos, sin = rope_tables(pos.view(1), hd, blk.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    kc, vc = state["k"], state["v"]
    cap = kc.shape[2]
    ring = blk.window is not None and cap >= blk.window
    slot = (pos % cap if ring else pos).view(1)
    kc.index_copy_(2, slot, k.to(kc.dtype).transpose(1, 2))
    vc.index_copy_(2, slot, v.to(vc.dtype).transpose(1, 2))
    if blk.impl == "torch":
        o = decode_attention(q.float(), kc.float(), vc.float(), slots <= pos, "matmul")
    else:
        o = decode_attention(q.to(kc.dtype), kc, vc, slots <= pos, method)
    return blk.o_proj(o.to(h.dtype).reshape(b, 1, H * hd))


# ----------------------------------------------------------------------------------------------
# the step object
# ----------------------------------------------------------------------------------------------
class GraphedDecodeStep:
    """Static-buffer decode step of ``model`` over ``cache`` (batch and capacity fixed by it).

    ``capture=True`` records one CUDA graph (needs CUDA and no ``graph_blockers``); ``False``
    runs the same function eagerly (any device; the CPU tests compare it with the ordinary
    decode). ``step(ids)`` consumes one token per row at ``cache.seqlen_offset`` and returns the
    (B, V) logits: a static buffer, overwritten by the next step (clone it to keep it)."""

    def __init__(self, model, cache, *, capture: bool = True, decode_attn: str | None = None,
                 warmup_steps: int = WARMUP_STEPS):
        if len(cache.states) != len(model.layers):
            raise HybridSeqError("this cache was made for another model (layer count differs)")
        self.model = model
        self.cache = cache
        self.decode_attn = decode_attn or default_decode_attn()
        if self.decode_attn not in DECODE_ATTN:
            raise HybridSeqError(f"unknown decode_attn {self.decode_attn!r} ({' | '.join(DECODE_ATTN)})")
        p = model.embed.weight
        self.device = p.device
        dev = cache.device
        if dev is not None and dev != self.device:
            raise HybridSeqError(f"the cache is on {dev}, the model on {self.device}")
        B = cache.batch_size
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros((), dtype=torch.long, device=self.device)
        self.logits = torch.zeros(B, model.vocab_size, dtype=p.dtype, device=self.device)
        # the static state buffers: the cache's tensors now (re-bound before every step)
        self.buffers = [None if st is None else dict(st) for st in cache.states]
        self._slots = {}
        self._linear_caps = []  # capacities of full-attention caches (host-side overflow check)
        for i, (layer, st) in enumerate(zip(model.layers, self.buffers)):
            if st is not None and layer.kind not in ("mamba", "attention"):
                raise HybridSeqError(f"GraphedDecodeStep: layer {i} (kind {layer.kind!r}) keeps "
                                     "a state it does not know how to step")
            if layer.kind == "attention":
                cap = st["k"].shape[2]
                if cap not in self._slots:
                    self._slots[cap] = torch.arange(cap, device=self.device)
                blk = layer.block
                if not (blk.window is not None and cap >= blk.window):
                    self._linear_caps.append(cap)
        self._pos_host = None
        self.graph = None
        if capture:
            blockers = graph_blockers(model, self.device, p.dtype)
            if blockers:
                raise HybridSeqError("cannot capture the decode step in a CUDA graph: "
                                     + "; ".join(blockers))
            self._capture(warmup_steps)

    # --- the step function (captured or eager) ---------------------------------------------
    def _run(self) -> None:
        m = self.model
        x = m.embed(self.ids)
        for layer, st in zip(m.layers, self.buffers):
            blk = layer.block
            h = layer.norm(x)
            if layer.kind == "mamba":
                u = mamba_step(blk, h, st)
            elif layer.kind == "attention":
                u = attention_step(blk, h, st, self.pos, self._slots[st["k"].shape[2]],
                                   self.decode_attn)
            else:  # stateless (moe, mlp): the block's own forward
                u = blk(h, None, 0)
            x = x + u
        hf = m.norm_f(x)
        logits = m.lm_head(hf) if m.lm_head is not None else F.linear(hf, m.embed.weight)
        self.logits.copy_(logits[:, -1])
        self.pos.add_(1)

    # --- cache <-> buffers -------------------------------------------------------------------
    def _bind_cache(self) -> None:
        """Copy state tensors that the ordinary forward replaced into the static buffers and
        point ``cache.states`` back at the buffers."""
        for st, bufs in zip(self.cache.states, self.buffers):
            if bufs is None:
                continue
            for name, buf in bufs.items():
                t = st[name]
                if t is not buf:
                    if t.shape != buf.shape:
                        raise HybridSeqError(f"cache state {name!r} changed shape "
                                             f"{tuple(buf.shape)} -> {tuple(t.shape)}")
                    buf.copy_(t)
                    st[name] = buf

    def _saved_warmup_targets(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(view, copy) of everything a step writes besides pos: Mamba states, the KV slot."""
        off = self.cache.seqlen_offset
        out = []
        for layer, bufs in zip(self.model.layers, self.buffers):
            if bufs is None:
                continue
            if layer.kind == "attention":
                cap = bufs["k"].shape[2]
                slot = off % cap
                views = [bufs["k"][:, :, slot], bufs["v"][:, :, slot]]
            else:
                views = list(bufs.values())
            out += [(v, v.clone()) for v in views]
        return out

    def _check_capacity(self, offset: int) -> None:
        for cap in self._linear_caps:
            if offset >= cap:
                raise HybridSeqError(
                    f"attention KV cache is full: it holds max_seq_len={cap} tokens and {offset} "
                    "are cached (make the cache with a larger max_seq_len)")

    @torch.no_grad()
    def _capture(self, warmup_steps: int) -> None:
        """Warm up on a side stream, capture one step; the cache is left as it was."""
        self._bind_cache()
        offset = self.cache.seqlen_offset
        self._check_capacity(offset)
        saved = self._saved_warmup_targets()
        side = torch.cuda.Stream(self.device)
        try:
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(max(1, warmup_steps)):
                    self.pos.fill_(offset)
                    self._run()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            self.pos.fill_(offset)
            with torch.cuda.graph(graph):
                self._run()
            self.graph = graph
        except Exception as e:
            raise HybridSeqError(f"capturing the decode step in a CUDA graph failed: "
                                 f"{type(e).__name__}: {e}") from e
        finally:  # the warm-up stepped the states: put them back (also after a failure)
            torch.cuda.current_stream(self.device).wait_stream(side)
            for view, copy in saved:
                view.copy_(copy)
            self.pos.fill_(offset)
            self._pos_host = offset

    # --- public ------------------------------------------------------------------------------
    @property
    def captured(self) -> bool:
        return self.graph is not None

    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed ``ids`` (B,) or (B, 1), one token per row; returns the static (B, V) logits."""
        B = self.ids.shape[0]
        if ids.numel() != B:
            raise HybridSeqError(f"step: expected {B} token ids (one per row), got shape {tuple(ids.shape)}")
        self._bind_cache()
        offset = self.cache.seqlen_offset
        self._check_capacity(offset)
        self.ids.copy_(ids.reshape(B, 1))
        if self._pos_host != offset:
            self.pos.fill_(offset)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._run()
        self.cache.seqlen_offset = self._pos_host = offset + 1
        return self.logits

    __call__ = step


__all__ = ["DECODE_ATTN", "GraphedDecodeStep", "attention_step", "decode_attention",
           "default_decode_attn", "graph_blockers", "mamba_step"]
