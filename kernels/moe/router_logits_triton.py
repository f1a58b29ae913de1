"""Triton kernels of the MoE router logits in fp32 straight from half-precision tokens.

    logits (N, E) fp32 = x.float() @ W^T,   x (N, D) bf16/fp16/fp32, W (E, D) fp32
    backward:  dx (N, D) in x's dtype = dlogits @ W;   dW (E, D) fp32 = dlogits^T @ x.float()

The same fp32 math as ``F.linear(x.float(), W)`` (products and sums in fp32: ``tl.dot`` with
input_precision "ieee", so no TF32; for bf16 x the forward splits W into three bf16 parts whose
products with x are exact, three tensor-core dots with fp32 accumulation), without materialising
the fp32 copy of x (N, D) in the forward, its gradient in fp32 and the cast back in the
backward. dW is summed over token chunks (``N_SPLIT`` partial sums, then one torch sum). ``router_logits.py`` holds the reference
and the autograd op.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._ops import custom_op
from ..backend import interpreting as triton_interpreting


@triton.jit
def _bf16_parts(v):
    """fp32 v = v1 + v2 + v3 in bf16 (8 + 8 + 8 significand bits: v's 24, to within 2^-25
    relative). A product of one part with a bf16 operand is exact in an fp32 accumulator, so
    three tensor-core dots with fp32 accumulation give fp32 math."""
    v1 = v.to(tl.bfloat16)
    r = v - v1.to(tl.float32)
    v2 = r.to(tl.bfloat16)
    v3 = (r - v2.to(tl.float32)).to(tl.bfloat16)
    return v1, v2, v3


@triton.jit
def _exact_dot(a, b, acc, BF16_DOT: tl.constexpr):
    """acc + a @ b for bf16 a, b: a tensor-core dot; under Triton's interpreter (BF16_DOT False:
    bf16 dots are wrong there) the same exact products in fp32."""
    if BF16_DOT:
        return tl.dot(a, b, acc)
    return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")


@triton.jit
def _logits_fwd_kernel(x_ptr, w_ptr, out_ptr, N, D, E, stride_x, stride_w, stride_o,
                       BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
                       SPLIT_W: tl.constexpr, BF16_DOT: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    es = tl.arange(0, BLOCK_E)
    acc = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :],
                    mask=(rows[:, None] < N) & (cols[None, :] < D), other=0.0)
        w = tl.load(w_ptr + es[None, :] * stride_w + cols[:, None],
                    mask=(es[None, :] < E) & (cols[:, None] < D), other=0.0).to(tl.float32)
        if SPLIT_W:  # bf16 x: W in three bf16 parts (the ieee FMA dot ran at ~10x the memory time)
            w1, w2, w3 = _bf16_parts(w)
            acc = _exact_dot(x, w1, acc, BF16_DOT)
            acc = _exact_dot(x, w2, acc, BF16_DOT)
            acc = _exact_dot(x, w3, acc, BF16_DOT)
        else:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
    tl.store(out_ptr + rows[:, None] * stride_o + es[None, :], acc,
             mask=(rows[:, None] < N) & (es[None, :] < E))


@triton.jit
def _logits_dx_kernel(g_ptr, w_ptr, dx_ptr, a_ptr, N, D, E, stride_g, stride_w, stride_dx, stride_a,
                      BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
                      ADD: tl.constexpr):
    """dx = g @ W (+ a, the gradient x got from its other consumers, when ADD: summed in fp32
    and rounded once, instead of a separate add kernel over (N, D))."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    es = tl.arange(0, BLOCK_E)
    g = tl.load(g_ptr + rows[:, None] * stride_g + es[None, :],
                mask=(rows[:, None] < N) & (es[None, :] < E), other=0.0).to(tl.float32)
    w = tl.load(w_ptr + es[:, None] * stride_w + cols[None, :],
                mask=(es[:, None] < E) & (cols[None, :] < D), other=0.0).to(tl.float32)
    dx = tl.dot(g, w, input_precision="ieee")
    if ADD:
        dx += tl.load(a_ptr + rows[:, None] * stride_a + cols[None, :],
                      mask=(rows[:, None] < N) & (cols[None, :] < D), other=0.0).to(tl.float32)
    tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=(rows[:, None] < N) & (cols[None, :] < D))


@triton.jit
def _logits_dw_kernel(g_ptr, x_ptr, part_ptr, N, D, E, rows_per_split, stride_g, stride_x,
                      BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
                      SPLIT_G: tl.constexpr, BF16_DOT: tl.constexpr):
    """Partial dW = g^T @ x over one split of the rows. SPLIT_G (bf16 x): g in three bf16 parts
    (``_bf16_parts``), as W in the forward (the ieee fp32 dot ran about 2.5x the time of reading
    x, H100)."""
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(1)
    es = tl.arange(0, BLOCK_E)
    acc = tl.zeros([BLOCK_E, BLOCK_D], dtype=tl.float32)
    start = split.to(tl.int64) * rows_per_split
    for n0 in range(0, rows_per_split, BLOCK_N):
        rows = start + n0 + tl.arange(0, BLOCK_N)
        rmask = (rows < N) & (n0 + tl.arange(0, BLOCK_N) < rows_per_split)
        gt = tl.load(g_ptr + rows[None, :] * stride_g + es[:, None],
                     mask=rmask[None, :] & (es[:, None] < E), other=0.0).to(tl.float32)
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :],
                    mask=rmask[:, None] & (cols[None, :] < D), other=0.0)
        if SPLIT_G:
            g1, g2, g3 = _bf16_parts(gt)
            acc = _exact_dot(g1, x, acc, BF16_DOT)
            acc = _exact_dot(g2, x, acc, BF16_DOT)
            acc = _exact_dot(g3, x, acc, BF16_DOT)
        else:
            acc += tl.dot(gt, x.to(tl.float32), input_precision="ieee")
    out = part_ptr + split.to(tl.int64) * E * D + es[:, None] * D + cols[None, :]
    tl.store(out, acc, mask=(es[:, None] < E) & (cols[None, :] < D))


