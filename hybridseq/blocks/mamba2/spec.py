"""The ``mamba2`` kind's keys, checks and closed forms: the Mamba-2 block of Dao & Gu (2024), the
state-space-dual (SSD) layer of Nemotron-H, Granite 4.0-H, Bamba, Zamba2 and Falcon-H1.

With d_inner = expand * d_model, H = d_inner / headdim heads, G = ngroups, N = d_state and
w = d_conv: in_proj d -> [z (d_inner), x (d_inner), B (G N), C (G N), dt (H)]; a depthwise causal
conv of width w with SiLU over x, B and C together (d_inner + 2 G N channels); the SSD scan per
head with A (H,), dt_bias (H,) and D (H,) or (H, headdim); the gated RMSNorm
``norm(y * silu(z))`` over groups of d_inner / G channels (or ``y * silu(z)`` without it:
``rmsnorm: false``); out_proj d_inner -> d. The module is ``block.Mamba2Block``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

from ...spec import fail, option
from ..spec import BlockSpec


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _divisors(n: int, limit: int = 8) -> str:
    ds = [d for d in range(1, n + 1) if n % d == 0]
    near = sorted(ds, key=lambda d: (abs(d - 64), d))[:limit]
    return ", ".join(str(d) for d in sorted(near))


@dataclass(eq=False)
class Mamba2Spec(BlockSpec):
    kind: ClassVar[str] = "mamba2"
    megatron: ClassVar[str | None] = "M"  # Megatron-LM's M is a Mamba-2 layer; declare M: {kind: mamba2}
    documents: ClassVar[str] = "state"
    hash_exclude: ClassVar[tuple] = ("impl", "dt_min", "dt_max", "dt_init_floor", "A_init_range",
                                     "chunk_size")

    d_state: int = option(128, range=(1, 256))
    d_conv: int = option(4, range=(1, 8))
    expand: int = option(2, ge=1)
    headdim: int = option(64, ge=1)
    ngroups: int = option(1, ge=1)
    chunk_size: int = option(256, range=(16, 1024))
    dt_min: float = option(0.001, gt=0)
    dt_max: float = option(0.1, gt=0)
    dt_init_floor: float = option(1e-4, ge=0)
    dt_limit: list[float] | None = None
    A_init_range: list[float] = option([1.0, 16.0])
    rmsnorm: bool = True
    norm_eps: float = option(1e-5, gt=0)
    D_has_hdim: bool = False
    bias: bool = False
    conv_bias: bool = True
    impl: Literal["auto", "triton", "torch"] = "auto"

    def check(self, *, file=None, key: str = "", d_model: int | None = None, **context) -> None:
        if self.dt_max < self.dt_min:
            fail(file, f"{key}.dt_max", f"dt_max={self.dt_max} is below dt_min={self.dt_min}", "0 < dt_min <= dt_max")
        lim = self.dt_limit
        if lim is not None:
            if len(lim) != 2 or not all(_number(v) for v in lim) or not 0 <= lim[0] < lim[1]:
                fail(file, f"{key}.dt_limit", f"{list(lim)} is not allowed",
                     "null, or [lo, hi] with 0 <= lo < hi (dt is clamped to it; hi may be .inf)")
            self.dt_limit = [float(v) for v in lim]
        r = self.A_init_range
        if len(r) != 2 or not all(_number(v) and math.isfinite(v) for v in r) or not 0 < r[0] <= r[1]:
            fail(file, f"{key}.A_init_range", f"{list(r)} is not allowed", "[lo, hi] with 0 < lo <= hi")
        self.A_init_range = [float(v) for v in r]
        if self.chunk_size & (self.chunk_size - 1):
            fail(file, f"{key}.chunk_size", f"{self.chunk_size} is not a power of two", "16, 32, ..., 1024")
        if d_model is not None:
            di = self.expand * d_model
            if di % self.headdim:
                fail(file, f"{key}.headdim", f"headdim={self.headdim} does not divide d_inner = expand * "
                     f"d_model = {di}", f"headdim values that divide it: {_divisors(di)}")
            h = di // self.headdim
            if h % self.ngroups:
                fail(file, f"{key}.ngroups", f"ngroups={self.ngroups} does not divide the {h} heads "
                     f"(d_inner {di} / headdim {self.headdim})", f"ngroups values that divide it: {_divisors(h)}")

    # --- sizes ---------------------------------------------------------------------------------
    def dims(self, d_model: int) -> tuple[int, int, int, int, int]:
        """(d_inner, nheads, headdim, ngroups, d_state)."""
        di = self.expand * d_model
        return di, di // self.headdim, self.headdim, self.ngroups, self.d_state

    def conv_dim(self, d_model: int) -> int:
        di, _, _, g, n = self.dims(d_model)
        return di + 2 * g * n

    def in_proj_dim(self, d_model: int) -> int:
        di, h, _, g, n = self.dims(d_model)
        return 2 * di + 2 * g * n + h

    def param_count(self, d_model: int) -> tuple[int, int]:
        """in_proj d (2 di + 2 G N + H) (+ bias), conv (di + 2 G N) w (+ conv bias), dt_bias H,
        A_log H, D H (or di with D_has_hdim), the norm's di gains, out_proj di d (+ d)."""
        di, h, _, _, _ = self.dims(d_model)
        cd, ip = self.conv_dim(d_model), self.in_proj_dim(d_model)
        p = d_model * ip + cd * self.d_conv + 2 * h + (di if self.D_has_hdim else h) + di * d_model
        if self.rmsnorm:
            p += di
        if self.bias:
            p += ip + d_model
        if self.conv_bias:
            p += cd
        return p, p

    def flops_per_token(self, d_model: int, seq_len: int) -> float:
        """Projections 2 (d (2 di + 2 G N + H) + di d), conv 2 (di + 2 G N) w, and the scan
        counted as its recurrence, 5 di N per token (the decay, dt x B^T and h C; the chunked
        algorithm's intra-chunk term adds about 2 Q (N + headdim) per head and token, not
        counted, as the Mamba-1 scan's count leaves out its own implementation)."""
        di, _, _, _, n = self.dims(d_model)
        proj = 2 * (d_model * self.in_proj_dim(d_model) + di * d_model)
        return float(proj + 2 * self.conv_dim(d_model) * self.d_conv + 5 * di * n)

    def state_bytes(self, d_model: int, max_seq_len: int, dtype_bytes: int = 2) -> int:
        """Constant in the length: conv (d_conv - 1) (di + 2 G N) * dtype_bytes + the SSM state
        H headdim N * 4 (float32)."""
        di, h, p, _, n = self.dims(d_model)
        return (self.d_conv - 1) * self.conv_dim(d_model) * dtype_bytes + h * p * n * 4

    def activation_elements(self, d_model: int) -> int:
        """in_proj out (2 di + 2 G N + H), conv out (di + 2 G N), the scan output and the normed,
        gated output (2 di), and the chunk states the scan keeps (H headdim N / chunk_size per
        token, float32: counted twice)."""
        di, h, p, g, n = self.dims(d_model)
        return 5 * di + 4 * g * n + h + 2 * (h * p * n) // self.chunk_size

    # --- texts ---------------------------------------------------------------------------------
    def _settings(self, d_model: int) -> str:
        di, h, p, g, n = self.dims(d_model)
        out = f"d_state={n} heads={h}x{p} groups={g} expand={self.expand}"
        if not self.rmsnorm:
            out += " no-norm"
        return out

    def backend(self, device) -> tuple[str, str]:
        from hybridseq.kernels.backend import triton_available

        cuda = str(getattr(device, "type", device)).startswith("cuda")
        if cuda and triton_available():
            return "triton", "CUDA device and Triton imports: chunked SSD scan, conv and gated norm kernels"
        return "torch", "the chunked SSD scan in PyTorch (Triton kernels need CUDA)"

    def build(self, d_model: int, *, layer_idx: int = 0, n_layers: int = 1):
        from .block import Mamba2Block

        return Mamba2Block(d_model, self, layer_idx=layer_idx, n_layers=n_layers)
