"""Fused LM head + cross-entropy, chunked over tokens: the (N, V) float32 logits never exist.

With h (N, d) and weight (V, d) in the compute dtype ct (h's dtype, or autocast's), labels (N,)
and n = the number of labels that are not ``ignore_index``:

    forward, for each chunk of C tokens:
        logits = h_c @ weight^T                      (C, V) in ct (fp32 accumulation in the GEMM)
        lse    = logsumexp(float(logits))            (C,) float32, saved for the backward
        loss  += sum over valid rows of lse - float(logits)[row, label]
    loss = loss / n                                  (NaN when n = 0, as F.cross_entropy)

    backward, given the loss's gradient g, recomputing each chunk's logits:
        dlogits = (exp(float(logits) - lse) - onehot(label)) * g / max(n, 1)   (0 on ignored
                                                     rows), taken to ct
        dh_c    = dlogits @ weight                   (C, d), written into its rows of dh
        dweight += dlogits^T @ h_c                   float32 accumulator (V, d)

Saved between forward and backward: h and weight in ct (the same tensors autocast would keep for
an unfused LM head), labels, lse (N,) float32. Peak extra memory is one chunk's (C, V) logits
(and their float32 temporaries on the torch path) plus the (V, d) float32 dweight accumulator.
The LM head's GEMMs run four times instead of three (the backward recomputes the logits), the
price of not keeping (N, V).

The elementwise work per chunk (logsumexp and target pick forward; softmax minus one-hot,
scaling and the cast backward) runs either as torch ops (``triton=False``: the CPU path; each
op a full pass over (C, V), several in float32) or as one Triton kernel each way
(``triton_ce.py``: one read of the ct logits forward; one read and one in-place write backward).
Why the kernels pay, by byte count (an estimate; the GPU timing is still to be taken): the
torch passes move several times the bytes of the bf16 logits (the float32 copy, exp, scatter,
scale, cast), and at d = 2048 a chunk's GEMM does only about 2 d = 4096 FLOPs per logit
element, so at H100 rates (about 3 TB/s, 800 TFLOP/s) those passes take about as long as the
GEMM; the kernels leave one read (and one write).

Chunk size: ``chunk_size`` tokens, or by default as many as keep one chunk's logits within
``CHUNK_ELEMENTS`` elements (at least 256 tokens): 2560 tokens at V = 50k. Larger chunks mean
fewer passes over the (V, d) dweight accumulator (one read-modify-write per chunk).
"""
from __future__ import annotations

import torch

CHUNK_ELEMENTS = 2 ** 27  # logits elements per chunk by default (bf16: 256 MiB)
MIN_CHUNK = 256


