"""Triton kernels of the chunked LM-head cross-entropy (``chunked.py``): the elementwise work on
one chunk's logits (C, V), in one pass each way.

    _lse_loss_kernel   one program per row: an online (running max, rescaled sum) logsumexp
                       over V in blocks of BV, read once in the logits' dtype, float32 math;
                       the target logit read at its column. Writes lse (C,) and the row's
                       loss lse - logit[label] (0 when the label is ``ignore_index``).
    _dlogits_kernel    (row, block of BV columns) per program: (exp(logit - lse) - [col ==
                       label]) * scale, 0 on ignored rows, written over the logits in place
                       (their dtype): the gradient the two backward GEMMs read. ``scale`` is
                       a device scalar (g / max(n_valid, 1)): nothing waits on the host.

Replaces, per chunk, the torch path's float32 copy of the logits, logsumexp's passes, the
gather, the exp, the one-hot scatter, the scaling and the cast back (each a full pass over
(C, V), several in float32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import interpreting

__all__ = ["dlogits_triton", "lse_loss_triton"]

_INTERPRET = interpreting()


@triton.jit
def _lse_loss_kernel(l_ptr, lab_ptr, lse_ptr, loss_ptr, V, stride, ignore_index,
                     BV: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = l_ptr + row * stride
    m = tl.full((BV,), float("-inf"), tl.float32)  # per lane: running max and rescaled sum
    s = tl.zeros((BV,), tl.float32)
    for start in range(0, V, BV):
        cols = start + tl.arange(0, BV)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        # a lane that has seen no finite value yet keeps s = 0: a finite stand-in for its max
        # keeps -inf - -inf (NaN) out of the exponents
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
        s = s * tl.exp(m - m_ref) + tl.exp(x - m_ref)
        m = m_new
    mx = tl.max(m, axis=0)
    total = tl.sum(tl.where(m > float("-inf"), s * tl.exp(m - mx), 0.0), axis=0)
    lse = mx + tl.log(total)
    lab = tl.load(lab_ptr + row)
    valid = lab != ignore_index
    tgt = tl.load(base + tl.where(valid, lab, 0)).to(tl.float32)
    tl.store(lse_ptr + row, lse)
    tl.store(loss_ptr + row, tl.where(valid, lse - tgt, 0.0))


@triton.jit
def _dlogits_kernel(l_ptr, lab_ptr, lse_ptr, scale_ptr, V, stride, ignore_index,
                    BV: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BV + tl.arange(0, BV)
    mask = cols < V
    base = l_ptr + row * stride
    lab = tl.load(lab_ptr + row)
    scale = tl.where(lab != ignore_index, tl.load(scale_ptr), 0.0)
    lse = tl.load(lse_ptr + row)
    x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
    p = tl.exp(x - lse) - tl.where(cols == lab, 1.0, 0.0)
    tl.store(base + cols, (p * scale).to(l_ptr.dtype.element_ty), mask=mask)


def _block(v: int, cap: int) -> int:
    return min(cap, triton.next_power_of_2(max(v, 16)))


def lse_loss_triton(logits, labels, ignore_index):
    """(lse (C,) fp32, per-row loss (C,) fp32) of logits (C, V) (unit column stride)."""
    c, v = logits.shape
    lse = torch.empty(c, dtype=torch.float32, device=logits.device)
    loss = torch.empty(c, dtype=torch.float32, device=logits.device)
    if c:
        bv = _block(v, 64 if _INTERPRET else 4096)
        _lse_loss_kernel[(c,)](logits, labels, lse, loss, v, logits.stride(0), int(ignore_index),
                               BV=bv, num_warps=1 if _INTERPRET else 8)
    return lse, loss


def dlogits_triton(logits, labels, lse, scale, ignore_index):
    """The chunk's logits (C, V) overwritten with their gradient (``chunked.lce_backward``);
    returns them. ``scale``: a 0-d float32 tensor."""
    c, v = logits.shape
    if c:
        bv = _block(v, 64 if _INTERPRET else 2048)
        _dlogits_kernel[(c, triton.cdiv(v, bv))](
            logits, labels, lse, scale.reshape(1), v, logits.stride(0), int(ignore_index),
            BV=bv, num_warps=1 if _INTERPRET else 4)
    return logits
