"""Plain PyTorch reference of the causal depthwise conv1d used by Mamba blocks.

Layout is channel-last: x (batch, seqlen, dim), weight (dim, width), bias (dim,).
With ``xc`` = the previous ``width - 1`` inputs (``initial_state``, zeros at the start of a
sequence) followed by ``x`` along time,

    y[b, t, c] = bias[c] + sum_{k=0}^{width-1} weight[c, k] * xc[b, t + k, c]

so ``weight[:, -1]`` multiplies the current token (the same as ``F.conv1d`` with
``padding=width-1`` on the (b, d, l) transpose, keeping the first ``seqlen`` outputs), then
``y = silu(y)`` when ``activation == "silu"``. The conv state (batch, width-1, dim) holds the
last ``width - 1`` inputs, oldest first.

Packed documents: with ``seq_idx`` (batch, seqlen) integer, non-decreasing along each row, a tap
that would read a token of an earlier document reads zero: ``xc[b, t + k]`` counts only when its
token has ``seq_idx[b, t]``, the ``initial_state`` positions counting as the first token's
document (the initial state reaches the first document only). The final state is then the last
``width - 1`` inputs with those before the last document's start taken as zero, so decoding
from it continues the last document.

Arithmetic runs in float32 (float64 when any input is float64); outputs have x's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._utils import check_causal_conv1d_args, check_causal_conv1d_update_args, compute_dtype

__all__ = ["causal_conv1d_ref", "causal_conv1d_update_ref"]


def causal_conv1d_ref(x, weight, bias=None, activation=None, initial_state=None,
                      return_final_state=False, seq_idx=None):
    """Causal depthwise conv1d over time. Returns y (b, l, d) or (y, final_state (b, w-1, d)).

    ``initial_state`` (b, w-1, d): the w-1 inputs before ``x[:, 0]`` (None: zeros).
    ``final_state``: the last w-1 inputs of (initial_state, x), in x's dtype.
    ``seq_idx`` (b, l) integer: packed documents (module docstring).
    Differentiable with respect to x, weight, bias and initial_state.
    """
    b, l, d, w = check_causal_conv1d_args("causal_conv1d_ref", x, weight, bias, activation,
                                          initial_state, seq_idx)
    silu = activation in ("silu", "swish")
    ct = compute_dtype(x, weight, bias, initial_state)
    prev = x.new_zeros(b, w - 1, d) if initial_state is None else initial_state
    xf = torch.cat([prev.to(ct), x.to(ct)], dim=1)  # xc: (b, l + w - 1, d)
    wf = weight.to(ct)
    sq = None
    if seq_idx is not None and l > 0:
        # the document of every xc position: the state's positions belong to the first token's
        sq = torch.cat([seq_idx[:, :1].expand(b, w - 1), seq_idx], dim=1)  # (b, l + w - 1)
    y = xf.new_zeros(b, l, d)
    for k in range(w):
        tap = xf[:, k:k + l, :]
        if sq is not None:  # only inputs of the output token's own document
            tap = torch.where((sq[:, k:k + l] == seq_idx)[:, :, None], tap, 0.0)
        y = y + tap * wf[:, k]
    if bias is not None:
        y = y + bias.to(ct)
    if silu:
        y = F.silu(y)
    y = y.to(x.dtype)
    if return_final_state:
        last = xf[:, xf.shape[1] - (w - 1):, :]
        if sq is not None:  # inputs before the last document's start count as zero
            keep = sq[:, sq.shape[1] - (w - 1):] == seq_idx[:, -1:]
            last = torch.where(keep[:, :, None], last, 0.0)
        return y, last.to(x.dtype)
    return y


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation=None):
    """One decoding step: x (b, d) is the new token, conv_state (b, w-1, d) the previous inputs.

    Returns (y (b, d) in x's dtype, new_conv_state (b, w-1, d) in conv_state's dtype), where
    ``new_conv_state`` is conv_state shifted by one with x appended. Functional: conv_state is not
    modified. Equals the last position of ``causal_conv1d_ref`` with ``initial_state=conv_state``.
    """
    b, d, w = check_causal_conv1d_update_args("causal_conv1d_update_ref", x, conv_state, weight,
                                              bias, activation)
    silu = activation in ("silu", "swish")
    ct = compute_dtype(x, conv_state, weight, bias)
    xc = torch.cat([conv_state.to(ct), x.to(ct)[:, None, :]], dim=1)  # (b, w, d)
    y = (xc * weight.to(ct).t()).sum(dim=1)
    if bias is not None:
        y = y + bias.to(ct)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype), xc[:, 1:, :].to(conv_state.dtype)