def auto_chunk_size(n_tokens: int, vocab: int) -> int:
    """Tokens per chunk: the most that keep C * V within CHUNK_ELEMENTS, a multiple of 256
    (at least 256), and no more than the tokens there are."""
    c = max(MIN_CHUNK, (CHUNK_ELEMENTS // max(vocab, 1)) // MIN_CHUNK * MIN_CHUNK)
    return max(1, min(c, n_tokens))


def _chunks(n: int, c: int):
    return [(s, min(s + c, n)) for s in range(0, n, c)]


# ------------------------------------------------------------ the elementwise parts, torch ops
def _lse_loss_torch(logits, labels, ignore_index):
    """(lse (C,) fp32, per-row loss (C,) fp32, 0 on ignored rows) of a chunk's logits."""
    lf = logits.float()
    lse = torch.logsumexp(lf, dim=-1)
    valid = labels != ignore_index
    tgt = lf.gather(1, torch.where(valid, labels, 0)[:, None])[:, 0]
    return lse, torch.where(valid, lse - tgt, 0.0)


def _dlogits_torch(logits, labels, lse, scale, ignore_index):
    """(softmax - onehot) * scale on valid rows, 0 on ignored ones, in logits' dtype."""
    valid = labels != ignore_index
    p = (logits.float() - lse[:, None]).exp_()
    p.scatter_add_(1, torch.where(valid, labels, 0)[:, None], -valid.float()[:, None])
    p.mul_(torch.where(valid, scale, 0.0)[:, None])
    return p.to(logits.dtype)


# --------------------------------------------------------------------- forward and backward
def lce_forward(h, weight, labels, ignore_index, chunk, triton):
    """(loss () fp32, lse (N,) fp32, n_valid () int64) for h (N, d), weight (V, d) of one dtype
    and labels (N,); ``triton``: the Triton elementwise kernels (``triton_ce.py``)."""
    n = h.shape[0]
    lse = torch.empty(n, dtype=torch.float32, device=h.device)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    if triton:
        from .triton_ce import lse_loss_triton as lse_loss
    else:
        lse_loss = _lse_loss_torch
    for s, e in _chunks(n, chunk):
        logits = torch.mm(h[s:e], weight.t())
        lse_c, loss_c = lse_loss(logits, labels[s:e], ignore_index)
        lse[s:e] = lse_c
        total += loss_c.sum()
        del logits
    n_valid = (labels != ignore_index).sum()
    return total / n_valid, lse, n_valid


def lce_backward(grad, h, weight, labels, lse, n_valid, ignore_index, chunk, triton,
                 need_h=True, need_w=True):
    """(dh (N, d) in h's dtype or None, dweight (V, d) float32 or None) for the loss gradient
    ``grad`` (a 0-d tensor); the arguments are ``lce_forward``'s."""
    n, d = h.shape
    scale = grad.float() / n_valid.clamp(min=1)
    dh = torch.empty_like(h) if need_h else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
    if triton:
        from .triton_ce import dlogits_triton as dlogits
    else:
        dlogits = _dlogits_torch
    for s, e in _chunks(n, chunk):
        hc = h[s:e]
        logits = torch.mm(hc, weight.t())
        g = dlogits(logits, labels[s:e], lse[s:e], scale, ignore_index)
        del logits
        if need_h:
            torch.mm(g, weight, out=dh[s:e])
        if need_w:
            if g.dtype == torch.float32:
                dw.addmm_(g.t(), hc)
            else:  # a low-precision GEMM, accumulated across chunks in float32
                dw += torch.mm(g.t(), hc)
    return dh, dw


class _LinearCrossEntropy(torch.autograd.Function):
    """The eager path: ``lce_forward`` / ``lce_backward`` around the casts to ct."""

    @staticmethod
    def forward(ctx, h, weight, labels, ignore_index, chunk, triton, ct):
        d = h.shape[-1]
        with torch.autocast(h.device.type, enabled=False):
            hc = h.reshape(-1, d).to(ct)
            wc = weight.to(ct)
            lab = labels.reshape(-1)
            loss, lse, n_valid = lce_forward(hc, wc, lab, ignore_index, chunk, triton)
        ctx.save_for_backward(hc, wc, lab, lse, n_valid)
        ctx.cfg = (h.shape, h.dtype, weight.dtype, ignore_index, chunk, triton)
        return loss

    @staticmethod
    def backward(ctx, grad):
        hc, wc, lab, lse, n_valid = ctx.saved_tensors
        shape, h_dtype, w_dtype, ignore_index, chunk, triton = ctx.cfg
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(hc.device.type, enabled=False):
            dh, dw = lce_backward(grad, hc, wc, lab, lse, n_valid, ignore_index, chunk, triton,
                                  need_h, need_w)
        return (dh.to(h_dtype).view(shape) if dh is not None else None,
                dw.to(w_dtype) if dw is not None else None, None, None, None, None, None)


def linear_cross_entropy_chunked(h, weight, labels, ignore_index, chunk, triton, ct):
    """The eager autograd op (arguments checked by ``linear_cross_entropy``)."""
    return _LinearCrossEntropy.apply(h, weight, labels, ignore_index, chunk, triton, ct)


__all__ = ["CHUNK_ELEMENTS", "auto_chunk_size", "lce_backward", "lce_forward",
           "linear_cross_entropy_chunked"]
