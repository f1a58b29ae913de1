"""HybridLM: token embedding -> residual stack of blocks -> final norm -> LM head.

    h_0 = embed(input_ids)
    h_i = h_{i-1} + block_i(norm_i(h_{i-1}))          one sublayer per symbol of cfg.stack
    logits = lm_head(norm_f(h_n))                      lm_head = embed.weight^T when tied

``forward(input_ids, cache=None, labels=None, doc_ids=None) -> ModelOutput``: ``labels`` (B, L)
follow the transformers convention: the model shifts them, so ``logits[:, t]`` is scored against
``labels[:, t + 1]`` (``model(ids, labels=ids)`` is next-token prediction; the last position
scores nothing), and ``-100`` is ignored; ``loss = cross_entropy + aux_loss``, where ``aux_loss``
is the sum of the MoE blocks' auxiliary losses (zero without MoE). (The trainer's data tasks
yield targets already aligned with the logits and score ``logits`` themselves, outside this
argument.) ``doc_ids`` (B, L) integer:
packed sequences; a document is a maximal run of equal ids, and no block lets state or attention
cross a document boundary (each kind's ``documents`` says how it takes them).

With a ``cache``: a chunk of any length continues the cache (a prefill); one token per row goes
through each block's ``step``, which updates the cache in place with no host synchronisation,
so this one-token forward is what ``decode_graph.GraphedDecodeStep`` captures in a CUDA graph.

Initialisation: every weight matrix (ndim >= 2) ~ N(0, init_std), Linear biases 0, norms 1;
parameters tagged ``_no_reinit`` (Mamba's A_log, D, dt projection and conv) keep their block's
own init. With ``model.rescale_residual`` the output projection of every sublayer
(``residual_out_params``) is then multiplied by 1 / sqrt(n_sublayers): one factor per residual
branch, as GPT-2 (whose 2 per layer give 1/sqrt(2 n_layer)) and mamba_ssm (1 per Mamba layer).

``model.embedding_multiplier``, ``model.residual_multiplier`` and ``model.logits_scaling``
(Granite's constants; 1 by default) scale the embedding output, each sublayer's update
(``h_i = h_{i-1} + m * block_i(norm_i(h_{i-1}))``) and divide the logits.

The vocabulary is ``model.vocab_size`` rounded up to ``model.pad_vocab_multiple``.
Parameter counts, FLOPs and state sizes have closed forms (``param_counts``,
``flops_per_token``, ``state_bytes``, ``layer_table``) that need only the config: each block
kind's spec provides them.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .blocks.norm import make_norm
from .blocks.spec import norm_param_count
from .cache import HybridCache
from .config import HybridConfig, config_hash as _config_hash, load_config
from .errors import ConfigError, HybridSeqError

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    """``logits`` (B, L, V); ``aux_loss`` scalar float32 tensor (sum over MoE blocks, 0 without);
    ``loss`` (CE + aux_loss) when labels were given, else None; ``metrics``: per-layer block
    metrics as ``"<layer>.<name>"`` (MoE load, entropy, ...) and ``ce_loss`` with labels."""

    logits: torch.Tensor
    aux_loss: torch.Tensor
    loss: torch.Tensor | None = None
    metrics: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# closed forms from the config
# ----------------------------------------------------------------------------------------------
def _typed(cfg) -> HybridConfig:
    return cfg if isinstance(cfg, HybridConfig) else load_config(cfg)


def padded_vocab_size(cfg, vocab_size: int | None = None) -> int:
    """``vocab_size`` (or ``model.vocab_size``) rounded up to ``model.pad_vocab_multiple``."""
    m = _typed(cfg).model
    v = m.vocab_size if vocab_size is None else vocab_size
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"vocab_size must be a positive int here, got {v!r} (build the model "
                          "with hs.build_model(cfg), which resolves 'auto' from the task)",
                          key="model.vocab_size")
    return m.padded_vocab(v)


def layer_table(cfg, *, seq_len: int = 2048, max_seq_len: int | None = None,
                dtype_bytes: int = 2) -> list[dict]:
    """One row per sublayer: index, symbol, kind, params, active_params, flops_per_token (at
    ``seq_len``), state_bytes (per sequence at ``max_seq_len``, default ``seq_len``).
    Norms are not included (see ``param_counts``)."""
    c = _typed(cfg)
    d = c.model.d_model
    T = max_seq_len or seq_len
    rows = []
    for i, (sym, spec) in enumerate(c.layers()):
        total, active = spec.param_count(d)
        rows.append({"index": i, "symbol": sym, "kind": spec.kind, "params": total,
                     "active_params": active, "flops_per_token": spec.flops_per_token(d, seq_len),
                     "state_bytes": spec.state_bytes(d, T, dtype_bytes)})
    return rows


def param_counts(cfg, vocab_size: int | None = None) -> tuple[int, int]:
    """Exact (total, active) parameter counts: embedding V d, untied head V d, one norm per
    sublayer plus the final norm, and every block's closed form. V is the padded vocabulary."""
    c = _typed(cfg)
    m = c.model
    d = m.d_model
    V = padded_vocab_size(c, vocab_size)
    base = V * d * (1 if m.tie_embeddings else 2) + (len(c.stack) + 1) * norm_param_count(m.norm, d)
    total = active = base
    for _, spec in c.layers():
        t, a = spec.param_count(d)
        total += t
        active += a
    return total, active


