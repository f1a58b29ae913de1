"""The expert MLP on rows grouped by expert, as one autograd op with explicit grouped GEMMs.

For x (M, K) whose rows come in G consecutive groups of ``counts`` rows, w_in (G, K, n_in*F),
w_out (G, F, N):

    h = x_g @ w_in[g]            (M, n_in*F)   grouped GEMM "fwd in"
    a = act(h)                   (M, F)        SwiGLU (gate | up halves) or exact GELU
    y = a_g @ w_out[g]           (M, N)        grouped GEMM "fwd out"

backward, with dy (M, N):

    da      = dy_g @ w_out[g]^T     dgrad out      dh = act'(h) * da (``kernels.swiglu``)
    dx      = dh_g @ w_in[g]^T      dgrad in
    dw_out[g] = a_g^T @ dy_g        wgrad out      dw_in[g] = x_g^T @ dh_g   wgrad in

Saved for the backward: x, the weights, h and a (autograd through the unfused ops also keeps
silu(gate)). Every GEMM is a forward call of ``torch._grouped_mm`` (``gemm="torch"``: CUTLASS on
sm90, no host synchronisation; it needs 16-byte aligned row strides, so K, F and N must be
multiples of 8 in bf16) or one ``torch.mm`` per group (``gemm="loop"``: cuBLAS on CUDA, any
dtype, written in place into the output rows; it reads the counts on the host: one
synchronisation per forward, none in the backward).

Operand layouts (``layout`` = "auto" or "FWD.DGRAD", each ``n`` or ``k``): torch._grouped_mm
picks a CUTLASS kernel per operand layout (row- or column-major B). ``n``: B passed N-contiguous
(row-major), ``k``: K-contiguous (column-major). ``auto`` (default) takes each weight as it is
stored: a (G, K, N) contiguous weight gives the forward ``n`` and the dgrad (w^T, a transposed
view) ``k``; a weight stored K-contiguous (a (G, N, K) tensor viewed transposed) gives the forward
``k`` and the dgrad ``n``; no copy either way, and its wgrad is computed transposed (dh^T x) so
that the gradient comes out with the weight's strides (autograd would otherwise copy it into
them). The MoE layer keeps its weights contiguous (DeepSpeed's ZeRO flattens and broadcasts
parameters as contiguous buffers; a K-contiguous ``w_in`` failed there), so it runs "n.k".
An explicit "FWD.DGRAD" makes one transposed copy of a weight for each GEMM that needs the other
layout (counted in the timings). Measured on an H100
(bf16, 8 groups of 4096 rows, ``bench moe --gemm-layouts``): the forward gate|up GEMM
(32768, 2048) x (8, 2048, 11264) takes 2.186 ms with ``k`` against 2.259 with ``n``; its dgrad
2.083 with ``n`` against 2.099 with ``k``; the down projection's GEMMs take the same time either
way (a K-contiguous w_in would save about 0.09 ms of a 11.8 ms MoE fwd+bwd).
The wgrad operands stay as they are (a = x^T view, column-major; b = dh row-major): the only
2D x 2D layout whose per-group row counts need no 16-byte alignment (torch asserts otherwise).
"""
from __future__ import annotations

import math

import torch

from ..activations.swiglu import swiglu_bwd, swiglu_fwd

LAYOUTS = ("auto", "n.k", "k.k", "n.n", "k.n")
DEFAULT_LAYOUT = "auto"
GEMMS = ("torch", "loop")


def parse_layout(layout: str) -> tuple[str, str] | None:
    """("FWD", "DGRAD") codes of an explicit layout; None for "auto" (see ``layout_codes``)."""
    if layout not in LAYOUTS:
        raise ValueError(f"grouped_mlp layout must be one of {'|'.join(LAYOUTS)}, got {layout!r}")
    if layout == "auto":
        return None
    fwd, dgrad = layout.split(".")
    return fwd, dgrad


def k_major(w: torch.Tensor) -> bool:
    """Whether a (G, K, N) weight is stored K-contiguous (a transposed view of (G, N, K))."""
    return w.stride(-2) == 1 and w.stride(-1) != 1


def layout_codes(layout: str, w: torch.Tensor) -> tuple[str, str]:
    """(forward, dgrad) operand codes for weight ``w`` under ``layout``: "auto" takes the stored
    layout for both (no copy), else the explicit codes."""
    codes = parse_layout(layout)
    if codes is not None:
        return codes
    return ("k", "n") if k_major(w) else ("n", "k")


