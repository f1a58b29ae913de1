"""Mamba-1 block (kind ``mamba``): the selective state space (S6) block of Gu & Dao (2023).

With d_inner = expand * d_model, R = dt_rank, N = d_state, all tensors channel-last (b, l, .):

    x, z  = split(in_proj(u))                       in_proj: d_model -> 2 d_inner (bias: spec.bias)
    x     = silu(causal_conv1d(x, conv_weight, conv_bias))        depthwise, width d_conv
    dt_in, B, C = split(x_proj(x))                  x_proj: d_inner -> R + 2 N (no bias)
    dt_in, B, C = rms(dt_in), rms(B), rms(C)        only with spec.inner_norms (Jamba: learned
                                                    gains ``dt_norm``/``b_norm``/``c_norm``;
                                                    FalconMamba: without gains)
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
  Plain autograd over the same kernels (``MambaBlock(..., fuse_conv_proj=False)``) spends
  instead: slice_backward for each half of xz (zeros of the full (b, l, 2 d_inner), then a copy
  of the half), an add of the two full-width gradients, and an add of the two gradients of xc
  after a separate GEMM output. Counted with a dispatch-mode op log (B8 L2048 d_model 1024
  bf16, E = 2^25): those cost 1088 MiB of traffic and 6 launches; the fused node spends 192 MiB
  (the addmm's read of du, the dz copy) and 1 launch.

Inference state: ``{"conv": (b, d_conv - 1, d_inner) (the last inputs of the conv), "ssm":
(b, d_inner, d_state) float32}``, always updated in place (a prefill copies its final states
in; ``step`` writes them), so a CUDA graph of ``step`` keeps reading the same buffers.

Packed documents (``doc_ids``): the conv and the scan restart at each document start
(``seq_idx``), so no state crosses a document boundary.

The inner norms (``inner_norms``) run in PyTorch between x_proj and the scan, in the sequence
forward and in ``step``, on every backend; with them the Triton sequence path leaves out the
``_ConvProjFn`` fusion (its dt projection reads x_proj's output directly) and runs the conv, the
projections and the scan as separate ops, the scan and the conv still on their Triton kernels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels import causal_conv1d, causal_conv1d_update, selective_scan, selective_state_update
from ...kernels.backend import interpreting, triton_available
from ..base import Block, keep_fp32, seq_idx_from_doc_ids
from ..norm import RMSNorm
from .spec import MambaSpec


def _no_reinit(p: nn.Parameter) -> nn.Parameter:
    p._no_reinit = True
    return p


def _conv_triton():
    from ...kernels.conv1d import triton_conv

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
    spec_class = MambaSpec

    def __init__(self, d_model: int, spec, *, layer_idx: int = 0, n_layers: int = 1,
                 fuse_conv_proj: bool = True):
        super().__init__(d_model, spec, layer_idx=layer_idx, n_layers=n_layers)
        spec = self.spec
        # fuse_conv_proj: the Triton sequence path runs _ConvProjFn; False keeps plain autograd
        # over the same kernels (the benchmark's before/after row)
        self.fuse_conv_proj = bool(fuse_conv_proj)
        self.impl = spec.impl
        self.d_inner, self.dt_rank, self.d_state, self.d_conv = spec.dims(d_model)
        di, r, n, w = self.d_inner, self.dt_rank, self.d_state, self.d_conv
        bias = bool(spec.bias)

        self.in_proj = nn.Linear(d_model, 2 * di, bias=bias)
        bound = 1.0 / math.sqrt(w)  # nn.Conv1d default for a depthwise conv (fan_in = width)
        self.conv_weight = _no_reinit(nn.Parameter(torch.empty(di, w).uniform_(-bound, bound)))
        self.conv_bias = (_no_reinit(nn.Parameter(torch.empty(di).uniform_(-bound, bound)))
                          if spec.conv_bias else None)
        self.x_proj = nn.Linear(di, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, di, bias=True)
        self.out_proj = nn.Linear(di, d_model, bias=bias)

        # dt projection: weight ~ U(+-s) or s; bias = softplus^-1(dt), dt log-uniform
        s = r ** -0.5 * float(spec.dt_scale)
        with torch.no_grad():
            if spec.dt_init == "constant":
                self.dt_proj.weight.fill_(s)
            else:
                self.dt_proj.weight.uniform_(-s, s)
            lo, hi = math.log(spec.dt_min), math.log(spec.dt_max)
            dt = torch.exp(torch.rand(di, dtype=torch.float64) * (hi - lo) + lo)
            dt = dt.clamp(min=spec.dt_init_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        _no_reinit(self.dt_proj.weight)
        keep_fp32(_no_reinit(self.dt_proj.bias))

        A = torch.arange(1, n + 1, dtype=torch.float32).repeat(di, 1)  # (di, n): S4D-real
        self.A_log = keep_fp32(_no_reinit(nn.Parameter(torch.log(A))))
        self.D = keep_fp32(_no_reinit(nn.Parameter(torch.ones(di))))

        self.inner_norms = spec.inner_norms
        self.inner_eps = float(spec.inner_norm_eps)
        if spec.inner_norms == "rms":
            self.dt_norm = RMSNorm(r, self.inner_eps)
            self.b_norm = RMSNorm(n, self.inner_eps)
            self.c_norm = RMSNorm(n, self.inner_eps)

    def _inner(self, dt_in: torch.Tensor, B: torch.Tensor, C: torch.Tensor):
        """The spec's inner norms on dt_in (before dt_proj), B and C (each over its last dim)."""
        if self.inner_norms == "rms":
            return self.dt_norm(dt_in), self.b_norm(B), self.c_norm(C)
        if self.inner_norms == "rms_weightless":
            def rms(t):
                return F.rms_norm(t.float(), (t.shape[-1],), None, self.inner_eps).to(t.dtype)

            return rms(dt_in), rms(B), rms(C)
        return dt_in, B, C

    # --- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, state=None, offset: int = 0, doc_ids=None) -> torch.Tensor:
        """x (b, l, d_model) normed input -> (b, l, d_model). With ``state``: continue it from
        ``offset`` tokens (0: from zero) and leave the final states in it."""
        di, r, n = self.d_inner, self.dt_rank, self.d_state
        A = -torch.exp(self.A_log.float())
        xz = self.in_proj(x)
        xs, z = xz[..., :di], xz[..., di:]
        seq_idx = seq_idx_from_doc_ids(doc_ids, x, self)
        conv_w = self.conv_weight.to(xs.dtype)
        conv_b = None if self.conv_bias is None else self.conv_bias.to(xs.dtype)
        scan_kw = dict(D=self.D.float(), delta_bias=self.dt_proj.bias.float(),
                       delta_softplus=True, impl=self.impl)
        if state is None and seq_idx is None and self._fused(xz):
            xc, z, delta, B, C = _ConvProjFn.apply(
                xz, conv_w, conv_b, self.x_proj.weight.to(xz.dtype),
                self.dt_proj.weight.to(xz.dtype), r, n)
            return self.out_proj(selective_scan(xc, delta, A, B, C, z=z, **scan_kw))
        conv_kw = dict(activation="silu", impl=self.impl)
        if seq_idx is not None:
            conv_kw["seq_idx"] = scan_kw["seq_idx"] = seq_idx
        if state is None:
            xc = causal_conv1d(xs, conv_w, conv_b, **conv_kw)
        else:
            init = state["conv"].to(xs.dtype) if offset > 0 else None
            xc, conv_state = causal_conv1d(xs, conv_w, conv_b, initial_state=init,
                                           return_final_state=True, **conv_kw)
        x_dbl = self.x_proj(xc)
        dt_in, B, C = self._inner(*x_dbl.split([r, n, n], dim=-1))
        delta = F.linear(dt_in, self.dt_proj.weight)
        if state is None:
            y = selective_scan(xc, delta, A, B, C, z=z, **scan_kw)
        else:
            init = state["ssm"] if offset > 0 else None
            y, h = selective_scan(xc, delta, A, B, C, z=z, initial_state=init,
                                  return_final_state=True, **scan_kw)
            state["conv"].copy_(conv_state)
            state["ssm"].copy_(h)
        return self.out_proj(y)

    def _fused(self, xz: torch.Tensor) -> bool:
        """Whether the sequence path runs ``_ConvProjFn`` (the Triton conv, resolved as
        ``kernels.causal_conv1d`` resolves ``impl``; ``torch`` keeps plain autograd)."""
        if not self.fuse_conv_proj or self.impl == "torch" or self.inner_norms != "none":
            return False
        if self.impl == "auto":
            return xz.is_cuda and triton_available()
        # "triton": on CPU only under the interpreter; otherwise the plain path raises
        # the kernels' clear error
        return xz.is_cuda or interpreting()

    def step(self, x: torch.Tensor, state: dict, pos: torch.Tensor) -> torch.Tensor:
        """One decoding token: x (b, 1, d_model) normed input. Updates ``state`` in place (no
        host synchronisation: capturable in a CUDA graph); ``pos`` is not needed."""
        r, n, di = self.dt_rank, self.d_state, self.d_inner
        xz = self.in_proj(x[:, 0])
        xs, z = xz[:, :di], xz[:, di:]
        conv_w = self.conv_weight.to(xs.dtype)
        conv_b = None if self.conv_bias is None else self.conv_bias.to(xs.dtype)
        xc, conv_state = causal_conv1d_update(xs, state["conv"].to(xs.dtype), conv_w, conv_b,
                                              activation="silu", impl=self.impl)
        dt_in, B, C = self._inner(*self.x_proj(xc).split([r, n, n], dim=-1))
        delta = F.linear(dt_in, self.dt_proj.weight)
        A = -torch.exp(self.A_log.float())
        y, h = selective_state_update(state["ssm"], xc, delta, A, B, C, D=self.D.float(), z=z,
                                      dt_bias=self.dt_proj.bias.float(), dt_softplus=True,
                                      impl=self.impl)
        state["conv"].copy_(conv_state)
        state["ssm"].copy_(h)
        return self.out_proj(y).unsqueeze(1)

    # --- inference state ---------------------------------------------------------------------
    def new_state(self, batch_size: int, max_seq_len: int, device=None, dtype=None):
        dtype = dtype or self.in_proj.weight.dtype
        return {
            "conv": torch.zeros(batch_size, self.d_conv - 1, self.d_inner, device=device, dtype=dtype),
            "ssm": torch.zeros(batch_size, self.d_inner, self.d_state, device=device,
                               dtype=torch.float32),
        }

    def residual_out_params(self) -> list[nn.Parameter]:
        return [self.out_proj.weight]
