"""Causal depthwise conv1d over time (Mamba's short convolution) and its one-token step.

    y = causal_conv1d(x, weight, bias=None, activation=None, initial_state=None,
                      return_final_state=False, seq_idx=None, impl="auto")
    y, new_state = causal_conv1d_update(x, conv_state, weight, bias=None, activation=None,
                                        impl="auto")

Files: ``ref.py`` (the PyTorch reference, also the CPU path), ``triton_conv.py`` (the Triton
forward, backward and update kernels). ``impl`` is resolved by ``kernels.backend.resolve``.
"""
from __future__ import annotations

from .._ops import profile_scope
from .._utils import check_causal_conv1d_args, check_causal_conv1d_update_args
from ..backend import resolve
from .ref import causal_conv1d_ref, causal_conv1d_update_ref


def causal_conv1d(x, weight, bias=None, activation=None, initial_state=None,
                  return_final_state=False, seq_idx=None, impl="auto"):
    """y[:, t, c] = act(bias[c] + sum_k weight[c, k] * x[:, t - (w-1) + k, c]), with the w-1
    inputs before t=0 taken from ``initial_state`` (b, w-1, d) or zeros. x (b, l, d), weight
    (d, w), bias (d,), activation None|"silu". Returns y (b, l, d), or (y, final_state
    (b, w-1, d)) = the last w-1 inputs.

    Packed documents: ``seq_idx`` (b, l) int32 or int64, non-decreasing along each row (the
    caller's promise). A tap that would reach a token of an earlier document reads zero, and
    ``initial_state`` is seen by the first document only; the final state is the last w-1
    inputs with those before the last document's start taken as zero. seq_idx gets no
    gradient."""
    check_causal_conv1d_args("causal_conv1d", x, weight, bias, activation, initial_state,
                             seq_idx)
    if resolve("causal_conv1d", impl, x) == "triton":
        from .triton_conv import causal_conv1d_triton as fn
    else:
        fn = causal_conv1d_ref
    with profile_scope("causal_conv1d"):
        return fn(x, weight, bias=bias, activation=activation, initial_state=initial_state,
                  return_final_state=return_final_state, seq_idx=seq_idx)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, impl="auto"):
    """One decoding step of ``causal_conv1d``: x (b, d) one token, conv_state (b, w-1, d) the
    previous w-1 inputs. Returns (y (b, d), new_conv_state (b, w-1, d)); conv_state is not
    modified."""
    check_causal_conv1d_update_args("causal_conv1d_update", x, conv_state, weight, bias, activation)
    if resolve("causal_conv1d_update", impl, x) == "triton":
        from .triton_conv import causal_conv1d_update_triton as fn
    else:
        fn = causal_conv1d_update_ref
    return fn(x, conv_state, weight, bias=bias, activation=activation)


__all__ = ["causal_conv1d", "causal_conv1d_ref", "causal_conv1d_update", "causal_conv1d_update_ref"]
