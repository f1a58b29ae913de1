"""Chunked SSD scan (Mamba-2) in PyTorch: the CPU training path (same contract as
``ssd_scan_ref``; gradients through autograd).

Time is cut into chunks of T = chunk_size steps (the last one padded with dt = 0, x = B = C = 0:
decay 1 and no input, so padding changes neither y nor the state). Write a_t = dt_t A (the log
of the step's decay, one scalar per head) and, within a chunk, for steps s <= t

    seg(t, s) = a_{s+1} + ... + a_t        (the log decay from step s to step t)
    P(t)      = a_0 + ... + a_t            (from the state entering the chunk to step t)
    Q(s)      = a_{s+1} + ... + a_{T-1}    (from step s to the chunk's end)

Unrolling h_t = exp(a_t) h_{t-1} + dt_t x_t B_t^T over one chunk that starts from state H:

    y_t = sum_{s <= t} exp(seg(t, s)) (C_t . B_s) dt_s x_s      intra-chunk, quadratic in T
        + exp(P(t)) H C_t                                          inter-chunk
    H_next = exp(P(T-1)) H + sum_s exp(Q(s)) dt_s x_s B_s^T      state passing, chunk to chunk

The intra-chunk term is (L o C B^T) (dt x) per head with L = exp(seg), masked to 0 above the
diagonal: a (T, T) matrix per (batch, chunk, head), so memory is O(batch * seqlen * nheads * T).
The chunk states are one einsum; the hand-off H -> H_next is a short loop over chunks.

Numerics. seg, P and Q are sums of a_k <= 0 over index ranges, each formed directly (a masked
cumsum over the (T, T) square for seg, prefix and suffix cumsums for P and Q), never as a
difference of two large cumsums (which would cancel) nor as a ratio exp(x) / exp(y) (which would
overflow); entries outside the causal square are set to -inf *before* exp, so every exp has a
non-positive argument for A <= 0 and exp(-inf) = 0 carries a zero gradient.

Documents (seq_idx). A document starts wherever seq_idx changes; doc(t) numbers them from 0.
Pairs (t, s) of different documents are masked out of L; a chunk's state collects only steps of
the document its last step belongs to; the state entering a chunk reaches only its steps in the
document of the step just before the chunk (for the first chunk: the first document, which is
where initial_state applies), and passes on to the next chunk only when the whole chunk is that
document.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._utils import check_chunk_size, check_ssd_args, compute_dtype
from .ref import D_term, effective_dt

DEFAULT_CHUNK_SIZE = 256


def document_ids(seq_idx: torch.Tensor) -> torch.Tensor:
    """(b, l) int64 document number of each step: 0 at t = 0, +1 at each t where seq_idx
    differs from t - 1."""
    change = (seq_idx[:, 1:] != seq_idx[:, :-1]).long()
    return torch.cat([torch.zeros_like(change[:, :1]), change.cumsum(1)], dim=1)


def segsum(a: torch.Tensor) -> torch.Tensor:
    """a (..., T) -> S (..., T, T) with S[..., t, s] = a_{s+1} + ... + a_t for s <= t (0 on the
    diagonal); entries above the diagonal are 0 (callers mask them). Each entry is a direct sum
    of its own terms (a cumsum down the columns of a strictly-lower-triangular copy of a)."""
    T = a.shape[-1]
    strict = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)  # k > s
    terms = a[..., :, None].expand(*a.shape, T).masked_fill(~strict, 0.0)  # [k, s] = a_k
    return terms.cumsum(-2)


def ssd_scan_chunked(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                     dt_limit=None, initial_state=None, seq_idx=None, return_final_state=False,
                     chunk_size=DEFAULT_CHUNK_SIZE):
    """SSD scan with the contract of ``ssd_scan_ref``, computed chunk by chunk (module docstring).
    Float32 compute (float64 when an input is float64); returns y in x's dtype, or (y, h_last
    (b, h, p, n)) in the compute dtype with ``return_final_state``. ``chunk_size`` trades the
    quadratic intra-chunk work (large chunks) against the number of chunk hand-offs (small
    chunks); it does not change the result beyond rounding."""
    dims = check_ssd_args("ssd_scan_chunked", x, dt, A, B, C, D, z, dt_bias, dt_limit,
                          initial_state, seq_idx)
    check_chunk_size("ssd_scan_chunked", chunk_size)
    ct = compute_dtype(x, dt, A, B, C, D, z, dt_bias, initial_state)
    with torch.autocast(x.device.type, enabled=False):  # our own precision rules
        y, state = _chunked(dims, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit,
                            initial_state, seq_idx, chunk_size, ct)
    y = y.to(x.dtype)
    return (y, state) if return_final_state else y


def _chunked(dims, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, initial_state,
             seq_idx, chunk_size, ct):
    b, l, h, p, g, n = (dims.batch, dims.seqlen, dims.nheads, dims.headdim, dims.ngroups,
                        dims.dstate)
    r = h // g  # heads per group
    xf = x.to(ct)
    state = initial_state.to(ct) if initial_state is not None else xf.new_zeros(b, h, p, n)
    if l == 0:
        return xf.new_zeros(b, 0, h, p), state
    T = min(chunk_size, l)
    nc = -(-l // T)
    pad = nc * T - l

    dtf = effective_dt(dt, dt_bias, dt_softplus, dt_limit, ct)  # (b, l, h)
    a = dtf * A.to(ct)  # log decay per step and head
    xdt = xf * dtf[..., None]  # dt_s x_s: (b, l, h, p)
    Bf, Cf = B.to(ct), C.to(ct)
    if pad:
        a = F.pad(a, (0, 0, 0, pad))
        xdt = F.pad(xdt, (0, 0, 0, 0, 0, pad))
        Bf = F.pad(Bf, (0, 0, 0, 0, 0, pad))
        Cf = F.pad(Cf, (0, 0, 0, 0, 0, pad))
    a = a.view(b, nc, T, h).permute(0, 1, 3, 2)  # (b, c, h, T)
    xdt = xdt.view(b, nc, T, g, r, p)
    Bf = Bf.view(b, nc, T, g, n)
    Cf = Cf.view(b, nc, T, g, n)

    P = a.cumsum(-1)  # (b, c, h, T)
    Q = F.pad(a[..., 1:], (0, 1)).flip(-1).cumsum(-1).flip(-1)  # sum_{s<k<T} a_k
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    if seq_idx is not None:
        doc = document_ids(seq_idx)
        if pad:  # padding steps belong to the last document: the state carries through them
            doc = torch.cat([doc, doc[:, -1:].expand(b, pad)], dim=1)
        doc = doc.view(b, nc, T)
        prev = torch.cat([doc[:, :1, 0], doc[:, :-1, -1]], dim=1)  # doc before each chunk
        pair_mask = (causal & (doc[:, :, :, None] == doc[:, :, None, :]))[:, :, None]
        end_mask = (doc == doc[:, :, -1:])[:, :, None]  # (b, c, 1, T): steps in the last doc
        start_mask = (doc == prev[:, :, None])[:, :, None]  # steps in the entering doc
        carry = (doc[:, :, -1] == prev)[:, :, None]  # (b, c, 1): the chunk is one document
    else:
        pair_mask, end_mask, start_mask, carry = causal, None, None, None

    def masked_exp(v, mask):
        return torch.exp(v if mask is None else v.masked_fill(~mask, float("-inf")))

    # intra-chunk: y_t = sum_s L[t, s] (C_t . B_s) dt_s x_s
    L = masked_exp(segsum(a), pair_mask).view(b, nc, g, r, T, T)
    CB = torch.einsum("bctgn,bcsgn->bcgts", Cf, Bf)
    y = torch.einsum("bcgrts,bcsgrp->bctgrp", L * CB[:, :, :, None], xdt)

    # chunk states: sum_s exp(Q(s)) dt_s x_s B_s^T
    wQ = masked_exp(Q, end_mask).view(b, nc, g, r, T).permute(0, 1, 4, 2, 3)  # (b, c, T, g, r)
    states = torch.einsum("bcsgn,bcsgrp->bcgrpn", Bf, xdt * wQ[..., None]).reshape(b, nc, h, p, n)

    # state passing: H_{c+1} = exp(P_c(T-1)) H_c + states_c
    decay = torch.exp(P[..., -1])  # (b, c, h)
    if carry is not None:
        decay = decay.masked_fill(~carry, 0.0)
    starts = []
    for c in range(nc):
        starts.append(state)
        state = decay[:, c, :, None, None] * state + states[:, c]
    H = torch.stack(starts, dim=1).view(b, nc, g, r, p, n)

    # inter-chunk: y_t += exp(P(t)) H C_t
    wP = masked_exp(P, start_mask).view(b, nc, g, r, T).permute(0, 1, 4, 2, 3)
    y = y + torch.einsum("bctgn,bcgrpn->bctgrp", Cf, H) * wP[..., None]

    y = y.reshape(b, nc * T, h, p)[:, :l]
    if D is not None:
        y = y + D_term(D.to(ct), xf)
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y, state


__all__ = ["DEFAULT_CHUNK_SIZE", "document_ids", "segsum", "ssd_scan_chunked"]
