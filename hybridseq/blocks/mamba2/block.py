"""Mamba-2 block (kind ``mamba2``; keys and closed forms in ``spec.py``), Dao & Gu (2024).

With d_inner = expand * d_model, H heads of ``headdim`` channels, G groups, N = d_state, all
tensors channel-last (b, l, .):

    z, xBC, dt = split(in_proj(u))                 in_proj: d -> 2 di + 2 G N + H (bias: spec.bias)
    xBC = silu(causal_conv1d(xBC))                 depthwise over x, B and C together, width d_conv
    x, B, C = split(xBC)                           x (b, l, H, headdim); B, C (b, l, G, N)
    y = ssd_scan(x, dt, A, B, C, D, dt_bias)       dt = softplus(dt + dt_bias), clamped to dt_limit;
                                                   h_t = exp(dt A) h_{t-1} + dt x_t B_t^T,
                                                   y_t = h_t C_t + D x_t   (head k uses group
                                                   k // (H / G))
    y = rmsnorm_gated(y, z)                        norm(y * silu(z)) over groups of di / G channels
                                                   (``rmsnorm: false``: y * silu(z) in the scan)
    out = out_proj(y)                              out_proj: di -> d (bias: spec.bias)

Initialisation as mamba_ssm's ``Mamba2``: A = U[A_init_range] per head, stored as ``A_log``;
dt ~ exp(U[log dt_min, log dt_max]) clamped to >= dt_init_floor, stored in ``dt_bias`` as its
inverse softplus; D = 1; the conv keeps PyTorch's Conv1d default. ``A_log``, ``D`` and
``dt_bias`` are float32 (``_keep_fp32``) with no weight decay; they and the conv are tagged
``_no_reinit`` so the model's generic init leaves them alone.

Kernels (``hybridseq.kernels``, backend from ``spec.impl``): ``causal_conv1d``, ``ssd_scan`` and
``rmsnorm_gated`` for a sequence, ``causal_conv1d_update`` and ``ssd_state_update`` for one
decoding token. Inference state: ``{"conv": (b, d_conv - 1, di + 2 G N), "ssm": (b, H, headdim,
N) float32}``, updated in place. Packed documents (``doc_ids``) restart the conv and the scan at
each document start (``seq_idx``).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ...kernels import (causal_conv1d, causal_conv1d_update, rmsnorm_gated, ssd_scan,
                        ssd_state_update)
from ..base import Block, keep_fp32, seq_idx_from_doc_ids
from .spec import Mamba2Spec


def _no_reinit(p: nn.Parameter) -> nn.Parameter:
    p._no_reinit = True
    return p


class Mamba2Block(Block):
    spec_class = Mamba2Spec

    def __init__(self, d_model: int, spec, *, layer_idx: int = 0, n_layers: int = 1):
        super().__init__(d_model, spec, layer_idx=layer_idx, n_layers=n_layers)
        s = self.spec
        self.impl = s.impl
        self.d_inner, self.nheads, self.headdim, self.ngroups, self.d_state = s.dims(d_model)
        self.d_conv = s.d_conv
        self.conv_dim = s.conv_dim(d_model)
        self.chunk_size = s.chunk_size
        self.dt_limit = None if s.dt_limit is None else tuple(s.dt_limit)
        di, h = self.d_inner, self.nheads

        self.in_proj = nn.Linear(d_model, s.in_proj_dim(d_model), bias=s.bias)
        bound = 1.0 / math.sqrt(s.d_conv)  # nn.Conv1d default for a depthwise conv
        self.conv_weight = _no_reinit(nn.Parameter(torch.empty(self.conv_dim, s.d_conv).uniform_(-bound, bound)))
        self.conv_bias = (_no_reinit(nn.Parameter(torch.empty(self.conv_dim).uniform_(-bound, bound)))
                          if s.conv_bias else None)
        lo, hi = math.log(s.dt_min), math.log(s.dt_max)
        dt = torch.exp(torch.rand(h, dtype=torch.float64) * (hi - lo) + lo).clamp(min=s.dt_init_floor)
        self.dt_bias = keep_fp32(_no_reinit(nn.Parameter((dt + torch.log(-torch.expm1(-dt))).float())))
        a_lo, a_hi = s.A_init_range
        A = torch.empty(h, dtype=torch.float32).uniform_(a_lo, a_hi)
        self.A_log = keep_fp32(_no_reinit(nn.Parameter(torch.log(A))))
        self.D = keep_fp32(_no_reinit(nn.Parameter(torch.ones(di if s.D_has_hdim else h))))
        self.norm_weight = nn.Parameter(torch.ones(di)) if s.rmsnorm else None
        self.out_proj = nn.Linear(di, d_model, bias=s.bias)

    # --- shared pieces -------------------------------------------------------------------------
    def _D(self) -> torch.Tensor:
        D = self.D.float()
        return D.view(self.nheads, self.headdim) if self.spec.D_has_hdim else D

    def _conv_params(self, dtype):
        return (self.conv_weight.to(dtype),
                None if self.conv_bias is None else self.conv_bias.to(dtype))

    def _out(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The gated norm (when on) and out_proj; y, z (..., d_inner)."""
        if self.norm_weight is not None:
            y = rmsnorm_gated(y, self.norm_weight, z, eps=self.spec.norm_eps,
                              group_size=self.d_inner // self.ngroups, norm_before_gate=False,
                              impl=self.impl)
        return self.out_proj(y)

    # --- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, state=None, offset: int = 0, doc_ids=None) -> torch.Tensor:
        """x (b, l, d_model) normed input -> (b, l, d_model). With ``state``: continue it from
        ``offset`` tokens (0: from zero) and leave the final states in it."""
        b, l, _ = x.shape
        di, h, p, g, n = self.d_inner, self.nheads, self.headdim, self.ngroups, self.d_state
        zxbcdt = self.in_proj(x)
        z, xBC, dt = zxbcdt.split([di, self.conv_dim, h], dim=-1)
        seq_idx = seq_idx_from_doc_ids(doc_ids, x, self)
        conv_w, conv_b = self._conv_params(xBC.dtype)
        kw = {"seq_idx": seq_idx} if seq_idx is not None else {}
        if state is None:
            xBC = causal_conv1d(xBC, conv_w, conv_b, activation="silu", impl=self.impl, **kw)
        else:
            init = state["conv"].to(xBC.dtype) if offset > 0 else None
            xBC, conv_state = causal_conv1d(xBC, conv_w, conv_b, activation="silu", initial_state=init,
                                            return_final_state=True, impl=self.impl, **kw)
        xs, B, C = xBC.split([di, g * n, g * n], dim=-1)
        gate = None if self.norm_weight is not None else z.reshape(b, l, h, p)
        scan_kw = dict(D=self._D(), z=gate, dt_bias=self.dt_bias.float(), dt_softplus=True,
                       dt_limit=self.dt_limit, chunk_size=self.chunk_size, impl=self.impl, **kw)
        A = -torch.exp(self.A_log.float())
        args = (xs.reshape(b, l, h, p), dt, A, B.reshape(b, l, g, n), C.reshape(b, l, g, n))
        if state is None:
            y = ssd_scan(*args, **scan_kw)
        else:
            init = state["ssm"] if offset > 0 else None
            y, h_last = ssd_scan(*args, initial_state=init, return_final_state=True, **scan_kw)
            state["conv"].copy_(conv_state)
            state["ssm"].copy_(h_last)
        return self._out(y.reshape(b, l, di), z)

    def step(self, x: torch.Tensor, state: dict, pos: torch.Tensor) -> torch.Tensor:
        """One decoding token: x (b, 1, d_model). Updates ``state`` in place with no host
        synchronisation (capturable in a CUDA graph); ``pos`` is not needed."""
        b = x.shape[0]
        di, h, p, g, n = self.d_inner, self.nheads, self.headdim, self.ngroups, self.d_state
        z, xBC, dt = self.in_proj(x[:, 0]).split([di, self.conv_dim, h], dim=-1)
        conv_w, conv_b = self._conv_params(xBC.dtype)
        xBC, conv_state = causal_conv1d_update(xBC, state["conv"].to(xBC.dtype), conv_w, conv_b,
                                               activation="silu", impl=self.impl)
        state["conv"].copy_(conv_state)
        xs, B, C = xBC.split([di, g * n, g * n], dim=-1)
        gate = None if self.norm_weight is not None else z.reshape(b, h, p)
        y = ssd_state_update(state["ssm"], xs.reshape(b, h, p), dt, -torch.exp(self.A_log.float()),
                             B.reshape(b, g, n), C.reshape(b, g, n), D=self._D(), z=gate,
                             dt_bias=self.dt_bias.float(), dt_softplus=True, dt_limit=self.dt_limit,
                             impl=self.impl)
        return self._out(y.reshape(b, di), z).unsqueeze(1)

    # --- inference state -----------------------------------------------------------------------
    def new_state(self, batch_size: int, max_seq_len: int, device=None, dtype=None):
        dtype = dtype or self.in_proj.weight.dtype
        return {
            "conv": torch.zeros(batch_size, self.d_conv - 1, self.conv_dim, device=device, dtype=dtype),
            "ssm": torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device,
                               dtype=torch.float32),
        }

    def residual_out_params(self) -> list[nn.Parameter]:
        return [self.out_proj.weight]
