"""The ``mamba`` kind's keys, checks and closed forms (Mamba-1, the S6 block of Gu & Dao 2023).

With d_inner = expand * d_model, R = dt_rank (``auto``: ceil(d_model / 16)), N = d_state and
w = d_conv: in_proj d -> 2 d_inner, a depthwise causal conv of width w, x_proj d_inner -> R + 2N,
dt_proj R -> d_inner, the selective scan with A (d_inner, N) and D (d_inner,), out_proj
d_inner -> d. The module is ``block.MambaBlock``.

``inner_norms``: an RMSNorm (epsilon ``inner_norm_eps``) on each of dt_in (before dt_proj), B
and C, between x_proj and the scan: ``rms`` with learned gains (Jamba), ``rms_weightless``
without (FalconMamba), ``none`` (Mamba).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

from ...spec import fail, option
from ..spec import BlockSpec


@dataclass(eq=False)
class MambaSpec(BlockSpec):
    kind: ClassVar[str] = "mamba"
    megatron: ClassVar[str | None] = "M"
    documents: ClassVar[str] = "state"
    hash_exclude: ClassVar[tuple] = ("impl", "dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor")
    hash_optional: ClassVar[dict] = {"inner_norms": "none", "inner_norm_eps": 1e-6}

    d_state: int = option(16, range=(1, 256))
    d_conv: int = option(4, range=(1, 8))
    expand: int = option(2, ge=1)
    dt_rank: int | str = "auto"
    dt_min: float = option(0.001, gt=0)
    dt_max: float = option(0.1, gt=0)
    dt_init: Literal["random", "constant"] = "random"
    dt_scale: float = option(1.0, gt=0)
    dt_init_floor: float = option(1e-4, ge=0)
    conv_bias: bool = True
    bias: bool = False
    inner_norms: Literal["none", "rms", "rms_weightless"] = "none"
    inner_norm_eps: float = option(1e-6, gt=0)
    impl: Literal["auto", "triton", "torch"] = "auto"

    def check(self, *, file=None, key: str = "", **context) -> None:
        r = self.dt_rank
        allowed = "'auto' (ceil(d_model / 16)) or an integer >= 1"
        if isinstance(r, str) and r != "auto":
            fail(file, f"{key}.dt_rank", f"{r!r} is not allowed", allowed)
        if isinstance(r, int) and r < 1:
            fail(file, f"{key}.dt_rank", f"{r} is too small", allowed)
        if self.dt_max < self.dt_min:
            fail(file, f"{key}.dt_max", f"dt_max={self.dt_max} is below dt_min={self.dt_min}",
                 "0 < dt_min <= dt_max")

    # --- sizes ---------------------------------------------------------------------------------
    def dims(self, d_model: int) -> tuple[int, int, int, int]:
        """(d_inner, dt_rank, d_state, d_conv)."""
        r = math.ceil(d_model / 16) if self.dt_rank == "auto" else int(self.dt_rank)
        return int(self.expand * d_model), r, int(self.d_state), int(self.d_conv)

    def param_count(self, d_model: int) -> tuple[int, int]:
        """in_proj 2 d di (+2 di), conv di w (+di), x_proj di (R + 2N), dt_proj R di + di,
        A_log di N, D di, out_proj di d (+d); (+...) with ``bias`` / ``conv_bias``; the inner
        norms' gains R + 2N with ``inner_norms: rms``."""
        di, r, n, w = self.dims(d_model)
        p = 2 * d_model * di + di * w + di * (r + 2 * n) + r * di + di + di * n + di + di * d_model
        if self.bias:
            p += 2 * di + d_model
        if self.conv_bias:
            p += di
        if self.inner_norms == "rms":
            p += r + 2 * n
        return p, p

    def flops_per_token(self, d_model: int, seq_len: int) -> float:
        """Projections 2 (2 d di + di (R + 2N) + R di + di d), conv 2 di w, and the scan 9 di N
        (exp(dt A), dt B x, the state update, C . h: the count mamba_ssm uses), independent of
        ``seq_len``; softplus, silu and gating are not counted."""
        di, r, n, w = self.dims(d_model)
        proj = 2 * (2 * d_model * di + di * (r + 2 * n) + r * di + di * d_model)
        return float(proj + 2 * di * w + 9 * di * n)

    def state_bytes(self, d_model: int, max_seq_len: int, dtype_bytes: int = 2) -> int:
        """Constant in the sequence length: conv (d_conv - 1) d_inner * dtype_bytes + ssm
        d_inner d_state * 4 (float32)."""
        di, _, n, w = self.dims(d_model)
        return (w - 1) * di * dtype_bytes + di * n * 4

    def activation_elements(self, d_model: int) -> int:
        """in_proj's x and z (2 e d), conv out, silu out, dt, scan out, gated out (5 e d), x_proj
        out (R + 2N); the fused scan recomputes its states in backward (none kept)."""
        di, r, n, _ = self.dims(d_model)
        return 7 * di + r + 2 * n

    # --- texts ---------------------------------------------------------------------------------
    def _settings(self, d_model: int) -> str:
        out = f"d_state={self.d_state} d_conv={self.d_conv} expand={self.expand}"
        return out + (f" inner_norms={self.inner_norms}" if self.inner_norms != "none" else "")

    def resolved(self, d_model: int) -> dict:
        return {**self.to_dict(), "dt_rank": self.dims(d_model)[1]}

    def backend(self, device) -> tuple[str, str]:
        from hybridseq.kernels.backend import describe

        return describe(device)

    def build(self, d_model: int, *, layer_idx: int = 0, n_layers: int = 1):
        from .block import MambaBlock

        return MambaBlock(d_model, self, layer_idx=layer_idx, n_layers=n_layers)