def as_layout(b: torch.Tensor, code: str) -> torch.Tensor:
    """b (G, K, N) with the same values, N-contiguous (``n``) or K-contiguous (``k``)."""
    if code == "n":
        return b if b.stride(-1) == 1 else b.contiguous()
    if b.stride(-2) == 1:
        return b
    return b.transpose(-2, -1).contiguous().transpose(-2, -1)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, host_counts=None) -> torch.Tensor:
    """(M, N): rows of a (M, K) in groups ending at offs (G,) int32, group g times b[g] (K, N).
    ``host_counts`` (list) selects one ``torch.mm`` per group (cuBLAS on CUDA) writing straight
    into the output rows; else torch._grouped_mm."""
    if host_counts is None:
        return torch._grouped_mm(a, b, offs=offs)
    out = a.new_empty(a.shape[0], b.shape[-1])
    start = 0
    for g, c in enumerate(host_counts):
        if c:
            torch.mm(a[start:start + c], b[g], out=out[start:start + c])
        start += c
    return out


def gmm_wgrad(a_t: torch.Tensor, g: torch.Tensor, offs: torch.Tensor, host_counts=None) -> torch.Tensor:
    """(G, K, N): out[e] = a_t[:, rows of e] @ g[rows of e], a_t (K, M), g (M, N); 0 for an
    empty group."""
    if host_counts is None:
        return torch._grouped_mm(a_t, g, offs=offs)
    out = g.new_empty(len(host_counts), a_t.shape[0], g.shape[-1])
    start = 0
    for e, c in enumerate(host_counts):
        if c:
            torch.mm(a_t[:, start:start + c], g[start:start + c], out=out[e])
        else:
            out[e].zero_()
        start += c
    return out


_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _act_fwd(h, activation, act_impl):
    if activation == "swiglu":
        return swiglu_fwd(h, act_impl)
    return torch.nn.functional.gelu(h)


def _act_bwd(h, da, activation, act_impl):
    if activation == "swiglu":
        return swiglu_bwd(h, da, act_impl)
    x = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h
    cdf = 0.5 * (1.0 + torch.erf(x * _SQRT_HALF))
    pdf = torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return (da.to(x.dtype) * (cdf + x * pdf)).to(h.dtype)


def _wgrad_like(w, a, g, offs, host):
    """The gradient of weight ``w`` (G, K, N) for rows a (M, K) and g (M, N), with w's strides:
    a^T g per group, or (g^T a)^T when w is stored K-contiguous."""
    if k_major(w):
        return gmm_wgrad(g.t(), a, offs, host).transpose(-2, -1)
    return gmm_wgrad(a.t(), g, offs, host)


class _GroupedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_in, w_out, counts, activation, act_impl, layout, gemm):
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        host = counts.tolist() if gemm == "loop" else None
        x = _rows(x)
        h = gmm(x, as_layout(w_in, layout_codes(layout, w_in)[0]), offs, host)
        a = _act_fwd(h, activation, act_impl)
        y = gmm(a, as_layout(w_out, layout_codes(layout, w_out)[0]), offs, host)
        ctx.save_for_backward(x, w_in, w_out, h, a, offs)
        ctx.cfg = (activation, act_impl, layout, host)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_in, w_out, h, a, offs = ctx.saved_tensors
        activation, act_impl, layout, host = ctx.cfg
        need_x, need_win, need_wout = ctx.needs_input_grad[:3]
        dy = _rows(dy)
        da = gmm(dy, as_layout(w_out.transpose(-2, -1), layout_codes(layout, w_out)[1]), offs, host)
        dh = _act_bwd(h, da, activation, act_impl)
        del da
        g_wout = _wgrad_like(w_out, a, dy, offs, host) if need_wout else None
        g_x = (gmm(dh, as_layout(w_in.transpose(-2, -1), layout_codes(layout, w_in)[1]), offs, host)
               if need_x else None)
        g_win = _wgrad_like(w_in, x, dh, offs, host) if need_win else None
        return g_x, g_win, g_wout, None, None, None, None, None


def grouped_mlp_supported(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> bool:
    """Whether the ``torch`` GEMMs can run: CUDA bf16 (the CUTLASS path), ``torch._grouped_mm``
    present, row strides 16-byte aligned."""
    if not (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")):
        return False
    if w_in.dtype != x.dtype or w_out.dtype != x.dtype:
        return False
    align = 16 // x.element_size()
    return all(s % align == 0 for s in (x.shape[-1], w_in.shape[-1], w_out.shape[-2], w_out.shape[-1]))


def grouped_mlp(x: torch.Tensor, counts: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor,
                activation: str = "swiglu", act_impl: str = "auto", layout: str = DEFAULT_LAYOUT,
                gemm: str = "torch") -> torch.Tensor:
    """y (M, N) of the module docstring; counts (G,) int64 rows per group (sum = M).
    act_impl (SwiGLU only): auto|torch|triton (``kernels.swiglu``); layout: one of ``LAYOUTS``;
    gemm: torch|loop."""
    if activation not in ("swiglu", "gelu"):
        raise ValueError(f"grouped_mlp activation must be swiglu or gelu, got {activation!r}")
    if gemm not in GEMMS:
        raise ValueError(f"grouped_mlp gemm must be one of {'|'.join(GEMMS)}, got {gemm!r}")
    parse_layout(layout)
    return _GroupedMLP.apply(x, w_in, w_out, counts, activation, act_impl, layout, gemm)
