"""SSD scan (Mamba-2) on Triton: ``ssd_scan_triton``, an autograd.Function over the chunked SSD
kernels.

Contract (kernels/ssd/__init__.py; arguments checked by the caller): x, z (batch, seqlen, nheads,
headdim), dt (batch, seqlen, nheads), any strides (views into one projection output work: every
kernel takes strides, nothing is copied); A, dt_bias (nheads,); B, C (batch, seqlen, ngroups,
dstate), head h using group h // (nheads // ngroups); D (nheads,) or (nheads, headdim);
initial_state (batch, nheads, headdim, dstate); seq_idx (batch, seqlen) int32/int64,
non-decreasing.

    dt = softplus(dt + dt_bias) (or dt + dt_bias), clamped to dt_limit = (lo, hi),
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T   (float32, h_{-1} = initial_state or 0;
                                                  0 again where a new document starts),
    y_t = h_t C_t + D x_t,   y = y * silu(z) when z is given.

Returns y (x's dtype), or (y, h_last (batch, nheads, headdim, dstate) float32). Every tensor
input gets a gradient, h_last's included.

Kernels (Q = the chunk size, a power of two; cs = chunk-local cumulative sum of dt A):

forward
  1. triton_state._ssd_state_fwd_kernel: per (batch, head, p block, n block), a sequential walk
     over sub-blocks of BLOCK_L steps, one tensor-core product each; writes dt, cs (batch,
     nheads, LP) float32 (LP = n_chunks * Q), the state entering every chunk hin (batch,
     n_chunks + 1, nheads, headdim, dstate) float32 and h_last.
  2. triton_chunk_scan._ssd_chunk_scan_fwd_kernel: per (batch, chunk, head, BLOCK_M steps,
     p block), y = intra-chunk (C B^T masked decay) x + exp(cs) C hin^T + D x, gate. With z it
     also stores y before the gate (for dz).
backward
  3. triton_state._ssd_state_bwd_kernel: the reverse walk for the adjoint of the state; writes
     dhout (batch, n_chunks, nheads, headdim, dstate) float32 and d initial_state.
  4. triton_bwd_chunk._ssd_bwd_col_kernel: dx, dz, dD partials, dB partials per head split, the
     direct ddt and the column half of d cs.
  5. triton_bwd_chunk._ssd_bwd_row_kernel: dC partials per head split, the inter-chunk part of
     d cs.
  6. triton_bwd_dt._ssd_bwd_dt_kernel: reverse cumsum of d cs, the dt preprocessing's chain
     rule: d dt, dA and d dt_bias partials.
Then a few torch sums reduce the float32 partials (deterministic: no atomics anywhere).

Saved for backward: the inputs, dt and cs (2 floats per (batch, step, head)), hin (float32,
(batch, n_chunks + 1, nheads, headdim, dstate): headdim * dstate / Q floats per (batch, step,
head), e.g. 32 at P64 N128 Q256, against P = 64 elements of x), and with z, y before the gate
(x's dtype). No (batch, seqlen, nheads, headdim, dstate) tensor is ever formed.

Sizes: headdim and dstate from 1 to 256 (padded inside the tiles to a power of two >= 16:
powers of two waste nothing), any seqlen, nheads, ngroups dividing nheads. dtypes: float32
(products in IEEE float32 by default; TUNING["fp32_dot"] = "tf32" trades precision for speed),
bfloat16 and float16 (x, B, C of one 16-bit type: tensor-core products of that type with float32
accumulation; mixed types fall back to float32 products). float64 is not supported here (the
reference and the chunked PyTorch path take it). ``chunk_size`` only picks the chunk length Q:
the largest power of two <= chunk_size, at least 16 and at most next_pow2(seqlen) (results agree
to rounding for every choice).
"""
from __future__ import annotations

import torch

from .._launch import launch
from ..backend import interpreting
from .triton_bwd_chunk import _ssd_bwd_col_kernel, _ssd_bwd_row_kernel
from .triton_bwd_dt import _ssd_bwd_dt_kernel
from .triton_chunk_scan import _ssd_chunk_scan_fwd_kernel
from .triton_state import _ssd_state_bwd_kernel, _ssd_state_fwd_kernel

