"""The selective scan, by its definition: a plain loop over time (the reference for every fast path).

Contract (docs/kernels.md). u, delta, z: (batch, seqlen, dim); B, C: (batch, seqlen, dstate) or
(batch, seqlen, ngroups, dstate) where channel i uses group i // (dim // ngroups); A: (dim, dstate);
D, delta_bias: (dim,); initial_state: (batch, dim, dstate); seq_idx: (batch, seqlen) integer,
non-decreasing along each row (packed documents).

    dt_t = softplus(delta_t + delta_bias)          (or delta_t + delta_bias without softplus)
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t       h_{-1} = initial_state (or 0)
           with exp(dt_t * A) replaced by 0 where a document starts (t > 0 and
           seq_idx[t] != seq_idx[t-1]): each document starts from a zero state, and
           initial_state reaches the first document only
    y_t  = sum_n C_t[n] h_t[:, n] + D * u_t
    y    = y * silu(z)                              (when z is given)

The state and all arithmetic are float32, or float64 when an input is float64 (tests use that).
Returns y in u's dtype, or (y, h_last) with h_last (batch, dim, dstate) in the compute dtype.
Gradients come from autograd; this is slow and is meant for tests and tiny inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._utils import check_selective_scan_args, compute_dtype, doc_starts, expand_groups


def selective_scan_ref(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    initial_state=None,
    return_final_state=False,
    seq_idx=None,
):
    """Sequential selective scan (see the module docstring for the exact contract)."""
    dims = check_selective_scan_args(
        "selective_scan_ref", u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx
    )
    out_dtype = u.dtype
    ct = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    b, l, d, n = dims.batch, dims.seqlen, dims.dim, dims.dstate

    uf = u.to(ct)
    dt = delta.to(ct)
    if delta_bias is not None:
        dt = dt + delta_bias.to(ct)
    if delta_softplus:
        dt = F.softplus(dt)
    Af = A.to(ct)
    Bf = expand_groups(B.to(ct), d)  # (b, l, d or 1, n)
    Cf = expand_groups(C.to(ct), d)

    if initial_state is not None:
        h = initial_state.to(ct)
    else:
        h = torch.zeros(b, d, n, dtype=ct, device=u.device)
    starts = doc_starts(seq_idx)[:, :, None, None] if seq_idx is not None else None
    ys = []
    for t in range(l):
        dt_t = dt[:, t, :, None]  # (b, d, 1)
        decay = torch.exp(dt_t * Af)
        if starts is not None:  # a document starts: the state before it does not enter
            decay = torch.where(starts[:, t], 0.0, decay)
        h = decay * h + dt_t * Bf[:, t] * uf[:, t, :, None]
        ys.append((h * Cf[:, t]).sum(-1))
    y = torch.stack(ys, dim=1) if l > 0 else uf.new_zeros(b, 0, d)
    if D is not None:
        y = y + D.to(ct) * uf
    if z is not None:
        y = y * F.silu(z.to(ct))
    y = y.to(out_dtype)
    return (y, h) if return_final_state else y
