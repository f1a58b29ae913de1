"""Normalisation layers: RMSNorm and LayerNorm, computed in float32 and cast back.

RMSNorm (Zhang & Sennrich 2019): ``y = x / sqrt(mean(x**2, -1) + eps) * weight``.
LayerNorm: ``y = (x - mean) / sqrt(var + eps) * weight + bias`` (biased variance).
Both reduce over the last dimension; the statistics are taken in float32 whatever the input
dtype, and the result has the input's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm: one fused op where torch has one (fewer launches when decoding)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)

    @staticmethod
    def param_count(dim: int) -> int:
        return dim

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)

    @staticmethod
    def param_count(dim: int) -> int:
        return 2 * dim

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


NORMS = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}


def _norm_class(kind: str):
    try:
        return NORMS[kind]
    except KeyError:
        raise ConfigError(f"unknown norm {kind!r} (choices: {', '.join(NORMS)})", key="model.norm") from None


def make_norm(kind: str, dim: int, eps: float = 1e-5) -> nn.Module:
    """``make_norm("rmsnorm" | "layernorm", dim, eps)``."""
    return _norm_class(kind)(dim, eps)
