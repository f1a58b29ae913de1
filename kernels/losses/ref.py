"""The LM-head cross-entropy by its definition (the reference for the fused op).

    loss = F.cross_entropy(F.linear(h, weight).float(), labels, ignore_index)

h (..., d), weight (V, d), labels (...) int64 with values in [0, V) or ``ignore_index``. The
logits are computed in h's dtype (under autocast: the autocast dtype), then taken to float32 as
a whole (N, V) tensor: what ``linear_cross_entropy`` avoids. Mean over the non-ignored labels
(NaN when every label is ignored, with zero gradients, as F.cross_entropy).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy_ref(h, weight, labels, ignore_index=-100):
    """Mean cross-entropy of ``F.linear(h, weight)`` against ``labels`` (module docstring)."""
    logits = F.linear(h, weight)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=ignore_index)


__all__ = ["linear_cross_entropy_ref"]