def flops_per_token(cfg, seq_len: int, vocab_size: int | None = None) -> float:
    """Forward FLOPs per token at training length ``seq_len``: the blocks' closed forms plus the
    LM head 2 d V (embedding lookups and norms not counted). Training ~ 3x this."""
    c = _typed(cfg)
    d = c.model.d_model
    V = padded_vocab_size(c, vocab_size)
    return float(sum(spec.flops_per_token(d, seq_len) for _, spec in c.layers()) + 2 * d * V)


def state_bytes(cfg, max_seq_len: int, dtype_bytes: int = 2) -> int:
    """Inference cache bytes per sequence (Mamba states constant; KV caches grow to the window
    or ``max_seq_len``)."""
    c = _typed(cfg)
    return int(sum(spec.state_bytes(c.model.d_model, max_seq_len, dtype_bytes) for _, spec in c.layers()))


def memory_bytes(device=None) -> int | None:
    """The memory of ``device`` in bytes (a CUDA device's total; the machine's RAM for the CPU),
    or None when it cannot be read."""
    device = torch.device(device) if device is not None else torch.empty(0).device
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[1])
        except RuntimeError:
            return None
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def check_fits_in_memory(cfg, device=None) -> None:
    """Refuse, before anything is allocated, a model whose float32 weights alone exceed the
    memory of the device it is built on (a typo such as ``d_model: 1000000``), naming the
    sizes that drive it."""
    c = _typed(cfg)
    total, _ = param_counts(c)
    need, have = 4 * total, memory_bytes(device)
    if have is not None and need > have:
        raise ConfigError(f"this model has {total:,} parameters: {need / 2**30:,.1f} GiB in float32, more "
                          f"than this machine's {have / 2**30:,.1f} GiB (model.d_model={c.model.d_model}, "
                          f"{len(c.stack)} sublayers, vocab {c.model.vocab_size}; check the sizes)",
                          file=c.source, key="model.d_model")


