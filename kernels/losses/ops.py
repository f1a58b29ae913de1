"""The fused LM-head cross-entropy as ``torch.library`` custom ops (``kernels._ops``): what
``torch.compile`` traces, one graph node each way, for either elementwise path (torch or
Triton, ``triton``). Eager calls use ``chunked._LinearCrossEntropy`` instead; both call
``chunked.lce_forward`` / ``lce_backward``.

    hybridseq::linear_cross_entropy_fwd(h, weight, labels, ...) -> (loss, lse, n_valid)
    hybridseq::linear_cross_entropy_bwd(grad, h, weight, labels, lse, n_valid, ...) -> (dh, dw)

h and weight arrive already in the compute dtype (the entry point casts them, traced), so the
ops need no autocast handling; inside, autocast is off.
"""
from __future__ import annotations

import torch

from .._ops import custom_op
from .chunked import lce_backward, lce_forward


@custom_op("linear_cross_entropy_fwd")
def _fwd_op(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int,
            chunk: int, triton: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.autocast(h.device.type, enabled=False):
        return lce_forward(h, weight, labels, ignore_index, chunk, triton)


@_fwd_op.register_fake
def _(h, weight, labels, ignore_index, chunk, triton):
    return (h.new_empty((), dtype=torch.float32), h.new_empty((h.shape[0],), dtype=torch.float32),
            h.new_empty((), dtype=torch.int64))


@custom_op("linear_cross_entropy_bwd")
def _bwd_op(grad: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
            lse: torch.Tensor, n_valid: torch.Tensor, ignore_index: int, chunk: int, triton: bool,
            need_h: bool, need_w: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh in h's dtype, dweight float32); an empty stand-in for a gradient not asked for."""
    with torch.autocast(h.device.type, enabled=False):
        dh, dw = lce_backward(grad, h, weight, labels, lse, n_valid, ignore_index, chunk, triton,
                              need_h, need_w)
    return (dh if dh is not None else h.new_empty(0)), (dw if dw is not None else h.new_empty(0))


@_bwd_op.register_fake
def _(grad, h, weight, labels, lse, n_valid, ignore_index, chunk, triton, need_h, need_w):
    dh = torch.empty_like(h) if need_h else h.new_empty(0)
    dw = weight.new_empty(weight.shape, dtype=torch.float32) if need_w else h.new_empty(0)
    return dh, dw


def _setup(ctx, inputs, output):
    h, weight, labels, ignore_index, chunk, triton = inputs
    _, lse, n_valid = output
    ctx.save_for_backward(h, weight, labels, lse, n_valid)
    ctx.cfg = (ignore_index, chunk, triton)


def _backward(ctx, grad, _dlse, _dn):
    h, weight, labels, lse, n_valid = ctx.saved_tensors
    ignore_index, chunk, triton = ctx.cfg
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dh, dw = _bwd_op(grad, h, weight, labels, lse, n_valid, ignore_index, chunk, triton,
                     need_h, need_w)
    return (dh if need_h else None), (dw.to(weight.dtype) if need_w else None), \
        None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup)


def linear_cross_entropy_op(h, weight, labels, ignore_index, chunk, triton, ct):
    """The loss through the custom ops; the casts to ct and the reshapes stay outside (traced),
    so their backward casts dh and dweight back to the inputs' dtypes."""
    d = h.shape[-1]
    with torch.autocast(h.device.type, enabled=False):
        hc = h.reshape(-1, d).to(ct)
        wc = weight.to(ct)
    return _fwd_op(hc, wc, labels.reshape(-1), int(ignore_index), int(chunk), bool(triton))[0]
