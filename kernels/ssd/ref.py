"""The SSD scan (Mamba-2), by its definition: a plain loop over time (the reference for every
fast path).

x, z: (batch, seqlen, nheads, headdim); dt: (batch, seqlen, nheads); A, dt_bias: (nheads,);
B, C: (batch, seqlen, ngroups, dstate), head h using group h // (nheads // ngroups);
D: (nheads,) or (nheads, headdim); initial_state: (batch, nheads, headdim, dstate);
seq_idx: (batch, seqlen) int, non-decreasing along each row. Per head, with the state h_t a
(headdim, dstate) matrix:

    dt_t = softplus(dt_t + dt_bias)     (or dt_t + dt_bias), then clamped to dt_limit = (lo, hi)
    h_t  = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T        h_{-1} = initial_state (or 0)
    y_t  = h_t C_t + D x_t
    y    = y * silu(z)                                 (when z is given)

The decay exp(dt_t A) is one scalar per (batch, time, head): that is what separates SSD from the
Mamba-1 selective scan, whose decay is per (channel, state index). Where seq_idx changes between
t-1 and t a new document starts at t and h_{t-1} is replaced by 0 there, so initial_state only
reaches the first document and the final state is the state after the last token (of the last
document).

All arithmetic in float32, or float64 when any input is float64 (tests use that). Returns y in
x's dtype, or (y, h_last) with h_last (batch, nheads, headdim, dstate) in the compute dtype.
Gradients come from autograd; this is slow and meant for tests and tiny inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._utils import check_ssd_args, compute_dtype


def effective_dt(dt, dt_bias, dt_softplus, dt_limit, ct):
    """dt + dt_bias, through softplus when asked, clamped to dt_limit, in dtype ct. Shapes
    (..., nheads) with dt_bias (nheads,)."""
    out = dt.to(ct)
    if dt_bias is not None:
        out = out + dt_bias.to(ct)
    if dt_softplus:
        out = F.softplus(out)
    if dt_limit is not None:
        out = out.clamp(float(dt_limit[0]), float(dt_limit[1]))
    return out


def head_groups(BC: torch.Tensor, nheads: int, dim: int) -> torch.Tensor:
    """B or C with the group axis ``dim`` expanded to one entry per head (head h takes group
    h // (nheads // ngroups)); a view when ngroups == 1."""
    g = BC.shape[dim]
    if g == 1:
        shape = list(BC.shape)
        shape[dim] = nheads
        return BC.expand(shape)
    return BC.repeat_interleave(nheads // g, dim=dim)


def D_term(D, x):
    """D x for D (nheads,) or (nheads, headdim) and x (..., nheads, headdim)."""
    return (D[:, None] if D.dim() == 1 else D) * x


def ssd_scan_ref(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=None,
                 initial_state=None, seq_idx=None, return_final_state=False):
    """Sequential SSD scan (see the module docstring for the exact contract)."""
    dims = check_ssd_args("ssd_scan_ref", x, dt, A, B, C, D, z, dt_bias, dt_limit,
                          initial_state, seq_idx)
    b, l, h, p, n = dims.batch, dims.seqlen, dims.nheads, dims.headdim, dims.dstate
    ct = compute_dtype(x, dt, A, B, C, D, z, dt_bias, initial_state)
    with torch.autocast(x.device.type, enabled=False):  # our own precision rules
        xf = x.to(ct)
        dtf = effective_dt(dt, dt_bias, dt_softplus, dt_limit, ct)  # (b, l, h)
        dA = torch.exp(dtf * A.to(ct))  # (b, l, h): one decay per head and step
        Bh = head_groups(B.to(ct), h, 2)  # (b, l, h, n)
        Ch = head_groups(C.to(ct), h, 2)
        if initial_state is not None:
            state = initial_state.to(ct)
        else:
            state = xf.new_zeros(b, h, p, n)
        ys = []
        for t in range(l):
            if seq_idx is not None and t > 0:
                new_doc = (seq_idx[:, t] != seq_idx[:, t - 1])[:, None, None, None]
                state = torch.where(new_doc, 0.0, state)
            u = (dtf[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]  # dt x B^T
            state = dA[:, t, :, None, None] * state + u
            ys.append((state * Ch[:, t, :, None, :]).sum(-1))  # h_t C_t: (b, h, p)
        y = torch.stack(ys, dim=1) if l > 0 else xf.new_zeros(b, 0, h, p)
        if D is not None:
            y = y + D_term(D.to(ct), xf)
        if z is not None:
            y = y * F.silu(z.to(ct))
    y = y.to(x.dtype)
    return (y, state) if return_final_state else y


__all__ = ["ssd_scan_ref"]
