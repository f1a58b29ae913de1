"""Plain PyTorch reference of one decoding step of the SSD scan (the Mamba-2 recurrence).

With dt = softplus(dt + dt_bias) (or dt + dt_bias), clamped to dt_limit, for batch b, head h
(using group g(h) = h // (nheads // ngroups) of B and C), headdim index i and state index n:

    state[b, h, i, n] <- exp(dt[b, h] A[h]) state[b, h, i, n] + dt[b, h] x[b, h, i] B[b, g(h), n]
    y[b, h, i] = sum_n state[b, h, i, n] C[b, g(h), n] + D x[b, h, i],   y *= silu(z[b, h, i])

This is exactly one step of ``ssd_scan_ref``. ``state`` (b, h, p, n) is updated in place (the
model's decode path keeps one state buffer, which a CUDA graph can capture); arithmetic in
float32, float64 when any input is float64.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._utils import check_ssd_state_update_args, compute_dtype
from .ref import D_term, effective_dt, head_groups

__all__ = ["ssd_state_update_ref"]


def ssd_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                         dt_limit=None):
    """One recurrence step: updates ``state`` in place, returns y (b, h, p) in x's dtype."""
    dims = check_ssd_state_update_args("ssd_state_update_ref", state, x, dt, A, B, C, D, z,
                                       dt_bias, dt_limit)
    h = dims.nheads
    ct = compute_dtype(state, x, dt, A, B, C, D, z, dt_bias)
    with torch.autocast(x.device.type, enabled=False):
        xf = x.to(ct)
        dtf = effective_dt(dt, dt_bias, dt_softplus, dt_limit, ct)  # (b, h)
        Bh = head_groups(B.to(ct), h, 1)  # (b, h, n)
        Ch = head_groups(C.to(ct), h, 1)
        dA = torch.exp(dtf * A.to(ct))[:, :, None, None]
        new = dA * state.to(ct) + (dtf[:, :, None] * xf)[..., None] * Bh[:, :, None, :]
        y = (new * Ch[:, :, None, :]).sum(-1)
        state.copy_(new)
        if D is not None:
            y = y + D_term(D.to(ct), xf)
        if z is not None:
            y = y * F.silu(z.to(ct))
    return y.to(x.dtype)