# ----------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------
class Sublayer(nn.Module):
    """``x + block(norm(x))`` (``x + residual_multiplier * block(norm(x))`` when it is not 1)."""

    def __init__(self, norm: nn.Module, block: nn.Module, symbol: str, residual_multiplier: float = 1.0):
        super().__init__()
        self.norm = norm
        self.block = block
        self.symbol = symbol
        self.kind = block.kind
        self.residual_multiplier = float(residual_multiplier)

    def _add(self, x: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        if self.residual_multiplier != 1.0:
            return x + update * self.residual_multiplier
        return x + update

    def forward(self, x: torch.Tensor, state=None, offset: int = 0, doc_ids=None) -> torch.Tensor:
        return self._add(x, self.block(self.norm(x), state, offset, doc_ids))

    def step(self, x: torch.Tensor, state, pos: torch.Tensor) -> torch.Tensor:
        return self._add(x, self.block.step(self.norm(x), state, pos))


class HybridLM(nn.Module):
    """A hybrid language model built from a ``HybridConfig`` (``hybridseq.load_config``) whose
    ``model.vocab_size`` is an int (``hs.build_model`` resolves "auto")."""

    def __init__(self, cfg):
        super().__init__()
        cfg = _typed(cfg)
        self.cfg = cfg
        m = cfg.model
        self.d_model = d = m.d_model
        self.vocab_size = padded_vocab_size(cfg)
        self.vocab_size_unpadded = int(m.vocab_size)
        self.tie_embeddings = bool(m.tie_embeddings)
        self.stack = list(cfg.stack)
        layers = cfg.layers()
        self.layout = [spec.kind for _, spec in layers]
        n = len(layers)
        if n == 0:
            raise ConfigError("the layout has no sublayers", key="layout")
        self.checkpointing = set(m.checkpointing)
        self.config_hash = _config_hash(cfg)
        check_fits_in_memory(cfg)

        self.embed = nn.Embedding(self.vocab_size, d)
        self.layers = nn.ModuleList(
            Sublayer(make_norm(m.norm, d, m.norm_eps), spec.build(d, layer_idx=i, n_layers=n), sym,
                     m.residual_multiplier)
            for i, (sym, spec) in enumerate(layers)
        )
        self.embedding_multiplier = float(m.embedding_multiplier)
        self.logits_scaling = float(m.logits_scaling)
        self.norm_f = make_norm(m.norm, d, m.norm_eps)
        self.lm_head = None if self.tie_embeddings else nn.Linear(d, self.vocab_size, bias=False)
        self.reset_parameters(float(m.init_std), bool(m.rescale_residual))

    @torch.no_grad()
    def reset_parameters(self, init_std: float = 0.02, rescale_residual: bool = True) -> None:
        """The initialisation described in the module docstring."""
        for mod in self.modules():
            if isinstance(mod, nn.Linear) and mod.bias is not None \
                    and not getattr(mod.bias, "_no_reinit", False):
                mod.bias.zero_()
        for p in self.parameters():
            if p.dim() >= 2 and not getattr(p, "_no_reinit", False):
                p.normal_(0.0, init_std)
        if rescale_residual:
            scale = 1.0 / math.sqrt(len(self.layers))
            for layer in self.layers:
                for p in layer.block.residual_out_params():
                    p.mul_(scale)

    # --- forward -------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, cache: HybridCache | None = None,
                labels: torch.Tensor | None = None, logits_to_keep: int = 0,
                doc_ids: torch.Tensor | None = None) -> ModelOutput:
        """``logits_to_keep > 0``: compute the logits of the last ``logits_to_keep`` positions
        only (a long prefill then never materialises (B, L, V) logits); not with ``labels``.
        ``doc_ids`` (B, L): packed documents (module docstring)."""
        if input_ids.dim() != 2:
            raise HybridSeqError(f"input_ids must be (batch, seqlen), got shape {tuple(input_ids.shape)}")
        B, L = input_ids.shape
        if doc_ids is not None:
            self._check_doc_ids(doc_ids, input_ids, cache)
        x = self.embed(input_ids)
        if self.embedding_multiplier != 1.0:
            x = x * self.embedding_multiplier
        aux = torch.zeros((), device=x.device, dtype=torch.float32)
        metrics: dict[str, Any] = {}
        if cache is not None:
            x = self._forward_cached(x, cache)
        else:
            use_ckpt = bool(self.checkpointing) and self.training and torch.is_grad_enabled()
            for layer in self.layers:
                if use_ckpt and layer.kind in self.checkpointing:
                    x = checkpoint(layer, x, None, 0, doc_ids, use_reentrant=False)
                else:
                    x = layer(x, None, 0, doc_ids)
        for i, layer in enumerate(self.layers):
            blk = layer.block
            a = getattr(blk, "aux_loss", None)
            if isinstance(a, torch.Tensor):
                aux = aux + a.float()
            for k, v in (getattr(blk, "metrics", None) or {}).items():
                metrics[f"{i}.{k}"] = v
        if logits_to_keep:
            if labels is not None:
                raise HybridSeqError("logits_to_keep cannot be combined with labels")
            x = x[:, -int(logits_to_keep):]
        h = self.norm_f(x)
        logits = self.lm_head(h) if self.lm_head is not None else F.linear(h, self.embed.weight)
        if self.logits_scaling != 1.0:
            logits = logits / self.logits_scaling
        loss = None
        if labels is not None:
            if tuple(labels.shape) != (B, L):
                raise HybridSeqError(f"labels must have the shape of input_ids {(B, L)}, got "
                                     f"{tuple(labels.shape)}")
            # transformers' convention: position t predicts token t + 1
            ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                 labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
            loss = ce + aux
            metrics["ce_loss"] = ce.detach()
        return ModelOutput(logits=logits, aux_loss=aux, loss=loss, metrics=metrics)

    def _forward_cached(self, x: torch.Tensor, cache: HybridCache) -> torch.Tensor:
        """The stack over a cache: one token per row through every block's ``step`` (in place,
        no host synchronisation: what a CUDA graph captures), a longer chunk through the blocks'
        sequence forward. Advances the cache by the chunk's length."""
        B, L = x.shape[:2]
        if cache.batch_size != B:
            raise HybridSeqError(f"the cache holds batch {cache.batch_size}, input_ids has {B} rows")
        if len(cache.states) != len(self.layers):
            raise HybridSeqError("this cache was made for another model (layer count differs)")
        offset = cache.seqlen_offset
        if not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            self.check_room(cache, offset, L)  # (under capture the graph's owner checks)
        if L == 1:
            pos = cache.position
            for layer, st in zip(self.layers, cache.states):
                x = layer.step(x, st, pos)
        else:
            for layer, st in zip(self.layers, cache.states):
                x = layer(x, st, offset)
        cache.advance(L)
        return x

    def check_room(self, cache: HybridCache, offset: int, n: int) -> None:
        """Raise when ``n`` more tokens after ``offset`` do not fit a full-attention KV cache."""
        for layer, st in zip(self.layers, cache.states):
            cap = layer.block.state_capacity(st) if st is not None else None
            if cap is not None and offset + n > cap:
                raise HybridSeqError(
                    f"attention KV cache is full: it holds max_seq_len={cap} tokens, but {offset} are "
                    f"cached and {n} more were given (make the cache with a larger max_seq_len)")

    def _check_doc_ids(self, doc_ids, input_ids, cache) -> None:
        if tuple(doc_ids.shape) != tuple(input_ids.shape):
            raise HybridSeqError(f"doc_ids must have the shape of input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(doc_ids.shape)}")
        if cache is not None:
            raise NotImplementedError("doc_ids (document masks) with an inference cache are not "
                                      "supported; pass doc_ids only to cache-free forwards")

    # --- inference -----------------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_seq_len: int, device=None, dtype=None) -> HybridCache:
        """An empty cache for ``batch_size`` sequences of up to ``max_seq_len`` tokens (the KV
        capacity of full-attention layers; recurrent and sliding-window layers do not grow)."""
        p = self.embed.weight
        device = p.device if device is None else torch.device(device)
        dtype = p.dtype if dtype is None else dtype
        states = [layer.block.new_state(batch_size, max_seq_len, device, dtype)
                  for layer in self.layers]
        return HybridCache(states, batch_size=batch_size, max_seq_len=max_seq_len, dtype=dtype,
                           layout=self.layout, config_hash=self.config_hash,
                           weights_fingerprint=self.weights_fingerprint(), device=device)

    @torch.no_grad()
    def weights_fingerprint(self) -> str:
        """A short, exact checksum of the weights (sha256 over up to 64 evenly strided values of
        every parameter, as float32): identifies the weights a cache was computed with."""
        samples = []
        for p in self.parameters():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 64)
            samples.append(flat[::step][:64].float())
        data = torch.cat(samples).cpu().numpy().tobytes()
        return hashlib.sha256(data).hexdigest()[:16]

    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | None = None, **kwargs) -> torch.Tensor:
        """Sample continuations of equal-length prompts (B, P); see ``hybridseq.generate``."""
        from .generate import generate

        return generate(self, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, eos_token_id=eos_token_id, **kwargs)

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding (its rows: the padded vocabulary)."""
        return self.embed

    # --- accounting ----------------------------------------------------------------------------
    def num_params(self, active: bool = False) -> int:
        """Exact total (or active: routed experts counted top_k of n_experts) parameters, from the
        closed forms (tests hold them equal to the real tensors)."""
        total, act = param_counts(self.cfg, self.vocab_size)
        return act if active else total

    def flops_per_token(self, seq_len: int) -> float:
        return flops_per_token(self.cfg, seq_len, self.vocab_size)

    def state_bytes(self, max_seq_len: int, dtype_bytes: int = 2) -> int:
        return state_bytes(self.cfg, max_seq_len, dtype_bytes)

    def extra_repr(self) -> str:
        return f"stack={' '.join(self.stack)}, vocab_size={self.vocab_size}"


__all__ = ["HybridLM", "ModelOutput", "Sublayer", "flops_per_token", "layer_table",
           "padded_vocab_size", "param_counts", "state_bytes"]
