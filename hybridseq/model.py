"""HybridLM: token embedding -> residual stack of blocks -> final norm -> LM head.

    h_0 = embed(input_ids)
    h_i = h_{i-1} + block_i(norm_i(h_{i-1}))          one sublayer per symbol of cfg.stack
    logits = lm_head(norm_f(h_n))                      lm_head = embed.weight^T when tied

``forward(input_ids, cache=None, labels=None, doc_ids=None) -> ModelOutput``: ``labels`` (B, L)
are aligned with ``input_ids`` (``labels[:, t]`` scores ``logits[:, t]``; the data tasks shift for
language modelling), ``-100`` is ignored; ``loss = cross_entropy + aux_loss``, where ``aux_loss``
is the sum of the MoE blocks' auxiliary losses (zero without MoE). ``doc_ids`` (B, L) integer:
packed sequences; a document is a maximal run of equal ids, and attention layers see only their
own document (RoPE positions restart at each document start); token-wise layers (mlp, moe) need
nothing. Mamba layers would carry conv/scan state across documents: not supported yet
(NotImplementedError naming the layer), nor with a cache.

Initialisation: every weight matrix (ndim >= 2) ~ N(0, init_std), Linear biases 0, norms 1;
parameters tagged ``_no_reinit`` (Mamba's A_log, D, dt projection and conv) keep their block's
own init. With ``model.rescale_residual`` the output projection of every sublayer
(``residual_out_params``) is then multiplied by 1 / sqrt(n_sublayers): one factor per residual
branch, as GPT-2 (whose 2 per layer give 1/sqrt(2 n_layer)) and mamba_ssm (1 per Mamba layer).

The vocabulary is ``model.vocab_size`` rounded up to ``model.pad_vocab_multiple``.
Parameter counts, FLOPs and state sizes have closed forms (``param_counts``,
``flops_per_token``, ``state_bytes``, ``layer_table``) that need only the config.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.checkpoint import checkpoint

from .blocks import block_class, build_block, full_spec, make_norm, norm_param_count
from .cache import HybridCache
from .config import config_hash as _config_hash
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
def _plain(cfg) -> dict:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def padded_vocab_size(cfg, vocab_size: int | None = None) -> int:
    """``vocab_size`` (or ``model.vocab_size``) rounded up to ``model.pad_vocab_multiple``."""
    m = _plain(cfg)["model"]
    v = m["vocab_size"] if vocab_size is None else vocab_size
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"vocab_size must be a positive int here, got {v!r} (build the model "
                          "with hs.build_model(cfg), which resolves 'auto' from the task)",
                          key="model.vocab_size")
    mult = int(m.get("pad_vocab_multiple") or 1)
    return -(-v // mult) * mult


def _layers(cfg) -> list[tuple[str, str, dict]]:
    """(symbol, kind, full spec) per sublayer."""
    c = _plain(cfg)
    out = []
    for sym in c["stack"]:
        spec = c["blocks"][sym]
        out.append((sym, spec["kind"], full_spec(spec["kind"], spec)))
    return out


def layer_table(cfg, *, seq_len: int = 2048, max_seq_len: int | None = None,
                dtype_bytes: int = 2) -> list[dict]:
    """One row per sublayer: index, symbol, kind, params, active_params, flops_per_token (at
    ``seq_len``), state_bytes (per sequence at ``max_seq_len``, default ``seq_len``).
    Norms are not included (see ``param_counts``)."""
    d = int(_plain(cfg)["model"]["d_model"])
    L = max_seq_len or seq_len
    rows = []
    for i, (sym, kind, spec) in enumerate(_layers(cfg)):
        cls = block_class(kind)
        total, active = cls.param_count(d, spec)
        rows.append({"index": i, "symbol": sym, "kind": kind, "params": total,
                     "active_params": active, "flops_per_token": cls.flops_per_token(d, spec, seq_len),
                     "state_bytes": cls.state_bytes(d, spec, L, dtype_bytes)})
    return rows


def param_counts(cfg, vocab_size: int | None = None) -> tuple[int, int]:
    """Exact (total, active) parameter counts: embedding V d, untied head V d, one norm per
    sublayer plus the final norm, and every block's closed form. V is the padded vocabulary."""
    c = _plain(cfg)
    m = c["model"]
    d = int(m["d_model"])
    V = padded_vocab_size(c, vocab_size)
    base = V * d * (1 if m["tie_embeddings"] else 2)
    n = len(c["stack"])
    base += (n + 1) * norm_param_count(m["norm"], d)
    total = active = base
    for row in layer_table(c, seq_len=1):
        total += row["params"]
        active += row["active_params"]
    return total, active


