"""Triton kernels for the MoE un-permutation (and the permutation's backward), one pass each.

With K slots per token and ``idx`` (N*K,) the row of each slot in the permuted layout:

- ``gather_sum``:  out[n] = sum_j w[n*K+j] * src[idx[n*K+j]]    (w optional: all ones)
  = the un-permute forward (src = expert outputs, idx = inv), the permute backward
  (src = grad of the permuted rows, no w) and, with K = 1 and no w, the permutation itself
  (a row gather, rows copied in their own dtype).
- ``scatter_scale_dot`` (un-permute backward), for g = grad of out:
      grad_src[idx[n*K+j]] = w[n*K+j] * g[n]          (every row of src written once)
      grad_w[n*K+j]      = <g[n], src[idx[n*K+j]]>  (fp32)

One program per token (and, for ``gather_sum``, per block of columns); accumulation in fp32.
Compared with PyTorch (an index_select materialising (N, K, d), a product, a sum, and their
backwards), each pass reads and writes every row once. Strides: rows may be strided, columns must
be contiguous. ``permute``/``unpermute`` in ``permute.py`` choose these kernels on CUDA.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._ops import custom_op


@triton.jit
def _gather_sum_kernel(src_ptr, idx_ptr, w_ptr, out_ptr, D, stride_src, stride_out,
                       K: tl.constexpr, HAS_W: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    if K == 1 and not HAS_W:  # a plain row gather (the permutation): copied as is, any dtype
        r = tl.load(idx_ptr + n).to(tl.int64)
        tl.store(out_ptr + n * stride_out + cols, tl.load(src_ptr + r * stride_src + cols, mask=mask),
                 mask=mask)
    else:
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j in tl.static_range(K):
            r = tl.load(idx_ptr + n * K + j).to(tl.int64)
            v = tl.load(src_ptr + r * stride_src + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_W:
                v = v * tl.load(w_ptr + n * K + j).to(tl.float32)
            acc += v
        tl.store(out_ptr + n * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scatter_scale_dot_kernel(g_ptr, src_ptr, idx_ptr, w_ptr, gsrc_ptr, gw_ptr, D,
                              stride_g, stride_src, stride_gsrc,
                              K: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    for j in tl.static_range(K):
        r = tl.load(idx_ptr + n * K + j).to(tl.int64)
        wj = tl.load(w_ptr + n * K + j).to(tl.float32)
        dot = tl.zeros([BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = cols < D
            g = tl.load(g_ptr + n * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
            s = tl.load(src_ptr + r * stride_src + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(gsrc_ptr + r * stride_gsrc + cols, (g * wj).to(gsrc_ptr.dtype.element_ty), mask=mask)
            dot += g * s
        tl.store(gw_ptr + n * K + j, tl.sum(dot, axis=0))


def _block(d: int) -> int:
    return min(1024, triton.next_power_of_2(max(d, 16)))


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def gather_sum(src: torch.Tensor, idx: torch.Tensor, k: int, w: torch.Tensor | None = None) -> torch.Tensor:
    """out (N, d) in src's dtype, N = idx.numel() // k (see the module docstring)."""
    src = _rows(src)
    idx = idx.contiguous()
    n, d = idx.numel() // k, src.shape[-1]
    out = torch.empty(n, d, dtype=src.dtype, device=src.device)
    if n == 0:
        return out
    bd = _block(d)
    w_arg = w.contiguous() if w is not None else idx
    _gather_sum_kernel[(n, triton.cdiv(d, bd))](src, idx, w_arg, out, d, src.stride(0), out.stride(0),
                                                K=k, HAS_W=w is not None, BLOCK_D=bd)
    return out


def scatter_scale_dot(g: torch.Tensor, src: torch.Tensor, idx: torch.Tensor, w: torch.Tensor):
    """(grad_src like src, grad_w (N*k,) fp32) of out = gather_sum(src, idx, k, w)."""
    g, src = _rows(g), _rows(src)
    idx, w = idx.contiguous(), w.contiguous()
    n = g.shape[0]
    k = idx.numel() // max(n, 1)
    d = src.shape[-1]
    gsrc = torch.empty_like(src)
    gw = torch.empty(idx.numel(), dtype=torch.float32, device=src.device)
    if n == 0:
        return gsrc, gw
    _scatter_scale_dot_kernel[(n,)](g, src, idx, w, gsrc, gw, d, g.stride(0), src.stride(0), gsrc.stride(0),
                                    K=k, BLOCK_D=_block(d))
    return gsrc, gw


# ------------------------------------------------------------------ compiled: the custom ops
# ``hybridseq::moe_permute`` and ``moe_unpermute`` (with their autograd: ``permute.py``'s
# ``_PermuteTriton`` / ``_UnpermuteTriton`` as ops), over ``moe_gather_sum`` and
# ``moe_scatter_scale_dot`` (``kernels._ops``).
@custom_op("moe_gather_sum")
def gather_sum_op(src: torch.Tensor, idx: torch.Tensor, k: int,
                  w: torch.Tensor | None) -> torch.Tensor:
    return gather_sum(src, idx, k, w)


@gather_sum_op.register_fake
def _(src, idx, k, w):
    return src.new_empty((idx.numel() // k, src.shape[-1]))


@custom_op("moe_scatter_scale_dot")
def scatter_scale_dot_op(g: torch.Tensor, src: torch.Tensor, idx: torch.Tensor,
                         w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return scatter_scale_dot(g, src, idx, w)


@scatter_scale_dot_op.register_fake
def _(g, src, idx, w):
    return src.new_empty(src.shape), src.new_empty((idx.numel(),), dtype=torch.float32)


@custom_op("moe_permute")
def permute_op(x: torch.Tensor, src: torch.Tensor, inv: torch.Tensor, k: int) -> torch.Tensor:
    """x_perm = x[src] (one slot per row); backward: grad_x[n] = sum_j grad[inv[n k + j]]."""
    return gather_sum(x, src, 1)


@permute_op.register_fake
def _(x, src, inv, k):
    return x.new_empty((src.numel(), x.shape[-1]))


def _permute_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[2])
    ctx.k = inputs[3]


def _permute_backward(ctx, grad):
    (inv,) = ctx.saved_tensors
    return gather_sum_op(grad, inv, ctx.k, None), None, None, None


permute_op.register_autograd(_permute_backward, setup_context=_permute_setup)


@custom_op("moe_unpermute")
def unpermute_op(y_perm: torch.Tensor, inv: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """y[n] = sum_j weights[n, j] * y_perm[inv[n k + j]]."""
    return gather_sum(y_perm, inv, weights.shape[1], weights.reshape(-1))


@unpermute_op.register_fake
def _(y_perm, inv, weights):
    return y_perm.new_empty((weights.shape[0], y_perm.shape[-1]))


def _unpermute_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _unpermute_backward(ctx, grad):
    y_perm, inv, weights = ctx.saved_tensors
    g_y, g_w = scatter_scale_dot_op(grad, y_perm, inv, weights.reshape(-1))
    return g_y, None, g_w.view(weights.shape).to(weights.dtype)


unpermute_op.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)
