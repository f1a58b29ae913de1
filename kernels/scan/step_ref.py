"""Plain PyTorch reference of one decoding step of the selective scan (Mamba-1 recurrence).

With ``dt = softplus(dt + dt_bias)`` (or ``dt + dt_bias`` without softplus), for every batch b,
channel d and state index n:

    new_state[b, d, n] = exp(dt[b, d] * A[d, n]) * state[b, d, n] + dt[b, d] * B[b, n] * x[b, d]
    y[b, d] = sum_n C[b, n] * new_state[b, d, n] + D[d] * x[b, d]
    y = y * silu(z)            (when z is given)

B and C are (b, n), or grouped (b, g, n) with d % g == 0, channel c using group c // (dim // g)
(B and C may have different g).
State is float32 (b, d, n); arithmetic in float32 (float64 when any input is float64).
This is exactly one step of the selective scan contract in docs/kernels.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._utils import check_selective_state_update_args, compute_dtype

__all__ = ["selective_state_update_ref"]


def _per_channel(BC, d):
    """(b, n) -> (b, 1, n) (broadcasts over channels); (b, g, n) -> (b, d, n)."""
    if BC.dim() == 2:
        return BC[:, None, :]
    return BC.repeat_interleave(d // BC.shape[1], dim=1)


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                               dt_softplus=False):
    """One recurrence step. Returns (y (b, d) in x's dtype, new_state (b, d, n) float32).

    Functional: ``state`` is not modified. (new_state is float64 for float64 inputs.)
    """
    b, d, n = check_selective_state_update_args("selective_state_update_ref", state, x, dt, A, B,
                                                C, D, z, dt_bias)
    ct = compute_dtype(state, x, dt, A, B, C, D, z, dt_bias)
    dtf = dt.to(ct)
    if dt_bias is not None:
        dtf = dtf + dt_bias.to(ct)
    if dt_softplus:
        dtf = F.softplus(dtf)
    Bf, Cf = _per_channel(B.to(ct), d), _per_channel(C.to(ct), d)  # (b, 1 or d, n)
    xf = x.to(ct)
    dA = torch.exp(dtf[:, :, None] * A.to(ct)[None])
    new_state = dA * state.to(ct) + (dtf * xf)[:, :, None] * Bf
    y = (new_state * Cf).sum(dim=-1)
    if D is not None:
        y = y + D.to(ct) * xf
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(x.dtype), new_state
