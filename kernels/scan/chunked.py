"""Chunked selective scan in PyTorch: the CPU training path (same contract as selective_scan_ref).

Forward. Time is cut into chunks of ``chunk_size`` steps. Per chunk, in a time-major layout
(chunk, batch, dstate, dim) small enough to stay in cache, a few vectorised ops build the decays
dA_t = exp(dt_t A) and the inputs X_t = dt_t u_t B_t; the recurrence h_t = dA_t h_{t-1} + X_t
then runs step by step over the chunk (one fused multiply-add per step, in place), and one
batched matmul contracts the states with C into y. The state leaving a chunk enters the next.
Decays only ever multiply (there is no exp(cumsum) / exp(-cumsum) ratio), so nothing overflows
whatever dt and A are. Only each chunk's starting state and y before gating are kept for
backward: O(batch * dim * (seqlen + dstate * seqlen / chunk_size)) memory, never a
(batch, seqlen, dim, dstate) tensor.

Backward (adjoint method). With g_t = dL/dh_t:

    g_t = C_t dy_t + dA_{t+1} g_{t+1}          (after the last step: dL/dh_last, or 0)
    dL/dh_init = dA_0 g_0,   and with W_t = g_t dA_t h_{t-1} (the gradient of dt_t A):
    ddt_t = sum_n (W_t A + g_t B_t u_t),   dA = sum_{b,t} W_t dt_t
    dB_t = sum_d g_t dt_t u_t,   du_t = dt_t sum_n g_t B_t + D dy_t,   dC_t = sum_d dy_t h_t

Chunks are visited last to first: each recomputes its states from its saved starting state,
runs the adjoint recurrence backwards over the chunk, and hands dA g on to the chunk before it.

Packed documents (seq_idx): where a document starts (t > 0, seq_idx[t] != seq_idx[t-1]) the
decay dA_t is set to 0 as it is built, in forward and in backward's recompute. Everything else
follows from it: the state restarts there, the adjoint does not pass from t to t-1
(g_{t-1} gets dA_t g_t = 0), W_t = 0 (no gradient through exp(dt_t A) at that token), and a
chunk that starts with a document hands nothing on to the chunk before it.

Grouped B, C (batch, seqlen, ngroups, dstate): channel i uses group i // (dim // ngroups).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .._utils import check_selective_scan_args, compute_dtype, doc_starts

DEFAULT_CHUNK_SIZE = None  # None: auto_chunk_size(); see there for the measurements behind it
CHUNK_ELEMENTS = 1 << 18  # per-chunk buffer size of the auto choice: 1 MiB in float32
_SOFTPLUS_THRESHOLD = 20.0  # as F.softplus: softplus(x) = x above it, derivative 1
_LOG2E = 1.4426950408889634


def auto_chunk_size(batch: int, dim: int, dstate: int, seqlen: int) -> int:
    """Chunk length whose (chunk, batch, dstate, dim) buffers hold about CHUNK_ELEMENTS values,
    clamped to [8, 256]: small enough that the chunk's buffers stay in cache, large enough that
    the ~25 vectorised ops per chunk do not dominate."""
    per_step = max(1, batch * dim * dstate)
    return max(1, min(seqlen, max(8, min(256, CHUNK_ELEMENTS // per_step))))


def _time_major(t: torch.Tensor, ct: torch.dtype) -> torch.Tensor:
    """(b, l, ...) -> contiguous (l, b, ...) in dtype ct."""
    return t.transpose(0, 1).to(ct).contiguous()


def _time_major_groups(BC: torch.Tensor, ct: torch.dtype) -> torch.Tensor:
    """B or C, (b, l, n) or (b, l, g, n) -> contiguous (l, b, n, g)."""
    if BC.dim() == 3:
        BC = BC.unsqueeze(2)
    return BC.permute(1, 0, 3, 2).to(ct).contiguous()


def _from_time_major_groups(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(l, b, n, g) -> like's shape and dtype: (b, l, n) or (b, l, g, n)."""
    return g.permute(1, 0, 3, 2).to(like.dtype).reshape(like.shape)


class _Prepared:
    """Time-major float copies of the inputs, shared by forward and backward."""

    def __init__(self, u, delta, A, B, C, D, z, delta_bias, softplus, ct, seq_idx=None):
        b, l, d = u.shape
        self.b, self.l, self.d, self.n = b, l, d, A.shape[1]
        self.u = _time_major(u, ct)  # (l, b, d)
        pre = _time_major(delta, ct)
        if delta_bias is not None:
            pre = pre + delta_bias.to(ct)
        self.pre = pre
        self.dt = F.softplus(pre) if softplus else pre
        self.dtu = self.dt * self.u
        self.B = _time_major_groups(B, ct)  # (l, b, n, gB)
        self.C = _time_major_groups(C, ct)  # (l, b, n, gC)
        self.At = A.to(ct).t().contiguous()  # (n, d)
        self.At_log2e = self.At * _LOG2E  # exp(x A) = exp2(x A log2(e)), exp2 is cheaper
        self.D = D.to(ct) if D is not None else None
        self.z = _time_major(z, ct) if z is not None else None
        # (l, b, 1, 1) bool, True where a document starts (its decay is 0); None: one document
        self.new_doc = (doc_starts(seq_idx).t().contiguous()[:, :, None, None]
                        if seq_idx is not None else None)


