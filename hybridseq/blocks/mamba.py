"""Mamba-1 block (kind ``mamba``): the selective state space (S6) block of Gu & Dao (2023).

With d_inner = expand * d_model, R = dt_rank, N = d_state, all tensors channel-last (b, l, .):

    x, z  = split(in_proj(u))                       in_proj: d_model -> 2 d_inner (bias: spec.bias)
    x     = silu(causal_conv1d(x, conv_weight, conv_bias))        depthwise, width d_conv
    dt_in, B, C = split(x_proj(x))                  x_proj: d_inner -> R + 2 N (no bias)
    delta = dt_in @ dt_proj.weight^T                dt_proj: R -> d_inner; its bias is added
                                                    inside the scan: dt = softplus(delta + bias)
    y     = selective_scan(x, delta, A, B, C, D, z) h_t = exp(dt A) h_{t-1} + dt B_t x_t,
                                                    y_t = C_t h_t + D x_t, y = y * silu(z)
    out   = out_proj(y)                             out_proj: d_inner -> d_model (bias: spec.bias)

Initialisation (S4D-real and the Mamba dt init):
- ``A_log[c, :] = log(1..N)`` for every channel, ``A = -exp(A_log)``; ``D = 1``.
- dt ~ exp(U[log dt_min, log dt_max]) clamped to >= dt_init_floor, stored in ``dt_proj.bias`` as
  its inverse softplus ``dt + log(-expm1(-dt))``; ``dt_proj.weight`` ~ U(+-s) (``dt_init:
  random``) or = s (``constant``), s = dt_rank ** -0.5 * dt_scale.
- ``conv_weight``/``conv_bias`` keep PyTorch's Conv1d default (U(+-1/sqrt(d_conv))), as Mamba.
These and ``A_log``/``D`` are tagged ``_no_reinit`` so the model's generic init leaves them alone;
``A_log``, ``D`` and ``dt_proj.bias`` are float32 (``_keep_fp32``) with no weight decay.

Kernels (``hybridseq.kernels``, backend from ``spec.impl``): ``causal_conv1d`` and
``selective_scan`` for a sequence (with an initial state when continuing a cache),
``causal_conv1d_update`` and ``selective_state_update`` for one decoding token.

Triton path without a state (training, and prefill from scratch): conv, x_proj and dt_proj are
one autograd node (``_ConvProjFn``) between in_proj and the scan, so that the backward makes no
extra pass over (b, l, .) memory. Per step, with E = b * l * d_inner elements (bf16: 2E bytes):

- forward: in_proj GEMM (writes xz, 2 * 2E), conv on the x half of xz in place (reads 2E, writes
  xc 2E), x_proj GEMM (reads xc), dt_proj GEMM (writes delta 2E), scan (reads xc, delta, z: the z
  half of xz, a strided view, no copy), out_proj GEMM. No transposes, no contiguous copies, no
  casts when the weights already have the activation dtype.
- backward: out_proj GEMMs, scan backward, then one node: d(dt_in) and dW_dt GEMMs on ddelta,
  d(x_dbl) = [d dt_in, dB, dC] (b*l*(R+2N), small), ``dxc = du + d(x_dbl) @ W_x`` as one addmm
  (no separate add), dW_x, the conv backward writing dx straight into the x half of one
  (b, l, 2 d_inner) buffer and dz copied into its other half (2E read, 2E written), then the
  in_proj GEMMs on that buffer.
  Plain autograd over the same kernels (``fuse = False``) spends instead: slice_backward for
  each half of xz (zeros of the full (b, l, 2 d_inner), then a copy of the half), an add of the
  two full-width gradients, and an add of the two gradients of xc after a separate GEMM output.
  Counted with a dispatch-mode op log (2026-11-22, B8 L2048 d_model 1024 bf16, E = 2^25): those
  cost 1088 MiB of traffic and 6 launches; the fused node spends 192 MiB (the addmm's read of
  du, the dz copy) and 1 launch: 896 MiB less, about 0.3 ms at the H100's 2.96 TB/s copy rate.
State: ``{"conv": (b, d_conv - 1, d_inner) (the last inputs of the conv), "ssm": (b, d_inner,
d_state) float32}``.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import resolve_dt_rank
from ..config.schema import BLOCK_DEFAULTS
from ..errors import ConfigError
from .base import Block, keep_fp32

IMPLS = ("auto", "triton", "torch")


def _spec(spec: Mapping[str, Any]) -> dict:
    return {**BLOCK_DEFAULTS["mamba"], **dict(spec)}


def _dims(d_model: int, spec: Mapping[str, Any]) -> tuple[int, int, int, int]:
    """(d_inner, dt_rank, d_state, d_conv)."""
    d_inner = int(spec["expand"] * d_model)
    if d_inner < 1:
        raise ConfigError(f"expand * d_model must be >= 1, got {d_inner}", key="mamba.expand")
    return d_inner, resolve_dt_rank(d_model, spec["dt_rank"]), int(spec["d_state"]), int(spec["d_conv"])


def _no_reinit(p: nn.Parameter) -> nn.Parameter:
    p._no_reinit = True
    return p


def _conv_triton():
    from ..kernels.conv1d import triton_conv

    return triton_conv


class _ConvProjFn(torch.autograd.Function):
    """xz (b, l, 2 di) -> (xc, z, delta, B, C) on the Triton conv, one node for autograd.

        xc = silu(causal_conv1d(xz[..., :di], conv_w, conv_b))        (b, l, di), new
        z = xz[..., di:]                                               a view of xz, no copy
        x_dbl = xc @ x_proj_w^T (b, l, R + 2N);  delta = x_dbl[..., :R] @ dt_proj_w^T (b, l, di)
        B, C = x_dbl[..., R:R+N], x_dbl[..., R+N:]                      views of x_dbl

    All weights come in the activation dtype (the caller casts them, tracked by autograd).
    Backward: d x_dbl = [ddelta @ dt_proj_w, dB, dC]; dxc_total = dxc + d x_dbl @ x_proj_w in one
    addmm; the conv backward writes dx into the x half of d(xz), whose z half the Triton scan's
    backward already wrote (dz comes in as that half of a buffer shaped like xz; another dz is
    copied in).
    Saved: xz, xc, x_dbl and the weights (all already alive for autograd; nothing new).
    """

    @staticmethod
    def forward(ctx, xz, conv_w, conv_b, x_proj_w, dt_proj_w, r, n):
        b, l, two_di = xz.shape
        di = two_di // 2
        conv = _conv_triton()
        xc = conv.causal_conv1d_fwd(xz[..., :di], conv_w, conv_b, silu=True)
        x_dbl = torch.mm(xc.view(b * l, di), x_proj_w.t())
        delta = torch.mm(x_dbl[:, :r], dt_proj_w.t()).view(b, l, di)
        x_dbl = x_dbl.view(b, l, r + 2 * n)
        ctx.save_for_backward(xz, conv_w, conv_b, x_proj_w, dt_proj_w, xc, x_dbl)
        ctx.rn = (r, n)
        return xc, xz[..., di:], delta, x_dbl[..., r:r + n], x_dbl[..., r + n:]

    @staticmethod
    def backward(ctx, dxc, dz, ddelta, dB, dC):
        xz, conv_w, conv_b, x_proj_w, dt_proj_w, xc, x_dbl = ctx.saved_tensors
        r, n = ctx.rn
        b, l, two_di = xz.shape
        di = two_di // 2
        bl = b * l
        need = ctx.needs_input_grad
        x_dbl = x_dbl.view(bl, r + 2 * n)
        zeros = lambda k: xz.new_zeros(bl, k)  # noqa: E731
        if ddelta is not None:
            dd = ddelta.reshape(bl, di)
            d_dt_in = torch.mm(dd, dt_proj_w)
            d_dtw = torch.mm(dd.t(), x_dbl[:, :r]) if need[4] else None
        else:
            d_dt_in, d_dtw = zeros(r), (torch.zeros_like(dt_proj_w) if need[4] else None)
        d_x_dbl = torch.cat([d_dt_in, dB.reshape(bl, n) if dB is not None else zeros(n),
                             dC.reshape(bl, n) if dC is not None else zeros(n)], dim=1)
        if dxc is not None:
            dxc = torch.addmm(dxc.reshape(bl, di), d_x_dbl, x_proj_w)
        else:
            dxc = torch.mm(d_x_dbl, x_proj_w)
        d_xw = torch.mm(d_x_dbl.t(), xc.view(bl, di)) if need[3] else None
        # the Triton scan writes dz into the z half of a buffer shaped like xz
        # (selective_scan_triton._dz_buffer): take that buffer, no copy of dz
        shared = (dz is not None and dz._base is not None and dz._base.shape == xz.shape
                  and dz._base.is_contiguous() and dz.stride() == xz.stride()
                  and dz.storage_offset() - dz._base.storage_offset() == di)
        dxz = dz._base if shared else torch.empty_like(xz, memory_format=torch.contiguous_format)
        _, d_cw, d_cb = _conv_triton().causal_conv1d_bwd(
            xz[..., :di], conv_w, conv_b, dxc.view(b, l, di), silu=True, dx_out=dxz[..., :di])
        if dz is None:
            dxz[..., di:].zero_()
        elif not shared:
            dxz[..., di:].copy_(dz)
        return dxz, d_cw, d_cb, d_xw, d_dtw, None, None


class MambaBlock(Block):
    kind = "mamba"
    # The Triton sequence path runs _ConvProjFn; False falls back to plain autograd over the
    # same kernels (kept for the in-run before/after row of `hybridseq bench block`).
    fuse = True

    def __init__(self, d_model: int, spec: Mapping[str, Any], *, layer_idx: int = 0, n_layers: int = 1):
        spec = _spec(spec)
        super().__init__(d_model, spec, layer_idx=layer_idx, n_layers=n_layers)
        if spec["impl"] not in IMPLS:
            raise ConfigError(f"unknown impl {spec['impl']!r} ({' | '.join(IMPLS)})", key="mamba.impl")
        self.impl = spec["impl"]
        self.d_inner, self.dt_rank, self.d_state, self.d_conv = _dims(d_model, spec)
        di, r, n, w = self.d_inner, self.dt_rank, self.d_state, self.d_conv
        bias = bool(spec["bias"])

        self.in_proj = nn.Linear(d_model, 2 * di, bias=bias)
        bound = 1.0 / math.sqrt(w)  # nn.Conv1d default for a depthwise conv (fan_in = width)
        self.conv_weight = _no_reinit(nn.Parameter(torch.empty(di, w).uniform_(-bound, bound)))
        self.conv_bias = (_no_reinit(nn.Parameter(torch.empty(di).uniform_(-bound, bound)))
                          if spec["conv_bias"] else None)
        self.x_proj = nn.Linear(di, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, di, bias=True)
        self.out_proj = nn.Linear(di, d_model, bias=bias)

        # dt projection: weight ~ U(+-s) or s; bias = softplus^-1(dt), dt log-uniform
        s = r ** -0.5 * float(spec["dt_scale"])
        with torch.no_grad():
            if spec["dt_init"] == "constant":
                self.dt_proj.weight.fill_(s)
            elif spec["dt_init"] == "random":
                self.dt_proj.weight.uniform_(-s, s)
            else:
                raise ConfigError(f"unknown dt_init {spec['dt_init']!r} (random | constant)",
                                  key="mamba.dt_init")
            lo, hi = math.log(spec["dt_min"]), math.log(spec["dt_max"])
            dt = torch.exp(torch.rand(di, dtype=torch.float64) * (hi - lo) + lo)
            dt = dt.clamp(min=spec["dt_init_floor"])
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        _no_reinit(self.dt_proj.weight)
        keep_fp32(_no_reinit(self.dt_proj.bias))

        A = torch.arange(1, n + 1, dtype=torch.float32).repeat(di, 1)  # (di, n): S4D-real
        self.A_log = keep_fp32(_no_reinit(nn.Parameter(torch.log(A))))
        self.D = keep_fp32(_no_reinit(nn.Parameter(torch.ones(di))))

    # --- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, state=None, offset: int = 0) -> torch.Tensor:
        b, l, _ = x.shape
        di, r, n = self.d_inner, self.dt_rank, self.d_state
        A = -torch.exp(self.A_log.float())
        xz = self.in_proj(x)
        xs, z = xz[..., :di], xz[..., di:]
        if state is not None and l == 1 and offset > 0:
            return self._step(xs[:, 0], z[:, 0], A, state).unsqueeze(1)

        conv_w = self.conv_weight.to(xs.dtype)
        conv_b = None if self.conv_bias is None else self.conv_bias.to(xs.dtype)
        scan_kw = dict(D=self.D.float(), delta_bias=self.dt_proj.bias.float(),
                       delta_softplus=True, impl=self.impl)
        if state is None and self._fused(xz):
            xc, z, delta, B, C = _ConvProjFn.apply(
                xz, conv_w, conv_b, self.x_proj.weight.to(xz.dtype),
                self.dt_proj.weight.to(xz.dtype), r, n)
            return self.out_proj(kernels.selective_scan(xc, delta, A, B, C, z=z, **scan_kw))
        if state is None:
            xc = kernels.causal_conv1d(xs, conv_w, conv_b, activation="silu", impl=self.impl)
        else:
            init = state["conv"].to(xs.dtype) if offset > 0 else None
            xc, conv_state = kernels.causal_conv1d(xs, conv_w, conv_b, activation="silu",
                                                   initial_state=init, return_final_state=True,
                                                   impl=self.impl)
        x_dbl = self.x_proj(xc)
        dt_in, B, C = x_dbl.split([r, n, n], dim=-1)
        delta = F.linear(dt_in, self.dt_proj.weight)
        if state is None:
            y = kernels.selective_scan(xc, delta, A, B, C, z=z, **scan_kw)
        else:
            init = state["ssm"] if offset > 0 else None
            y, h = kernels.selective_scan(xc, delta, A, B, C, z=z, initial_state=init,
                                          return_final_state=True, **scan_kw)
            state["conv"] = conv_state.to(state["conv"].dtype)
            state["ssm"] = h.float()
        return self.out_proj(y)

    def _fused(self, xz: torch.Tensor) -> bool:
        """Whether the sequence path runs ``_ConvProjFn`` (the Triton conv, resolved as
        ``kernels.causal_conv1d`` resolves ``impl``; ``torch`` keeps plain autograd)."""
        if not self.fuse or self.impl == "torch" or xz.dtype not in (torch.float16, torch.bfloat16, torch.float32,
                                                     torch.float64):
            return False
        if self.impl == "auto":
            return xz.is_cuda and kernels.triton_available()
        # "triton": on CPU only under the interpreter; otherwise the plain path raises
        # kernels' clear error
        return xz.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"

    def _step(self, xs: torch.Tensor, z: torch.Tensor, A: torch.Tensor, state: dict) -> torch.Tensor:
        """One decoding token: xs, z (b, d_inner). Updates ``state``; returns (b, d_model)."""
        r, n = self.dt_rank, self.d_state
        conv_w = self.conv_weight.to(xs.dtype)
        conv_b = None if self.conv_bias is None else self.conv_bias.to(xs.dtype)
        xc, conv_state = kernels.causal_conv1d_update(xs, state["conv"].to(xs.dtype), conv_w, conv_b,
                                                      activation="silu", impl=self.impl)
        x_dbl = self.x_proj(xc)
        dt_in, B, C = x_dbl.split([r, n, n], dim=-1)
        delta = F.linear(dt_in, self.dt_proj.weight)
        y, h = kernels.selective_state_update(state["ssm"], xc, delta, A, B, C, D=self.D.float(),
                                              z=z, dt_bias=self.dt_proj.bias.float(),
                                              dt_softplus=True, impl=self.impl)
        state["conv"] = conv_state.to(state["conv"].dtype)
        state["ssm"] = h
        return self.out_proj(y)

    # --- inference state ---------------------------------------------------------------------
    def new_state(self, batch_size: int, max_seq_len: int, device=None, dtype=None):
        dtype = dtype or self.in_proj.weight.dtype
        return {
            "conv": torch.zeros(batch_size, self.d_conv - 1, self.d_inner, device=device, dtype=dtype),
            "ssm": torch.zeros(batch_size, self.d_inner, self.d_state, device=device,
                               dtype=torch.float32),
        }

    @staticmethod
    def state_bytes(d_model: int, spec: Mapping[str, Any], max_seq_len: int, dtype_bytes: int = 2) -> int:
        """Constant in the sequence length: conv (d_conv - 1) d_inner * dtype_bytes + ssm
        d_inner d_state * 4 (float32)."""
        di, _, n, w = _dims(d_model, _spec(spec))
        return (w - 1) * di * dtype_bytes + di * n * 4

    # --- accounting --------------------------------------------------------------------------
    @staticmethod
    def param_count(d_model: int, spec: Mapping[str, Any]) -> tuple[int, int]:
        """in_proj 2 d di (+2 di), conv di w (+di), x_proj di (R + 2N), dt_proj R di + di,
        A_log di N, D di, out_proj di d (+d); (+...) when spec.bias / spec.conv_bias."""
        spec = _spec(spec)
        di, r, n, w = _dims(d_model, spec)
        p = 2 * d_model * di + di * w + di * (r + 2 * n) + r * di + di + di * n + di + di * d_model
        if spec["bias"]:
            p += 2 * di + d_model
        if spec["conv_bias"]:
            p += di
        return p, p

    @staticmethod
    def flops_per_token(d_model: int, spec: Mapping[str, Any], seq_len: int) -> float:
        """Projections 2 (2 d di + di (R + 2N) + R di + di d), conv 2 di w, and the scan
        9 di N (exp(dt A), dt B x, the state update, C . h: the count mamba_ssm uses), independent
        of ``seq_len``; other elementwise ops (softplus, silu, gating) are not counted."""
        spec = _spec(spec)
        di, r, n, w = _dims(d_model, spec)
        proj = 2 * (2 * d_model * di + di * (r + 2 * n) + r * di + di * d_model)
        return float(proj + 2 * di * w + 9 * di * n)

    def residual_out_params(self) -> list[nn.Parameter]:
        return [self.out_proj.weight]
