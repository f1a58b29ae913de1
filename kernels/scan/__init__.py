"""Mamba-1 selective scan (S6) and its one-token decode step.

    y = selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       initial_state=None, return_final_state=False, seq_idx=None, impl="auto")
    y, new_state = selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                                          dt_softplus=False, impl="auto")

Files: ``ref.py`` (the sequential reference, float64-capable), ``chunked.py`` (the PyTorch
training path on CPU: chunked, vectorised), ``triton_scan.py`` (the autograd op over the Triton
kernels ``triton_fwd.py`` / ``triton_bwd.py`` and their sequence-split carry passes),
``step_ref.py`` / ``step_triton.py`` (one decoding token). ``impl`` is resolved by
``kernels.backend.resolve``.
"""
from __future__ import annotations

from .._ops import profile_scope
from .._utils import check_selective_scan_args, check_selective_state_update_args
from ..backend import resolve
from .chunked import selective_scan_chunked
from .ref import selective_scan_ref
from .step_ref import selective_state_update_ref


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_final_state=False, seq_idx=None, impl="auto"):
    """Selective scan (Mamba-1 S6):

        dt = softplus(delta + delta_bias)  (or delta + delta_bias),
        h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t  (fp32 state, h_{-1} = initial_state or 0),
        y_t = C_t . h_t + D u_t,  y = y * silu(z) when z is given.

    u, delta, z: (b, l, d); B, C: (b, l, n) or (b, l, g, n) with d % g == 0; A: (d, n) fp32;
    D, delta_bias: (d,); initial_state: (b, d, n). Returns y (u's dtype), or (y, h_last (b, d, n)
    fp32) with ``return_final_state``. Differentiable in every tensor input.

    Packed documents: ``seq_idx`` (b, l) int32 or int64, non-decreasing along each row (the
    caller's promise, not checked). Where it changes (t > 0, seq_idx[t] != seq_idx[t-1]) a
    document starts: exp(dt_t A) is replaced by 0 there, so each document starts from a zero
    state and ``initial_state`` reaches the first document only; h_last is the state after the
    last token. seq_idx gets no gradient.
    """
    dims = check_selective_scan_args("selective_scan", u, delta, A, B, C, D, z, delta_bias,
                                     initial_state, seq_idx)
    which = resolve("selective_scan", impl, u)
    kw = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
              initial_state=initial_state, return_final_state=return_final_state,
              seq_idx=seq_idx)
    with profile_scope("selective_scan"):
        if which == "triton":
            from .triton_scan import run_selective_scan_triton

            return run_selective_scan_triton(dims, u, delta, A, B, C, **kw)
        fn = selective_scan_ref if which == "ref" else selective_scan_chunked
        return fn(u, delta, A, B, C, **kw)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                           dt_softplus=False, impl="auto"):
    """One decoding step of ``selective_scan``: state (b, d, n) fp32, x/dt/z (b, d), B/C (b, n) or
    (b, g, n). Returns (y (b, d) in x's dtype, new_state (b, d, n) fp32); ``state`` is not
    modified."""
    check_selective_state_update_args("selective_state_update", state, x, dt, A, B, C, D, z,
                                      dt_bias)
    if resolve("selective_state_update", impl, x) == "triton":
        from .step_triton import selective_state_update_triton as fn
    else:
        fn = selective_state_update_ref
    return fn(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)


__all__ = ["selective_scan", "selective_scan_chunked", "selective_scan_ref",
           "selective_state_update", "selective_state_update_ref"]