def _sum_over_n(X: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """out[t, b, i] = sum_n V[t, b, n, group(i)] X[t, b, n, i]; X (T, b, n, d), V (T, b, n, g)."""
    T, b, n, d = X.shape
    g = V.shape[-1]
    if g == 1:
        return torch.bmm(V.view(T * b, 1, n), X.view(T * b, n, d)).view(T, b, d)
    return (X.view(T, b, n, g, d // g) * V.unsqueeze(-1)).sum(2).view(T, b, d)


def _sum_over_d(X: torch.Tensor, w: torch.Tensor, g: int) -> torch.Tensor:
    """out[t, b, n, k] = sum_{i in group k} w[t, b, i] X[t, b, n, i]; X (T, b, n, d), w (T, b, d)."""
    T, b, n, d = X.shape
    return (X.view(T, b, n, g, d // g) * w.view(T, b, 1, g, d // g)).sum(-1)


def _outer(w: torch.Tensor, V: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[t, b, n, i] = w[t, b, i] V[t, b, n, group(i)]; w (T, b, d), V (T, b, n, g)."""
    T, b, n, d = out.shape
    g = V.shape[-1]
    torch.mul(w.view(T, b, 1, g, d // g), V.unsqueeze(-1), out=out.view(T, b, n, g, d // g))
    return out


def _states(P: _Prepared, s: int, e: int, h0: torch.Tensor, dA_buf, h_buf):
    """dA_t = exp(dt_t A) and the states h_t for t in [s, e), from h_{s-1} = h0, each
    (T, b, n, d), written into the front of the buffers."""
    T = e - s
    dA = dA_buf[:T]
    torch.mul(P.dt[s:e].unsqueeze(2), P.At_log2e, out=dA)
    torch.exp2(dA, out=dA)
    if P.new_doc is not None:
        dA.masked_fill_(P.new_doc[s:e], 0.0)
    H = _outer(P.dtu[s:e], P.B[s:e], h_buf[:T])
    Hs, dAs = H.unbind(0), dA.unbind(0)  # one call for all the step views
    Hs[0].addcmul_(dAs[0], h0)
    for i in range(1, T):
        Hs[i].addcmul_(dAs[i], Hs[i - 1])
    return dA, H


def _silu_grad(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


class _ChunkedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, softplus, chunk,
                ct, return_final, seq_idx):
        with torch.autocast(u.device.type, enabled=False):  # our own precision rules
            return _ChunkedScan._forward(ctx, u, delta, A, B, C, D, z, delta_bias,
                                         initial_state, softplus, chunk, ct, return_final,
                                         seq_idx)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dh_last=None):
        with torch.autocast(dout.device.type, enabled=False):
            return _ChunkedScan._backward(ctx, dout, dh_last)

    @staticmethod
    def _forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, softplus, chunk,
                 ct, return_final, seq_idx):
        P = _Prepared(u, delta, A, B, C, D, z, delta_bias, softplus, ct, seq_idx)
        b, l, d, n = P.b, P.l, P.d, P.n
        T = max(1, min(chunk, l))
        dA_buf = u.new_empty((T, b, n, d), dtype=ct)
        h_buf = torch.empty_like(dA_buf)
        if initial_state is not None:
            h = initial_state.to(ct).transpose(1, 2).contiguous()  # (b, n, d)
        else:
            h = u.new_zeros((b, n, d), dtype=ct)
        starts = []
        y = u.new_empty((l, b, d), dtype=ct)
        for s in range(0, l, T):
            e = min(s + T, l)
            starts.append(h)
            _, H = _states(P, s, e, h, dA_buf, h_buf)
            y[s:e] = _sum_over_n(H, P.C[s:e])
            h = H[e - s - 1].clone()
        if P.D is not None:
            y.addcmul_(P.u, P.D)
        y_pre = None
        if P.z is not None:
            y_pre = y.clone()
            y.mul_(F.silu(P.z))
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state,
                              torch.stack(starts) if starts else h.unsqueeze(0), y_pre, seq_idx)
        ctx.cfg = (softplus, T, ct)
        y = y.transpose(0, 1).to(u.dtype).contiguous()
        if return_final:
            return y, h.transpose(1, 2).contiguous()
        return y

    @staticmethod
    def _backward(ctx, dout, dh_last):
        (u, delta, A, B, C, D, z, delta_bias, initial_state, starts, y_pre,
         seq_idx) = ctx.saved_tensors
        softplus, T, ct = ctx.cfg
        P = _Prepared(u, delta, A, B, C, D, z, delta_bias, softplus, ct, seq_idx)
        b, l, d, n = P.b, P.l, P.d, P.n
        gB = P.B.shape[-1]

        dout = _time_major(dout, ct)  # (l, b, d)
        dz = None
        if P.z is not None:
            dy = dout * F.silu(P.z)
            dz = dout * y_pre * _silu_grad(P.z)
        else:
            dy = dout
        du = dy * P.D if P.D is not None else torch.zeros_like(dy)
        ddt = torch.empty_like(dy)
        dB = torch.empty_like(P.B)
        dC = torch.empty_like(P.C)
        dAt = torch.zeros_like(P.At)  # (n, d)

        dA_buf = u.new_empty((T, b, n, d), dtype=ct)
        h_buf = torch.empty_like(dA_buf)
        g_buf = torch.empty_like(dA_buf)
        # q = dA_{t+1} g_{t+1}: what enters the current chunk's last step from the right.
        if dh_last is not None:
            q = dh_last.to(ct).transpose(1, 2).contiguous()
        else:
            q = u.new_zeros((b, n, d), dtype=ct)
        chunk_starts = list(range(0, l, T))
        for k in range(len(chunk_starts) - 1, -1, -1):
            s = chunk_starts[k]
            e = min(s + T, l)
            Tc = e - s
            h0 = starts[k]
            dA, H = _states(P, s, e, h0, dA_buf, h_buf)
            dy_c = dy[s:e]
            dC[s:e] = _sum_over_d(H, dy_c, P.C.shape[-1])
            # adjoint recurrence, backwards over the chunk
            G = _outer(dy_c, P.C[s:e], g_buf[:Tc])
            Gs, dAs = G.unbind(0), dA.unbind(0)
            Gs[Tc - 1].add_(q)
            for i in range(Tc - 2, -1, -1):
                Gs[i].addcmul_(dAs[i + 1], Gs[i + 1])
            q = dA[0] * G[0]
            # through X_t = dt_t u_t B_t
            S = _sum_over_n(G, P.B[s:e])  # sum_n g_t B_t: (Tc, b, d)
            dB[s:e] = _sum_over_d(G, P.dtu[s:e], gB)
            du[s:e].addcmul_(S, P.dt[s:e])
            torch.mul(S, P.u[s:e], out=ddt[s:e])
            # through dA_t = exp(dt_t A): W_t = g_t dA_t h_{t-1}
            W = G.mul_(dA)
            W[0].mul_(h0)
            if Tc > 1:
                W[1:].mul_(H[:-1])
            ddt[s:e] += torch.linalg.vecdot(W, P.At, dim=2)
            dAt += W.mul_(P.dt[s:e].unsqueeze(2)).sum((0, 1))

        if softplus:
            ddelta = ddt * torch.where(P.pre > _SOFTPLUS_THRESHOLD, 1.0, torch.sigmoid(P.pre))
        else:
            ddelta = ddt

        def back(t, like):  # time-major (l, b, d) -> (b, l, d) in like's dtype
            return t.transpose(0, 1).to(like.dtype).contiguous()

        need = ctx.needs_input_grad
        return (
            back(du, u) if need[0] else None,
            back(ddelta, delta) if need[1] else None,
            dAt.t().to(A.dtype) if need[2] else None,
            _from_time_major_groups(dB, B) if need[3] else None,
            _from_time_major_groups(dC, C) if need[4] else None,
            (dy * P.u).sum((0, 1)).to(D.dtype) if D is not None and need[5] else None,
            back(dz, z) if z is not None and need[6] else None,
            ddelta.sum((0, 1)).to(delta_bias.dtype) if delta_bias is not None and need[7]
            else None,
            q.transpose(1, 2).to(initial_state.dtype) if initial_state is not None and need[8]
            else None,
            None, None, None, None, None,
        )


def selective_scan_chunked(
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
    chunk_size=DEFAULT_CHUNK_SIZE,
    seq_idx=None,
):
    """Selective scan with the contract of ``selective_scan_ref``, computed chunk by chunk with
    a hand-written backward (see the module docstring). Float32 compute (float64 when an input
    is float64); returns y in u's dtype, or (y, h_last (b, d, n)) in the compute dtype with
    ``return_final_state``. ``chunk_size`` (None: ``auto_chunk_size``) trades the per-chunk
    op count (small chunks) against cache misses and buffer size (large chunks); it does not
    change the result beyond rounding. ``seq_idx`` (b, l) integer: packed documents (each
    starts from a zero state; see the module docstring)."""
    check_selective_scan_args(
        "selective_scan_chunked", u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx
    )
    if chunk_size is None:
        chunk_size = auto_chunk_size(u.shape[0], u.shape[2], A.shape[1], u.shape[1])
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(
            f"selective_scan_chunked: chunk_size must be a positive int, got {chunk_size!r}"
        )
    ct = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    return _ChunkedScan.apply(u, delta, A, B, C, D, z, delta_bias, initial_state,
                              bool(delta_softplus), chunk_size, ct, bool(return_final_state),
                              seq_idx)
