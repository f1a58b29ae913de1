"""Mamba-2 SSD scan (state-space duality, Dao & Gu 2024) and its one-token decode step.

    y = ssd_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=None,
                 initial_state=None, seq_idx=None, return_final_state=False, chunk_size=256,
                 impl="auto")
    y = ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                         dt_limit=None, impl="auto")          # updates state in place

Files: ``ref.py`` (the sequential reference, float64-capable), ``chunked.py`` (the PyTorch
training path on CPU: the chunked SSD algorithm, autograd through torch ops),
``triton_ssd.py`` (the Triton scan's entry, ``ssd_scan_triton``, over the kernels in the other
``triton_*.py`` files), ``ops.py`` (the same as custom ops, what ``torch.compile`` traces),
``step_ref.py`` / ``step_triton.py`` (one decoding token). ``impl`` is
resolved by ``kernels.backend.resolve``: "ref" the sequential reference, "torch" the chunked
path, "triton" the Triton kernels.
"""
from __future__ import annotations

from .._ops import compiling, profile_scope
from .._utils import check_chunk_size, check_ssd_args, check_ssd_state_update_args
from ..backend import resolve
from .chunked import ssd_scan_chunked
from .ref import ssd_scan_ref
from .step_ref import ssd_state_update_ref


def ssd_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=None,
             initial_state=None, seq_idx=None, return_final_state=False, chunk_size=256,
             impl="auto"):
    """SSD scan (Mamba-2), per head with a (headdim, dstate) state:

        dt = softplus(dt + dt_bias)  (or dt + dt_bias), clamped to dt_limit = (lo, hi),
        h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T  (fp32 state, h_{-1} = initial_state or 0),
        y_t = h_t C_t + D x_t,  y = y * silu(z) when z is given.

    x, z: (b, l, h, p); dt: (b, l, h); A, dt_bias: (h,) fp32; B, C: (b, l, g, n) with h % g == 0
    (head k uses group k // (h // g)); D: (h,) or (h, p); initial_state: (b, h, p, n).
    seq_idx (b, l) int32/int64, non-decreasing: a new document starts where it changes, from a
    zero state (initial_state reaches the first document only). Returns y (x's dtype), or
    (y, h_last (b, h, p, n) fp32) with ``return_final_state``. Differentiable in every tensor
    input and through h_last. ``chunk_size`` changes the speed, not the result.
    """
    check_ssd_args("ssd_scan", x, dt, A, B, C, D, z, dt_bias, dt_limit, initial_state, seq_idx)
    check_chunk_size("ssd_scan", chunk_size)
    import torch

    # the Triton kernels take 16/32-bit floats and headdim, dstate up to 256 (triton_ssd.py's
    # MAX_HEADDIM / MAX_DSTATE, repeated here so that choosing does not import Triton)
    fits = (x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and x.shape[-1] <= 256 and B.shape[-1] <= 256)
    which = resolve("ssd_scan", impl, x, fits=fits, choices=("auto", "torch", "triton", "ref"),
                    limits="float16/bfloat16/float32 inputs, headdim and dstate up to 256")
    kw = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
              initial_state=initial_state, seq_idx=seq_idx, return_final_state=return_final_state)
    with profile_scope("ssd_scan"):
        if which == "triton":
            if compiling():  # the custom ops (ops.py)
                from .ops import ssd_scan_op as fn
            else:
                from .triton_ssd import ssd_scan_triton as fn
            return fn(x, dt, A, B, C, **kw, chunk_size=chunk_size)
        if which == "ref":
            return ssd_scan_ref(x, dt, A, B, C, **kw)
        return ssd_scan_chunked(x, dt, A, B, C, **kw, chunk_size=chunk_size)


def ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                     dt_limit=None, impl="auto"):
    """One decoding step of ``ssd_scan``: state (b, h, p, n) fp32, updated IN PLACE; x, z
    (b, h, p); dt (b, h); B, C (b, g, n). Returns y (b, h, p) in x's dtype. Equal to a length-1
    ``ssd_scan`` from ``initial_state=state``, whose final state is what ``state`` becomes."""
    check_ssd_state_update_args("ssd_state_update", state, x, dt, A, B, C, D, z, dt_bias,
                                dt_limit)
    kw = dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit)
    if resolve("ssd_state_update", impl, x) == "triton":
        from .step_triton import run_ssd_state_update_triton

        return run_ssd_state_update_triton(state, x, dt, A, B, C, **kw)
    return ssd_state_update_ref(state, x, dt, A, B, C, **kw)


__all__ = ["ssd_scan", "ssd_scan_chunked", "ssd_scan_ref", "ssd_state_update",
           "ssd_state_update_ref"]