def flops_per_token(cfg, seq_len: int, vocab_size: int | None = None) -> float:
    """Forward FLOPs per token at training length ``seq_len``: the blocks' closed forms plus the
    LM head 2 d V (embedding lookups and norms not counted). Training ~ 3x this."""
    c = _plain(cfg)
    d = int(c["model"]["d_model"])
    V = padded_vocab_size(c, vocab_size)
    return float(sum(r["flops_per_token"] for r in layer_table(c, seq_len=seq_len)) + 2 * d * V)


def state_bytes(cfg, max_seq_len: int, dtype_bytes: int = 2) -> int:
    """Inference cache bytes per sequence (Mamba states constant; KV caches grow to the window
    or ``max_seq_len``)."""
    return int(sum(r["state_bytes"] for r in layer_table(cfg, seq_len=max_seq_len,
                                                         dtype_bytes=dtype_bytes)))


# ----------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------
class Sublayer(nn.Module):
    """``x + block(norm(x))``."""

    def __init__(self, norm: nn.Module, block: nn.Module, symbol: str):
        super().__init__()
        self.norm = norm
        self.block = block
        self.symbol = symbol
        self.kind = block.kind

    def forward(self, x: torch.Tensor, state=None, offset: int = 0, doc_ids=None) -> torch.Tensor:
        if doc_ids is None or self.kind != "attention":  # other kinds: token-wise (or refused)
            return x + self.block(self.norm(x), state, offset)
        return x + self.block(self.norm(x), state, offset, doc_ids=doc_ids)


