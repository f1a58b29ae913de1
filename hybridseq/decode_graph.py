"""The model's own one-token forward, captured in a CUDA graph and replayed for each decoding step.

``GraphedDecodeStep(model, cache)`` captures ``model(ids, cache=cache, logits_to_keep=1)`` for one
token per row (as mamba_ssm's ``capture_graph`` does). That forward takes every block's ``step``,
which updates the cache's state tensors in place and reads the position from ``cache.position``
(a device tensor that the forward advances by one), so one graph serves every step: each replay
reads the token ids from a static input, writes the static (B, V) logits, steps every state and
advances the device position. The host mirrors the position in ``cache.seqlen_offset``.

Capture (CUDA only): warm-up steps on a side stream (Triton compilation, cuBLAS workspaces), then
one captured step; what the warm-up and the capture wrote (every state tensor, the position) is
saved before and restored after, so capturing does not change the cache. The cache keeps its
tensors for its whole life, so prefills (``model(prompt, cache=cache)``), steps, ``cache.save``
and ``hs.load_cache`` into the same cache mix freely with replays. Sampling stays outside the
graph (``hybridseq.generate.sample_next``).

``capture=False`` runs the same one-token forward eagerly (any device: tests, debugging).
Not capturable (``graph_blockers`` lists why; ``generate(cuda_graph="auto")`` then runs the
ordinary loop): what a block's ``graph_blocker`` reports (MoE with a ``capacity_factor``, MoE
``impl: loop`` or ``megablocks``, expert parallelism, MoE outside bfloat16 on CUDA), and a model
not on CUDA.
"""
from __future__ import annotations

import torch

from .errors import HybridSeqError

WARMUP_STEPS = 2


def graph_blockers(model, device, dtype) -> list[str]:
    """Reasons why the decode step of ``model`` cannot be captured on ``device`` with
    activations of ``dtype`` (empty: it can)."""
    device = torch.device(device)
    out = []
    if device.type != "cuda":
        out.append(f"CUDA graphs need a CUDA device, the model is on {device}")
    for i, layer in enumerate(model.layers):
        why = layer.block.graph_blocker(device, dtype)
        if why:
            out.append(f"layer {i} ({layer.kind}): {why}")
    return out


class GraphedDecodeStep:
    """One-token decode step of ``model`` over ``cache`` (batch and capacity fixed by it).

    ``capture=True`` records one CUDA graph (needs CUDA and no ``graph_blockers``); ``False``
    runs the same forward eagerly. ``step(ids)`` consumes one token per row at
    ``cache.seqlen_offset`` and returns the (B, V) logits: a static buffer, overwritten by the
    next step (clone it to keep it)."""

    def __init__(self, model, cache, *, capture: bool = True, warmup_steps: int = WARMUP_STEPS):
        if len(cache.states) != len(model.layers):
            raise HybridSeqError("this cache was made for another model (layer count differs)")
        self.model = model
        self.cache = cache
        p = model.embed.weight
        self.device = p.device
        dev = cache.device
        if dev is not None and dev != self.device:
            raise HybridSeqError(f"the cache is on {dev}, the model on {self.device}")
        self.ids = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=self.device)
        self.logits = None
        self.graph = None
        if capture:
            blockers = graph_blockers(model, self.device, p.dtype)
            if blockers:
                raise HybridSeqError("cannot capture the decode step in a CUDA graph: "
                                     + "; ".join(blockers))
            self._capture(warmup_steps)

    def _forward(self) -> torch.Tensor:
        return self.model(self.ids, cache=self.cache, logits_to_keep=1).logits[:, -1]

    def _saved_state(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(tensor, copy) of everything a step writes: every state tensor and the position."""
        ts = list(self.cache.tensors().values()) + [self.cache.position]
        return [(t, t.clone()) for t in ts]

    @torch.no_grad()
    def _capture(self, warmup_steps: int) -> None:
        """Warm up on a side stream, capture one step; the cache is left as it was."""
        offset = self.cache.seqlen_offset
        self.model.check_room(self.cache, offset, 1)
        saved = self._saved_state()
        side = torch.cuda.Stream(self.device)
        try:
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(max(1, warmup_steps)):
                    self.cache.seqlen_offset = offset
                    self._forward()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            self.cache.seqlen_offset = offset
            with torch.cuda.graph(graph):
                self.logits = self._forward()
            self.graph = graph
        except Exception as e:
            raise HybridSeqError(f"capturing the decode step in a CUDA graph failed: "
                                 f"{type(e).__name__}: {e}") from e
        finally:  # the warm-up and the capture stepped the states: put them back
            torch.cuda.current_stream(self.device).wait_stream(side)
            for t, copy in saved:
                t.copy_(copy)
            self.cache.seqlen_offset = offset

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
        self.ids.copy_(ids.reshape(B, 1))
        if self.graph is None:
            return self._forward()
        self.model.check_room(self.cache, self.cache.seqlen_offset, 1)
        self.graph.replay()  # advances cache.position on the device
        self.cache.advance(1, on_device=False)
        return self.logits

    __call__ = step


__all__ = ["GraphedDecodeStep", "graph_blockers"]