# Block shapes, per kernel; None: the default below. Used by the tests (small blocks) and the
# GPU benchmark's sweeps.
#   "state_fwd" / "state_bwd": (BLOCK_L, BLOCK_P, BLOCK_N, num_warps, num_stages)
#   "scan_fwd": (BLOCK_M, BLOCK_K, BLOCK_P, num_warps, num_stages)
#   "col_bwd":  (BLOCK_S, num_warps, num_stages)       (source block = target block)
#   "row_bwd":  (BLOCK_M, BLOCK_K, num_warps, num_stages)
#   "dt_bwd":   (BLOCK_H, num_warps)
#   "head_split": heads of a group are cut into this many splits in the backward chunk kernels
#                 (each split one program, its dB / dC a float32 partial); None: the heuristic.
#   "fp32_dot": "ieee" (default) or "tf32": the products for float32 inputs.
# Every block of steps is clamped to the chunk length, BLOCK_P / BLOCK_N to headdim / dstate
# padded to a power of two (at least 16: the smallest tensor-core tile).
TUNING: dict = {"state_fwd": None, "state_bwd": None, "scan_fwd": None, "col_bwd": None,
                "row_bwd": None, "dt_bwd": None, "head_split": None, "fp32_dot": "ieee"}
# Defaults: chosen from the sm_90 compiler's resource report at P64 N128 bf16 (triton 3.9: no
# register spills in the forward and state kernels; the backward chunk kernels are the
# register-heaviest: col (32, 8 warps) spills 136 bytes a thread against 424 for (64, 8) and
# 1968 for (64, 4); row (64, 64, 8 warps) 80 bytes); not yet swept for time on the GPU
# (scripts/bench_ssd_triton.py --sweep KEY does that).
_DEFAULTS = {
    "state_fwd": (64, 64, 64, 4, 2),
    "state_bwd": (64, 64, 64, 4, 2),
    "scan_fwd": (64, 64, 64, 4, 2),
    "col_bwd": (32, 8, 1),
    "row_bwd": (64, 64, 8, 1),
    "dt_bwd": (16, 4),
}
MAX_HEADDIM = 256
MAX_DSTATE = 256
MIN_CHUNK = 16
# Tests set this to fill every output and scratch buffer with NaN before the kernels run.
POISON_OUTPUTS = False

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def _prev_pow2(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def _pad(x: int) -> int:
    """A tile extent for a dimension of size x: a power of two, at least 16."""
    return max(16, _next_pow2(x))


def chunk_length(chunk_size: int, seqlen: int) -> int:
    """The chunk length Q the kernels use for ``chunk_size`` (module docstring)."""
    q = max(MIN_CHUNK, _prev_pow2(int(chunk_size)))
    return max(MIN_CHUNK, min(q, _next_pow2(seqlen)))


def check_triton_sizes(fn: str, x, B, C, z=None) -> None:
    """Raise for inputs outside the Triton kernels' limits (module docstring: Sizes)."""
    p, n = x.shape[3], B.shape[3]
    if not 1 <= p <= MAX_HEADDIM:
        raise ValueError(f"{fn}: the Triton SSD kernels take headdim 1..{MAX_HEADDIM}, got {p}")
    if not 1 <= n <= MAX_DSTATE:
        raise ValueError(f"{fn}: the Triton SSD kernels take dstate 1..{MAX_DSTATE}, got {n}")
    for name, t in (("x", x), ("B", B), ("C", C), ("z", z)):
        if t is not None and t.dtype not in _SUPPORTED:
            raise TypeError(f"{fn}: the Triton SSD kernels take float32, bfloat16 or float16 "
                            f"{name}, got {t.dtype} (use impl='torch' or 'ref' for float64)")


def _cfg(kind: str):
    over = TUNING.get(kind)
    return tuple(over) if over is not None else _DEFAULTS[kind]


def _steps(blk: int, q: int) -> int:
    return max(16, min(_next_pow2(blk), q))


def _dim_block(blk: int, full: int) -> int:
    return max(16, min(_next_pow2(blk), full))


def _dot_mode(x, B, C) -> int:
    """The ``DOT`` constexpr of the kernels (triton_common.py)."""
    if x.dtype == B.dtype == C.dtype and x.dtype in (torch.bfloat16, torch.float16):
        if x.dtype == torch.float16:
            return 2
        return 4 if interpreting() else 1
    return 3 if TUNING.get("fp32_dot") == "tf32" else 0


def _empty(shape, dtype, device):
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


_SM_COUNT: dict = {}


def _sm_count(device) -> int:
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _head_split(base_programs: int, hpg: int, device) -> tuple[int, int]:
    """(n_split, heads per split) of the backward chunk kernels: the heads of a group are cut
    so that base_programs * n_split programs give every SM about two (TUNING["head_split"]
    overrides). More splits: more parallelism, more float32 dB / dC partials to sum."""
    req = TUNING.get("head_split")
    if req is None:
        sms = _sm_count(device)
        req = _cdiv(2 * sms, max(1, base_programs)) if sms else 1
    req = max(1, min(int(req), hpg))
    hps = _cdiv(hpg, req)
    return _cdiv(hpg, hps), hps


def _strides4(t):
    return tuple(t.stride())


def _seq_args(seq_idx, dummy):
    if seq_idx is None:
        return dummy, 0, 0
    return seq_idx, seq_idx.stride(0), seq_idx.stride(1)


def _limits(dt_limit):
    if dt_limit is None:
        return 0.0, 0.0
    return float(dt_limit[0]), float(dt_limit[1])


class _Plan:
    """Sizes and launch shapes shared by the forward and the backward."""

    def __init__(self, x, B, chunk_size):
        self.b, self.L, self.H, self.P = x.shape
        self.G, self.N = B.shape[2], B.shape[3]
        self.HPG = self.H // self.G
        self.Q = chunk_length(chunk_size, self.L)
        self.NC = _cdiv(self.L, self.Q)
        self.LP = self.NC * self.Q
        self.PF, self.NF = _pad(self.P), _pad(self.N)


def _forward(x, dt, A, B, C, D, z, dt_bias, softplus, dt_limit, h0, seq_idx, chunk_size,
             need_grad):
    pl = _Plan(x, B, chunk_size)
    b, L, H, P, N, NC, LP, Q = pl.b, pl.L, pl.H, pl.P, pl.N, pl.NC, pl.LP, pl.Q
    dev = x.device
    dot = _dot_mode(x, B, C)
    lo, hi = _limits(dt_limit)
    dtp = _empty((b, H, LP), torch.float32, dev)
    cs = _empty((b, H, LP), torch.float32, dev)
    hin = _empty((b, NC + 1, H, P, N), torch.float32, dev)
    hlast = _empty((b, H, P, N), torch.float32, dev)
    seq, s_seq_b, s_seq_l = _seq_args(seq_idx, dtp)
    h0c = h0.contiguous() if h0 is not None else dtp

    bl, bp, bn, nw, ns = _cfg("state_fwd")
    bl, bp, bn = _steps(bl, Q), _dim_block(bp, pl.PF), _dim_block(bn, pl.NF)
    launch(_ssd_state_fwd_kernel, (b * H, _cdiv(P, bp), _cdiv(N, bn)), (
        x, dt, A, dt_bias if dt_bias is not None else A, B, seq, h0c,
        dtp, cs, hin, hlast,
        L, H, P, N, NC, LP, pl.HPG, lo, hi,
        *_strides4(x), *dt.stride(), *_strides4(B), s_seq_b, s_seq_l), dict(
        HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(softplus), HAS_LIMIT=dt_limit is not None,
        HAS_SEQ=seq_idx is not None, HAS_H0=h0 is not None, DOT=dot,
        CHUNK=Q, BLOCK_L=bl, BLOCK_P=bp, BLOCK_N=bn), num_warps=nw, num_stages=ns)

    y = _empty((b, L, H, P), x.dtype, dev)
    store_ypre = need_grad and z is not None
    ypre = _empty((b, L, H, P), x.dtype, dev) if store_ypre else y
    zz = z if z is not None else x
    bm, bk, bp, nw, ns = _cfg("scan_fwd")
    bm, bk, bp = _steps(bm, Q), _steps(bk, Q), _dim_block(bp, pl.PF)
    launch(_ssd_chunk_scan_fwd_kernel, ((Q // bm) * _cdiv(P, bp), b * NC, H), (
        x, zz, B, C, D if D is not None else A, seq, dtp, cs, hin,
        y, ypre,
        L, H, P, N, NC, LP, pl.HPG,
        *_strides4(x), *_strides4(zz), *_strides4(B), *_strides4(C), s_seq_b, s_seq_l,
        *_strides4(y)), dict(
        HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2, HAS_Z=z is not None,
        HAS_SEQ=seq_idx is not None, STORE_YPRE=store_ypre, DOT=dot,
        CHUNK=Q, BLOCK_M=bm, BLOCK_K=bk, BLOCK_P=bp, BLOCK_N=pl.NF), num_warps=nw, num_stages=ns)
    return y, hlast, dtp, cs, hin, (ypre if store_ypre else None)


def _backward(saved, softplus, dt_limit, has_h0, chunk_size, dy, dhlast):
    x, dt, A, B, C, D, z, dt_bias, seq_idx, dtp, cs, hin, ypre = saved
    pl = _Plan(x, B, chunk_size)
    b, L, H, P, N, G, NC, LP, Q = pl.b, pl.L, pl.H, pl.P, pl.N, pl.G, pl.NC, pl.LP, pl.Q
    dev = x.device
    dot = _dot_mode(x, B, C)
    lo, hi = _limits(dt_limit)
    seq, s_seq_b, s_seq_l = _seq_args(seq_idx, dtp)
    zz = z if z is not None else x
    has_dhlast = dhlast is not None
    dhl = dhlast.float().contiguous() if has_dhlast else dtp

    # 3. adjoint walk: dhout, d initial_state
    dhout = _empty((b, NC, H, P, N), torch.float32, dev)
    dh0 = _empty((b, H, P, N), torch.float32, dev) if has_h0 else dtp
    bl, bp, bn, nw, ns = _cfg("state_bwd")
    bl, bp, bn = _steps(bl, Q), _dim_block(bp, pl.PF), _dim_block(bn, pl.NF)
    launch(_ssd_state_bwd_kernel, (b * H, _cdiv(P, bp), _cdiv(N, bn)), (
        dy, zz, C, seq, dtp, cs, dhl,
        dhout, dh0,
        L, H, P, N, NC, LP, pl.HPG,
        *_strides4(dy), *_strides4(zz), *_strides4(C), s_seq_b, s_seq_l), dict(
        HAS_Z=z is not None, HAS_SEQ=seq_idx is not None, HAS_DHLAST=has_dhlast,
        STORE_DH0=has_h0, DOT=dot,
        CHUNK=Q, BLOCK_L=bl, BLOCK_P=bp, BLOCK_N=bn), num_warps=nw, num_stages=ns)

    # 4. column kernel
    bs, nw, ns = _cfg("col_bwd")
    bs = _steps(bs, Q)
    nsb = Q // bs
    n_split, hps = _head_split(nsb * b * NC * G, pl.HPG, dev)
    dx = _empty((b, L, H, P), x.dtype, dev)
    dz = _empty((b, L, H, P), z.dtype, dev) if z is not None else dx
    dBp = _empty((n_split, b, L, G, N), torch.float32, dev)
    ddt_dir = _empty((b, H, LP), torch.float32, dev)
    dcsw = _empty((nsb, b, H, LP), torch.float32, dev)
    dDp = _empty((b * NC * nsb, H, P), torch.float32, dev) if D is not None else dtp
    launch(_ssd_bwd_col_kernel, (nsb, b * NC, G * n_split), (
        x, dy, zz, B, C, D if D is not None else A, seq, dtp, cs, dhout, hin,
        ypre if ypre is not None else x,
        dx, dz, dBp, ddt_dir, dcsw, dDp,
        L, H, P, N, G, NC, LP, pl.HPG, hps, n_split, b,
        *_strides4(x), *_strides4(dy), *_strides4(zz), *_strides4(B), *_strides4(C),
        s_seq_b, s_seq_l, *_strides4(dz)), dict(
        HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2, HAS_Z=z is not None,
        HAS_SEQ=seq_idx is not None, DOT=dot,
        CHUNK=Q, BLOCK_S=bs, BLOCK_P=pl.PF, BLOCK_N=pl.NF), num_warps=nw, num_stages=ns)

    # 5. row kernel
    bm, bk, nw, ns = _cfg("row_bwd")
    bm, bk = _steps(bm, Q), _steps(bk, Q)
    n_split_r, hps_r = _head_split((Q // bm) * b * NC * G, pl.HPG, dev)
    dCp = _empty((n_split_r, b, L, G, N), torch.float32, dev)
    dcso = _empty((b, H, LP), torch.float32, dev)
    launch(_ssd_bwd_row_kernel, (Q // bm, b * NC, G * n_split_r), (
        x, dy, zz, B, C, seq, dtp, cs, hin,
        dCp, dcso,
        L, H, P, N, G, NC, LP, pl.HPG, hps_r, n_split_r, b,
        *_strides4(x), *_strides4(dy), *_strides4(zz), *_strides4(B), *_strides4(C),
        s_seq_b, s_seq_l), dict(
        HAS_Z=z is not None, HAS_SEQ=seq_idx is not None, DOT=dot,
        CHUNK=Q, BLOCK_M=bm, BLOCK_K=bk, BLOCK_P=pl.PF, BLOCK_N=pl.NF),
        num_warps=nw, num_stages=ns)

    # 6. dt, A, dt_bias
    bh, nw = _cfg("dt_bwd")
    bh = max(1, min(_next_pow2(bh), _next_pow2(H)))
    ddt = _empty(tuple(dt.shape), dt.dtype, dev)
    dAp = _empty((b * NC, H), torch.float32, dev)
    dbp = _empty((b * NC, H), torch.float32, dev) if dt_bias is not None else dAp
    launch(_ssd_bwd_dt_kernel, (b * NC, _cdiv(H, bh)), (
        dt, A, dt_bias if dt_bias is not None else A, ddt_dir, dcsw, dcso,
        ddt, dAp, dbp,
        L, H, NC, LP, b, lo, hi,
        *dt.stride(), *ddt.stride()), dict(
        HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(softplus), HAS_LIMIT=dt_limit is not None,
        CHUNK=Q, NSB=nsb, BLOCK_H=bh), num_warps=nw)

    dB = (dBp[0] if n_split == 1 else dBp.sum(0)).to(B.dtype)
    dC = (dCp[0] if n_split_r == 1 else dCp.sum(0)).to(C.dtype)
    dA = dAp.sum(0).to(A.dtype)
    dbias = dbp.sum(0).to(dt_bias.dtype) if dt_bias is not None else None
    dD = None
    if D is not None:
        dD = dDp.sum(0)
        dD = (dD if D.dim() == 2 else dD.sum(-1)).to(D.dtype)
    return (dx, ddt, dA, dB, dC, dD, (dz if z is not None else None), dbias,
            (dh0 if has_h0 else None))


class _SSDTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, dt_softplus,
                dt_limit, return_final_state, chunk_size, need_grad):
        A = A.contiguous()
        D = D.contiguous() if D is not None else None
        dt_bias = dt_bias.contiguous() if dt_bias is not None else None
        y, hlast, dtp, cs, hin, ypre = _forward(x, dt, A, B, C, D, z, dt_bias, dt_softplus,
                                                dt_limit, initial_state, seq_idx, chunk_size,
                                                need_grad)
        if need_grad:
            ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, seq_idx, dtp, cs, hin, ypre)
            ctx.softplus = bool(dt_softplus)
            ctx.dt_limit = dt_limit
            ctx.chunk_size = chunk_size
            ctx.h0_dtype = initial_state.dtype if initial_state is not None else None
        if return_final_state:
            return y, hlast
        return y

    @staticmethod
    def backward(ctx, dy, dhlast=None):
        saved = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(saved[0])
        dx, ddt, dA, dB, dC, dD, dz, dbias, dh0 = _backward(
            saved, ctx.softplus, ctx.dt_limit, ctx.h0_dtype is not None, ctx.chunk_size, dy,
            dhlast)
        if dh0 is not None:
            dh0 = dh0.to(ctx.h0_dtype)
        return dx, ddt, dA, dB, dC, dD, dz, dbias, dh0, None, None, None, None, None, None


def ssd_scan_triton(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                    dt_limit=None, initial_state=None, seq_idx=None, return_final_state=False,
                    chunk_size=256):
    """SSD scan on Triton (module docstring: contract, kernels, sizes, what backward saves).
    Arguments are checked by the caller (``kernels.ssd.ssd_scan``) except the Triton kernels'
    own limits (``check_triton_sizes``)."""
    check_triton_sizes("ssd_scan_triton", x, B, C, z)
    b, L, H, P = x.shape
    if L == 0:  # nothing to scan: y is empty and the state passes through
        y = x.new_zeros(x.shape) + 0 * dt.sum()
        if not return_final_state:
            return y
        h = (initial_state.float() if initial_state is not None
             else torch.zeros(b, H, P, B.shape[3], device=x.device))
        return y, h
    # ctx.needs_input_grad is True under torch.no_grad() too: decide here whether the forward
    # must keep what the backward needs
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (x, dt, A, B, C, D, z, dt_bias, initial_state))
    return _SSDTriton.apply(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, dt_softplus,
                            dt_limit, return_final_state, chunk_size, need_grad)


__all__ = ["TUNING", "check_triton_sizes", "chunk_length", "ssd_scan_triton"]