class HybridLM(nn.Module):
    """A hybrid language model built from a config of ``hybridseq.load_config`` whose
    ``model.vocab_size`` is an int (``hs.build_model`` resolves "auto")."""

    def __init__(self, cfg):
        super().__init__()
        if not isinstance(cfg, DictConfig) or "stack" not in cfg:
            from .config import load_config

            cfg = load_config(cfg)
        self.cfg = cfg
        c = _plain(cfg)
        m = c["model"]
        self.d_model = d = int(m["d_model"])
        self.vocab_size = padded_vocab_size(c)
        self.vocab_size_unpadded = int(m["vocab_size"])
        self.tie_embeddings = bool(m["tie_embeddings"])
        self.stack = list(c["stack"])
        layers = _layers(c)
        self.layout = [kind for _, kind, _ in layers]
        n = len(layers)
        if n == 0:
            raise ConfigError("the layout has no sublayers", key="layout")
        self.checkpointing = set(m.get("checkpointing") or [])
        self.config_hash = _config_hash(c)

        self.embed = nn.Embedding(self.vocab_size, d)
        self.layers = nn.ModuleList(
            Sublayer(make_norm(m["norm"], d, m["norm_eps"]), build_block(kind, d, spec, i, n), sym)
            for i, (sym, kind, spec) in enumerate(layers)
        )
        self.norm_f = make_norm(m["norm"], d, m["norm_eps"])
        self.lm_head = None if self.tie_embeddings else nn.Linear(d, self.vocab_size, bias=False)
        self.reset_parameters(float(m["init_std"]), bool(m["rescale_residual"]))

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
        ``doc_ids`` (B, L): document mask for packed sequences (module docstring)."""
        if input_ids.dim() != 2:
            raise HybridSeqError(f"input_ids must be (batch, seqlen), got shape {tuple(input_ids.shape)}")
        B, L = input_ids.shape
        if doc_ids is not None:
            self._check_doc_ids(doc_ids, input_ids, cache)
        offset = 0
        if cache is not None:
            if cache.batch_size != B:
                raise HybridSeqError(f"the cache holds batch {cache.batch_size}, input_ids has {B} rows")
            if len(cache.states) != len(self.layers):
                raise HybridSeqError("this cache was made for another model (layer count differs)")
            offset = cache.seqlen_offset
        x = self.embed(input_ids)
        aux = torch.zeros((), device=x.device, dtype=torch.float32)
        metrics: dict[str, Any] = {}
        use_ckpt = bool(self.checkpointing) and self.training and torch.is_grad_enabled() \
            and cache is None
        for i, layer in enumerate(self.layers):
            if use_ckpt and layer.kind in self.checkpointing:
                x = checkpoint(layer, x, None, 0, doc_ids, use_reentrant=False)
            else:
                x = layer(x, None if cache is None else cache.states[i], offset, doc_ids)
            blk = layer.block
            a = getattr(blk, "aux_loss", None)
            if isinstance(a, torch.Tensor):
                aux = aux + a.float()
            for k, v in (getattr(blk, "metrics", None) or {}).items():
                metrics[f"{i}.{k}"] = v
        if cache is not None:
            cache.seqlen_offset = offset + L
        if logits_to_keep:
            if labels is not None:
                raise HybridSeqError("logits_to_keep cannot be combined with labels")
            x = x[:, -int(logits_to_keep):]
        h = self.norm_f(x)
        logits = self.lm_head(h) if self.lm_head is not None else F.linear(h, self.embed.weight)
        loss = None
        if labels is not None:
            ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                 ignore_index=IGNORE_INDEX)
            loss = ce + aux
            metrics["ce_loss"] = ce.detach()
        return ModelOutput(logits=logits, aux_loss=aux, loss=loss, metrics=metrics)

    _DOC_KINDS = ("attention", "mlp", "moe")  # kinds correct under doc_ids (mask, or token-wise)

    def _check_doc_ids(self, doc_ids, input_ids, cache) -> None:
        if tuple(doc_ids.shape) != tuple(input_ids.shape):
            raise HybridSeqError(f"doc_ids must have the shape of input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(doc_ids.shape)}")
        if cache is not None:
            raise NotImplementedError("doc_ids (document masks) with an inference cache are not "
                                      "supported; pass doc_ids only to cache-free forwards")
        for i, layer in enumerate(self.layers):
            if layer.kind not in self._DOC_KINDS:
                raise NotImplementedError(
                    f"doc_ids (document masks) are not supported with a {layer.kind} layer "
                    f"(sublayer {i}, symbol {layer.symbol!r}): its conv and scan would carry "
                    "state across documents; use a layout of attention/mlp/moe layers or "
                    "unpacked sequences")

    # --- inference -----------------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_seq_len: int, device=None, dtype=None) -> HybridCache:
        """An empty cache for ``batch_size`` sequences of up to ``max_seq_len`` tokens (the KV
        capacity of full-attention layers; Mamba and sliding-window layers do not grow)."""
        p = self.embed.weight
        device = p.device if device is None else torch.device(device)
        dtype = p.dtype if dtype is None else dtype
        states = [layer.block.new_state(batch_size, max_seq_len, device, dtype)
                  for layer in self.layers]
        return HybridCache(states, batch_size=batch_size, max_seq_len=max_seq_len, dtype=dtype,
                           layout=self.layout, config_hash=self.config_hash,
                           weights_fingerprint=self.weights_fingerprint())

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
