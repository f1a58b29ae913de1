"""Autoregressive sampling with the hybrid inference cache.

``generate(model, prompt_ids, max_new_tokens, ...)`` prefills the (B, P) prompts (equal lengths)
in one forward, then decodes one token per step through ``model(next_ids, cache=cache)`` (or
its CUDA graph, see ``cuda_graph`` below):
constant work per token for Mamba layers, a KV read for attention layers.

Sampling of each step's logits (the padded vocabulary entries are never drawn):
- ``temperature == 0``: greedy (argmax);
- else ``logits / temperature``, restricted to the ``top_k`` largest (when given) and to the
  smallest set of tokens whose probabilities sum to >= ``top_p`` (nucleus, when given; the most
  likely token always stays), then one draw from the softmax.
Rows that produced ``eos_token_id`` are finished: they get ``eos_token_id`` from then on, and
generation stops early once every row is finished. Returns (B, P + n) with n <= max_new_tokens.

``cuda_graph`` (the decode steps after the prefill; the batch stays fixed, finished rows keep
decoding eos): ``True``: one CUDA graph per call (``hybridseq.decode_graph.GraphedDecodeStep``,
captured after the prefill; an error when the model is not on CUDA or a block cannot be
captured, see ``graph_blockers``); ``False``: the ordinary ``model(next_ids, cache=cache)``;
``"auto"`` (default): the graph on CUDA when nothing blocks it and ``max_new_tokens >=
AUTO_GRAPH_MIN_TOKENS`` (8, a guess: warm-up + capture cost about three eager steps), else
the ordinary loop (also, with a warning, when the capture itself fails); ``"static"``: the graph's
static-buffer step run eagerly (no capture; any device: for tests and debugging). Sampling
runs outside the graph.
"""
from __future__ import annotations

import math

import torch

from .errors import HybridSeqError

AUTO_GRAPH_MIN_TOKENS = 8


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from logits (B, V). Returns (B,) int64."""
    if not math.isfinite(temperature) or temperature < 0:
        raise HybridSeqError(f"temperature must be a finite number >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise HybridSeqError(f"top_k must be >= 1, got {top_k}")
        k = min(int(top_k), logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:  # (False for NaN as well)
            raise HybridSeqError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
        drop_sorted = before >= top_p          # the top token has before == 0: always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling(temperature: float, top_k: int | None = None, top_p: float | None = None) -> None:
    """The sampling arguments, checked before anything is computed (``sample_next``'s rules)."""
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise HybridSeqError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise HybridSeqError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise HybridSeqError(f"top_p must be in (0, 1], got {top_p}")


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | None = None, cache=None,
             generator: torch.Generator | None = None, cuda_graph="auto") -> torch.Tensor:
    """Generate up to ``max_new_tokens`` after ``prompt_ids`` (B, P), P >= 1.

    ``cache``: continue from an existing cache (e.g. a loaded state cartridge) instead of a fresh
    one; ``prompt_ids`` are then the tokens that follow the cached ones. Returns prompt +
    generated tokens, (B, P + n)."""
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] < 1:
        raise HybridSeqError(f"prompt_ids must be (batch, length >= 1), got {tuple(prompt_ids.shape)}")
    if max_new_tokens < 0:
        raise HybridSeqError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    check_sampling(temperature, top_k, top_p)
    if cuda_graph not in (True, False, "auto", "static"):
        raise HybridSeqError(f"cuda_graph must be True, False, 'auto' or 'static', got {cuda_graph!r}")
    B, P = prompt_ids.shape
    if max_new_tokens == 0:
        return prompt_ids
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        prompt_ids = prompt_ids.to(device)
        if cache is None:
            cache = model.new_cache(B, P + max_new_tokens, device=device)
        real_vocab = getattr(model, "vocab_size_unpadded", None)
        out = [prompt_ids]
        done = torch.zeros(B, dtype=torch.bool, device=device)
        logits = model(prompt_ids, cache=cache, logits_to_keep=1).logits[:, -1]
        decode = _decode_fn(model, cache, cuda_graph, max_new_tokens)
        for step in range(max_new_tokens):
            if real_vocab is not None and logits.shape[-1] > real_vocab:
                logits = logits.clone()
                logits[:, real_vocab:] = float("-inf")
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done = done | (nxt == eos_token_id)
            out.append(nxt[:, None])
            if step == max_new_tokens - 1 or (eos_token_id is not None and bool(done.all())):
                break
            logits = decode(nxt)
        return torch.cat(out, dim=1)
    finally:
        model.train(was_training)


def _decode_fn(model, cache, cuda_graph, max_new_tokens: int):
    """The one-token step ``ids (B,) -> logits (B, V)`` that ``generate`` uses (see its docstring
    for ``cuda_graph``)."""
    from .decode_graph import GraphedDecodeStep, graph_blockers

    device = next(model.parameters()).device
    use = cuda_graph
    if cuda_graph == "auto":
        use = (device.type == "cuda" and max_new_tokens >= AUTO_GRAPH_MIN_TOKENS
               and not graph_blockers(model, device, model.embed.weight.dtype))
    elif cuda_graph is True:
        blockers = graph_blockers(model, device, model.embed.weight.dtype)
        if blockers:
            raise HybridSeqError("generate(cuda_graph=True): " + "; ".join(blockers))
    if use is True or use == "static":
        if max_new_tokens <= 1:
            return None  # no step after the prefill
        try:
            return GraphedDecodeStep(model, cache, capture=use is True)
        except HybridSeqError as e:
            if cuda_graph != "auto":
                raise
            import warnings

            warnings.warn(f"generate: decoding without a CUDA graph ({e})", RuntimeWarning)

    def ordinary(nxt):
        return model(nxt[:, None], cache=cache).logits[:, -1]

    return ordinary