# dx and dW tiles: 32 x 128 (H100, d_model 2048, 16384 tokens, CUDA graphs: dx with the
# add 55.7 us against 59.6 for 32 x 64 (a copy of the same bytes 47.3); dW with its split sum
# 32.5 against 42.1; 64- and 128-row tiles were slower)
BLOCK_N, BLOCK_D = 32, 128
FWD_BLOCK_N, FWD_BLOCK_D = 64, 128  # the bf16 split forward (tensor-core dots)
N_SPLIT = 32


def _block_e(e: int) -> int:
    return max(16, triton.next_power_of_2(e))


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def router_logits_fwd_triton(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """logits (N, E) fp32 of x (N, D), w (E, D) fp32."""
    x, w = _rows(x), _rows(w)
    n, d = x.shape
    e = w.shape[0]
    out = torch.empty(n, e, dtype=torch.float32, device=x.device)
    if n == 0:
        return out
    split = x.dtype == torch.bfloat16
    bn, bd = (FWD_BLOCK_N, FWD_BLOCK_D) if split else (BLOCK_N, BLOCK_D)
    _logits_fwd_kernel[(triton.cdiv(n, bn),)](x, w, out, n, d, e, x.stride(0), w.stride(0), out.stride(0),
                                             BLOCK_N=bn, BLOCK_E=_block_e(e), BLOCK_D=bd, SPLIT_W=split,
                                             BF16_DOT=not triton_interpreting())
    return out


def router_logits_bwd_triton(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, need_dx: bool = True,
                             need_dw: bool = True, dx_add: torch.Tensor | None = None):
    """(dx in x's dtype or None, dw (E, D) fp32 or None) for dlogits g (N, E) fp32; ``dx_add``
    (N, D), when given, is added into dx inside the kernel."""
    g, x, w = _rows(g.float()), _rows(x), _rows(w)
    n, d = x.shape
    e = w.shape[0]
    be = _block_e(e)
    dx = dw = None
    if need_dx:
        dx = torch.empty(n, d, dtype=x.dtype, device=x.device)
        a = _rows(dx_add) if dx_add is not None else dx
        if n:
            _logits_dx_kernel[(triton.cdiv(n, BLOCK_N), triton.cdiv(d, BLOCK_D))](
                g, w, dx, a, n, d, e, g.stride(0), w.stride(0), dx.stride(0), a.stride(0),
                BLOCK_N=BLOCK_N, BLOCK_E=be, BLOCK_D=BLOCK_D, ADD=dx_add is not None)
    if need_dw:
        splits = max(1, min(N_SPLIT, triton.cdiv(n, BLOCK_N)))
        rows_per_split = triton.cdiv(max(n, 1), splits)
        part = torch.empty(splits, e, d, dtype=torch.float32, device=x.device)
        _logits_dw_kernel[(triton.cdiv(d, BLOCK_D), splits)](
            g, x, part, n, d, e, rows_per_split, g.stride(0), x.stride(0),
            BLOCK_N=BLOCK_N, BLOCK_E=be, BLOCK_D=BLOCK_D, SPLIT_G=x.dtype == torch.bfloat16,
            BF16_DOT=not triton_interpreting())
        dw = part.sum(0)
    return dx, dw


# ------------------------------------------------------------------ compiled: the custom ops
# ``hybridseq::router_logits_fwd`` (with its autograd) and ``router_logits_bwd``
# (``kernels._ops``). Under ``torch.compile`` the router reads x itself (no tap view: a custom op
# cannot return an alias of its input), so autograd adds x's two gradients.
@custom_op("router_logits_fwd")
def router_logits_fwd_op(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return router_logits_fwd_triton(x, w)


@router_logits_fwd_op.register_fake
def _(x, w):
    return x.new_empty((x.shape[0], w.shape[0]), dtype=torch.float32)


@custom_op("router_logits_bwd")
def router_logits_bwd_op(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, need_dx: bool,
                         need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw); an empty stand-in for one not asked for."""
    dx, dw = router_logits_bwd_triton(g, x, w, need_dx, need_dw)
    e = x.new_empty(0)
    return (dx if dx is not None else e), (dw if dw is not None else e.float())


@router_logits_bwd_op.register_fake
def _(g, x, w, need_dx, need_dw):
    e = x.new_empty(0)
    return (x.new_empty(x.shape) if need_dx else e,
            w.new_empty(w.shape, dtype=torch.float32) if need_dw else e.float())


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, g):
    x, w = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dw = router_logits_bwd_op(g, x, w, need_dx, need_dw)
    return (dx if need_dx else None), (dw.to(w.dtype) if need_dw else None)


router_logits_fwd_op.register_autograd(_backward, setup_context=_setup)
