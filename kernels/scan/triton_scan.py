"""Selective scan on Triton: ``selective_scan_triton``, an autograd.Function over the forward
kernel (triton_fwd.py) and the backward kernel (triton_bwd.py).

Contract (docs/kernels.md): u, delta, z (batch, seqlen, dim), any strides; B, C
(batch, seqlen, dstate) or (batch, seqlen, ngroups, dstate) with dim % ngroups == 0;
A (dim, dstate); D, delta_bias (dim,); initial_state (batch, dim, dstate).

    dt = softplus(delta + delta_bias) (or delta + delta_bias),
    h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t   (float32, h_{-1} = initial_state or 0),
    y_t = C_t . h_t + D u_t,   y = y * silu(z) when z is given.

Returns y (u's dtype), or (y, h_last (batch, dim, dstate) float32) with ``return_final_state``.
Every tensor input gets a gradient, h_last's included.

Packed documents: ``seq_idx`` (batch, seqlen) integer, non-decreasing along each row; where it
changes a document starts and the decay exp(dt_t A) there is 0 (the kernels' HAS_SEQ_IDX; the
carry passes also flag the pieces that contain a document start, whose total decay is then 0).
The kernels read seq_idx as given (int32 or int64, any strides); without it nothing of this is
compiled in.

Saved for backward (only when a gradient is wanted): the inputs, y before the silu(z) gate
(batch, seqlen, dim) in u's dtype, and the float32 state every CK steps, (batch, seqlen / CK,
dim, dstate), with CK chosen by ``_plan`` so that this is at most about 4 floats per (b, l, d)
element: O(batch * seqlen * dim), never (b, l, d, n).

Sequence split: when (batch x dim blocks) programs would leave the GPU's SMs idle, the backward
(and, when enabled, the forward) cuts the sequence into S segments (``_split``; ``TUNING`` or
the environment variables HYBRIDSEQ_SCAN_BWD_SPLIT / HYBRIDSEQ_SCAN_FWD_SPLIT override it). A
light carry pass (triton_bwd_carry.py / _fwd_carry.py) first computes, for pieces
of the other segments, the zero-carry adjoint at the piece start (backward) or state at the piece
end (forward) and the piece's total decay; the main kernel then runs every (batch, dim block,
segment) in parallel, each folding those carries into the adjoint / state entering it. Linear
recurrences make this exact (up to float32 rounding).

The cross-block reductions of the backward (gB, gC over dim blocks; gA, gD, g(delta_bias) over
the batch and the segments) go through float32 partial buffers summed here, so results are
deterministic run to run. Only where the gB / gC partials would outgrow about twice the
(b, l, d) float32 activations (dstate > 16 with narrow dim blocks) do gB / gC use float32
atomics instead (not bit-for-bit reproducible).
"""
from __future__ import annotations

import os

import torch

from .._launch import launch
from .._ops import compiling, custom_op
from .._utils import check_selective_scan_args
from .triton_bwd import _scan_bwd_kernel
from .triton_bwd_carry import _scan_bwd_carry_kernel
from .triton_fwd import _scan_fwd_kernel
from .triton_fwd_carry import _scan_fwd_carry_kernel

# Block shapes. ``TUNING["fwd"|"bwd"]`` = (BLOCK_T, BLOCK_D, NO, num_warps[, maxnreg])
# overrides the heuristic (used by the tests and by `hybridseq bench scan --sweep`); None: the
# heuristic. The optional maxnreg caps the registers per thread (backward only).
# NO is the number of lanes that share one channel's states (each holds BLOCK_N / NO of them).
# ``TUNING["ckpt"]`` overrides the checkpoint spacing target (steps, see _plan).
# ``TUNING["split"]`` / ``TUNING["fwd_split"]``: the number of sequence segments S of the
# backward / forward (None: the HYBRIDSEQ_SCAN_BWD_SPLIT / HYBRIDSEQ_SCAN_FWD_SPLIT environment
# variable, else the heuristic ``_split``); ``TUNING["carry"]`` / ``TUNING["fwd_carry"]``: block
# shapes of their carry passes (tuples as above); ``TUNING["carry_pieces"]``: the carry passes'
# pieces per segment M (None: ``_carry_pieces``).
TUNING: dict = {"fwd": None, "bwd": None, "ckpt": None, "carry": None, "split": None,
                "carry_pieces": None, "fwd_carry": None, "fwd_split": None}
# Defaults: the fastest in H100 sweeps at B8 D2048 L2048 N16 bf16 (the carry passes take the
# main kernels' shapes; they are not swept on their own)
_DEFAULTS = {"fwd": (4, 8, 4, 1), "bwd": (4, 16, 4, 1), "carry": (4, 16, 4, 1),
             "fwd_carry": (4, 8, 4, 1)}
SPLIT_ENV = "HYBRIDSEQ_SCAN_BWD_SPLIT"
FWD_SPLIT_ENV = "HYBRIDSEQ_SCAN_FWD_SPLIT"
# Split heuristic (``_split``), per direction. fill = (batch x dim blocks programs x warps) /
# (SMs x resident warps per SM of the main kernel: the backward's is register-limited, see
# _resident_warps (8 with the default blocks, as Nsight reports on the H100: 1.94 per
# scheduler, 4 schedulers); the forward's (115 registers: 16 or 17) is fixed here). S = 1 when
# fill >= "below"; else the smallest power of two with fill * S >= "target"; at most _SPLIT_MAX
# segments of at least _SPLIT_MIN_STEPS steps. (H100, default blocks: backward fill 0.97 at
# B8 D2048 -> S = 1, 0.48 at B2 D4096 -> S = 2.) Measured on an H100 (bf16, same run,
# scripts/final_scan.sh): B2 D4096 L8192 N16 backward S = 1/2/4/8: fwd+bwd 9.31/7.61/7.99/8.23 ms;
# forward S = 1/2/4: fwd 1.47/1.22/1.42 ms; B8 D2048 L2048 N16 stays fastest at S = 1 both ways.
_SPLIT = {"bwd": {"below": 0.9, "target": 0.9},
          "fwd": {"below": 0.9, "target": 0.9, "warps_per_sm": 16}}
_SPLIT_MAX = 8
_SPLIT_MIN_STEPS = 512
# Carry passes: each segment is cut into M pieces (one program each, run in parallel) so that
# their programs reach _CARRY_WARPS_PER_SM warps per SM (about two waves: the carry kernels use
# 80-138 registers, 14-25 resident warps), pieces at least _CARRY_MIN_STEPS steps long.
_CARRY_WARPS_PER_SM = 32
_CARRY_MAX_PIECES = 16
_CARRY_MIN_STEPS = 128
# Checkpoint spacing (see _plan): at most _CKPT_FLOATS saved state floats per (b, l, d)
# element where _MAX_SUBCHUNKS backward chunks per checkpoint allow it.
_CKPT_FLOATS = 4
_MAX_SUBCHUNKS = 16
# gB / gC go through per-dim-block partials while n_dblocks * dstate <= this * dim.
_PARTIAL_LIMIT = 2
# Per-thread work elements (BLOCK_T * NI * channels per thread) the heuristic allows.
_THREAD_ELEMS = {"fwd": 32, "bwd": 32, "carry": 32, "fwd_carry": 32}
# Tests set this to fill every output with NaN before the kernels run (catches unwritten ones).
POISON_OUTPUTS = False


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def _lowbit(x: int) -> int:
    return x & -x


def _config(kind: str, seqlen: int, dim: int, nstate: int, dpg_b: int, dpg_c: int):
    """(BLOCK_T, BLOCK_D, NI, NO, num_warps) for one launch; NI * NO = next_pow2(dstate).
    dpg_b / dpg_c: channels per group of B / C (dim when ungrouped); a dim block must lie
    inside one group of each."""
    bn = _next_pow2(nstate)
    over = TUNING.get(kind)
    bt, bd, no, nw = (over if over is not None else _DEFAULTS[kind])[:4]
    if over is None and bn > 16:  # big dstate: more lanes on the state, NI = 4 per thread
        no = min(32, bn // 4)
        bd = min(bd, max(1, 32 // no) * nw)
    no = min(no, bn)
    ni = bn // no
    if over is None:  # keep BLOCK_T * NI (registers per thread) within budget for big dstate
        bt = max(1, min(bt, _THREAD_ELEMS[kind] // ni))
    bt = min(bt, _next_pow2(seqlen))
    bd = min(bd, _next_pow2(dim))
    for dpg in (dpg_b, dpg_c):
        if dpg != dim:
            bd = min(bd, _lowbit(dpg))
    return bt, bd, ni, no, nw


def _maxnreg(kind: str):
    """Register cap per thread for a kernel (``maxnreg`` compile option): the optional fifth
    entry of its TUNING / _DEFAULTS tuple; None: the compiler's choice."""
    cfg = TUNING.get(kind)
    if cfg is None:
        cfg = _DEFAULTS.get(kind, ())
    return cfg[4] if len(cfg) > 4 and cfg[4] else None


def _launch_opts(kind: str) -> dict:
    cap = _maxnreg(kind)
    return {"maxnreg": cap} if cap else {}


def _resident_warps(kind, cfg):
    """Warps of this kernel that fit on one SM, from its registers per thread: the register cap
    when set, else the ptxas count measured for its per-thread tile size (sm_90, triton 3.9:
    the backward uses 249-251 registers at 32 tile elements per thread (BLOCK_T 4,
    BLOCK_D 16, NO 4, 1 warp), 163-168 at 16; the forward 115 at 16); 65536 registers per SM,
    allocated per warp in steps of 8 per thread."""
    if kind == "fwd":
        return _SPLIT["fwd"]["warps_per_sm"]
    bt, bd, ni, no, nw = cfg
    regs = _maxnreg(kind)
    if regs is None:
        elems = bt * ni * max(1, bd * no // (32 * nw))
        regs = 256 if elems >= 32 else (168 if elems >= 16 else 128)
    return max(1, min(64, 65536 // (-(-regs // 8) * 8 * 32)))


def _empty(shape, dtype, device):
    if POISON_OUTPUTS:  # NaN, or for integer buffers a nonzero value
        fill = float("nan") if dtype.is_floating_point else 7
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _seq_args(seq_idx, dummy):
    """The kernels' (seq_ptr, s_q_b, s_q_l) arguments: seq_idx and its strides, or a dummy
    pointer (never read) and zeros."""
    if seq_idx is None:
        return dummy, 0, 0
    return seq_idx, seq_idx.stride(0), seq_idx.stride(1)


def _bc_strides(X: torch.Tensor):
    """(s_b, s_l, s_g, s_n) of B or C, (b, l, n) taken as one group."""
    if X.dim() == 3:
        return X.stride(0), X.stride(1), 0, X.stride(2)
    return X.stride(0), X.stride(1), X.stride(2), X.stride(3)


def _groups(X, d):
    """Channels per group of B or C: dim for (b, l, n), dim // g for (b, l, g, n)."""
    return d if X.dim() == 3 else d // X.shape[2]


def _plan(l, d, n, dpg_b, dpg_c, for_grad=True):
    """Launch plan shared by forward and backward: both configs and the checkpoint spacing CK.

    With gradients the forward saves the state every CK steps (a segment): b * l * d * n / CK
    floats. CK = R * (backward BLOCK_T) with R the smallest count (at most _MAX_SUBCHUNKS) that
    keeps this within _CKPT_FLOATS floats per (b, l, d) element, so the saved states stay
    O(b * l * d) for any dstate. With R > 1 the backward recomputes the states at its chunk
    starts from each segment's checkpoint (one extra forward pass, a small scratch buffer;
    measured slower on the H100), so dstate <= 16 gets R = 1. The forward chunk is cut to CK
    when it is longer."""
    fwd = _config("fwd", l, d, n, dpg_b, dpg_c)
    bwd = _config("bwd", l, d, n, dpg_b, dpg_c)
    tb = bwd[0]
    if TUNING.get("ckpt"):
        r = max(1, TUNING["ckpt"] // tb)
    else:
        r = -(-_next_pow2(n) // (_CKPT_FLOATS * tb))
    ck = tb * min(_MAX_SUBCHUNKS, _next_pow2(r))
    if for_grad and fwd[0] > ck:
        fwd = (ck,) + tuple(fwd[1:])
    ck = max(ck, fwd[0])
    return fwd, bwd, ck


def _fwd(u, delta, A, B, C, D, z, delta_bias, softplus, initial_state, want_hlast, want_ckpt,
         seq_idx=None):
    b, l, d = u.shape
    n = A.shape[1]
    dpg_b, dpg_c = _groups(B, d), _groups(C, d)
    (bt, bd, ni, no, nw), _, ck = _plan(l, d, n, dpg_b, dpg_c, for_grad=want_ckpt)
    n_chunks = triton_cdiv(l, bt)
    n_seg = triton_cdiv(l, ck)
    dev = u.device
    y = _empty((b, l, d), u.dtype, dev)
    hlast = _empty((b, d, n), torch.float32, dev) if want_hlast else y
    ckpt = _empty((b, n_seg, d, n), torch.float32, dev) if want_ckpt else y
    # y before the silu(z) gate, for the gradient of z (saves recomputing C . h backward)
    ypre = _empty((b, l, d), u.dtype, dev) if (want_ckpt and z is not None) else y
    h0 = initial_state.float().contiguous() if initial_state is not None else y
    zz = z if z is not None else u
    n_split, seg_ch = _split("fwd", b, l, d, n, dpg_b, dpg_c, dev, for_grad=want_ckpt)
    if n_split > 1:
        m, loc, dtsum, rst = _fwd_carries(u, delta, A, B, delta_bias, softplus, n_split,
                                          seg_ch * bt, seq_idx)
    else:  # float32 stand-ins: the kernel compiled for S = 1 serves every S
        m, loc = 1, torch.empty(1, dtype=torch.float32, device=dev)
        dtsum = rst = loc
    grid = (b, triton_cdiv(d, bd), n_split)
    q, s_q_b, s_q_l = _seq_args(seq_idx, u)
    launch(_scan_fwd_kernel, grid, (
        u, delta, A, B, C, D if D is not None else u, zz,
        delta_bias if delta_bias is not None else u, h0, loc, dtsum,
        q, rst, y, hlast, ckpt, ypre,
        l, d, n, dpg_b, dpg_c, n_chunks, n_seg, seg_ch, m,
        *u.stride(), *delta.stride(), *zz.stride(), *_bc_strides(B), *_bc_strides(C),
        *y.stride(), s_q_b, s_q_l), dict(
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(softplus), HAS_H0=initial_state is not None, STORE_HLAST=want_hlast,
        STORE_CKPT=want_ckpt, CK_R=ck // bt, STORE_YPRE=want_ckpt and z is not None,
        HAS_SEQ_IDX=seq_idx is not None,
        BLOCK_T=bt, BLOCK_D=bd, NI=ni, NO=no), num_warps=nw)
    return (y, (hlast if want_hlast else None), (ckpt if want_ckpt else None),
            (ypre if want_ckpt and z is not None else None))


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _reduce_bc(part, X, d, bd, atomic):
    """The gradient of B or C ((b, l, n) or (b, l, g, n), X's dtype) from the kernel's float32
    buffer: (b, l, g, n) atomics, or (n_dblocks, b, l, n) partials, one per dim block (a
    block lies inside one group: sum each group's blocks)."""
    if atomic:
        out = part
    else:
        b, l, n = part.shape[1:]
        g = 1 if X.dim() == 3 else X.shape[2]
        if g == 1:
            out = part.sum(0)
        else:  # bd divides the group width d // g
            out = part.view(g, (d // g) // bd, b, l, n).sum(1).permute(1, 2, 0, 3)
    return out.reshape(X.shape).to(X.dtype)


_SM_COUNT: dict = {}


def _sm_count(device) -> int:
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _requested_split(kind):
    """S asked for by TUNING (["split"] backward, ["fwd_split"] forward) or the environment
    variable (HYBRIDSEQ_SCAN_BWD_SPLIT / HYBRIDSEQ_SCAN_FWD_SPLIT); None: automatic."""
    key, env_name = ("split", SPLIT_ENV) if kind == "bwd" else ("fwd_split", FWD_SPLIT_ENV)
    req = TUNING.get(key)
    if req is None:
        env = os.environ.get(env_name, "").strip().lower()
        if env in ("", "auto", "0"):
            return None
        try:
            req = int(env)
        except ValueError:
            raise ValueError(f"{env_name}={env!r}: expected a positive integer or 'auto'") \
                from None
    if int(req) < 1:
        raise ValueError(f"sequence split {req!r}: expected a positive integer "
                         f"(TUNING[{key!r}] or {env_name})")
    return int(req)


def _split(kind, b, l, d, n, dpg_b, dpg_c, device, for_grad=True):
    """(S, SEG_CH): the number of sequence segments of the backward (kind "bwd") or forward
    ("fwd") and their length in that kernel's chunks. Segments start on checkpoint boundaries
    (SEG_CH is a multiple of the checkpoint spacing in chunks), so S is at most the number of
    checkpoint segments; S = 1 for seqlen 1. Automatic choice (``_SPLIT``): S = 1 when the
    batch x dim blocks programs already fill the SMs, else the smallest power of two that does."""
    fwd, bwd, ck = _plan(l, d, n, dpg_b, dpg_c, for_grad=for_grad)
    bt, bd, _, _, nw = bwd if kind == "bwd" else fwd
    n_chunks = triton_cdiv(l, bt)
    ck_r = max(1, ck // bt) if (kind == "bwd" or for_grad) else 1
    n_ck = triton_cdiv(n_chunks, ck_r)  # checkpoint segments
    req = _requested_split(kind)
    if req is None:
        req = 1
        cfg = _SPLIT[kind]
        slots = _sm_count(device) * _resident_warps(kind, bwd if kind == "bwd" else fwd)
        if slots and b * triton_cdiv(d, bd) * nw < cfg["below"] * slots:
            fill = b * triton_cdiv(d, bd) * nw / slots
            max_s = min(_SPLIT_MAX, max(1, l // _SPLIT_MIN_STEPS))
            while fill * req < cfg["target"] and req * 2 <= max_s:
                req *= 2
    seg_ck = triton_cdiv(n_ck, min(req, n_ck))
    seg_ch = seg_ck * ck_r
    return triton_cdiv(n_chunks, seg_ch), seg_ch


def _bwd_split(b, l, d, n, dpg_b, dpg_c, device):
    """(S, SEG_CH) of the backward (see _split)."""
    return _split("bwd", b, l, d, n, dpg_b, dpg_c, device)


def bwd_split(u, A, B, C):
    """The number of sequence segments the backward would use for these inputs (benchmarks)."""
    b, l, d = u.shape
    return _bwd_split(b, l, d, A.shape[1], _groups(B, d), _groups(C, d), u.device)[0]


def fwd_split(u, A, B, C, for_grad=True):
    """The number of sequence segments the forward would use (for_grad: saving checkpoints)."""
    b, l, d = u.shape
    return _split("fwd", b, l, d, A.shape[1], _groups(B, d), _groups(C, d), u.device,
                  for_grad)[0]


def _carry_pieces(b, n_dblocks, nw, n_split, seg_len, device):
    """M, the pieces per segment of a carry pass (TUNING["carry_pieces"] overrides): the
    smallest power of two whose (batch, dim blocks, (S - 1) M) programs give every SM
    _CARRY_WARPS_PER_SM warps."""
    if TUNING.get("carry_pieces"):
        return max(1, min(int(TUNING["carry_pieces"]), seg_len))
    slots = _sm_count(device) * _CARRY_WARPS_PER_SM
    warps = b * n_dblocks * nw * (n_split - 1)
    m = 1
    while (warps * m < slots and m * 2 <= _CARRY_MAX_PIECES
           and seg_len // (m * 2) >= _CARRY_MIN_STEPS):
        m *= 2
    return m


def _carry_setup(kind, x, n, dpg, n_split, seg_len, seq_idx):
    """A carry pass's block shape (kind "fwd_carry" / "carry"), dim blocks, pieces per segment M
    and its outputs: float32 loc (b, (S - 1) M, d, n) and dtsum (b, (S - 1) M, d), and with
    seq_idx the int32 flags rst (b, (S - 1) M) of the pieces that contain a document start
    (else loc, a stand-in never written); x (b, l, d)."""
    b, l, d = x.shape
    cfg = _config(kind, l, d, n, dpg, dpg)
    n_db = triton_cdiv(d, cfg[1])
    m = _carry_pieces(b, n_db, cfg[4], n_split, seg_len, x.device)
    loc = _empty((b, (n_split - 1) * m, d, n), torch.float32, x.device)
    dtsum = _empty((b, (n_split - 1) * m, d), torch.float32, x.device)
    rst = (_empty((b, (n_split - 1) * m), torch.int32, x.device) if seq_idx is not None
           else loc)
    return cfg, n_db, m, loc, dtsum, rst


def _fwd_carries(u, delta, A, B, delta_bias, softplus, n_split, seg_len, seq_idx=None):
    """Carry pass of the split forward: M (pieces per segment), float32 (loc (b, (S - 1) M,
    d, n), dtsum (b, (S - 1) M, d)) and the document-start flags rst (see _carry_setup) for
    the M pieces of each segment 0 .. S - 2 (triton_fwd_carry.py)."""
    b, l, d = u.shape
    n = A.shape[1]
    dpg_b = _groups(B, d)
    (bt, bd, ni, no, nw), n_db, m, loc, dtsum, rst = _carry_setup(
        "fwd_carry", u, n, dpg_b, n_split, seg_len, seq_idx)
    q, s_q_b, s_q_l = _seq_args(seq_idx, u)
    launch(_scan_fwd_carry_kernel, (b, n_db, (n_split - 1) * m), (
        u, delta, A, B, delta_bias if delta_bias is not None else u, q, loc, dtsum, rst,
        l, d, n, dpg_b, seg_len, triton_cdiv(seg_len, m), m,
        *u.stride(), *delta.stride(), *_bc_strides(B), s_q_b, s_q_l), dict(
        HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus),
        HAS_SEQ_IDX=seq_idx is not None,
        BLOCK_T=bt, BLOCK_D=bd, NI=ni, NO=no), num_warps=nw)
    return m, loc, dtsum, rst


def _carries(delta, A, C, z, delta_bias, softplus, dout, n_split, seg_len, seq_idx=None):
    """Carry pass of the split backward: M (pieces per segment), float32 (loc (b, (S - 1) M,
    d, n), dtsum (b, (S - 1) M, d)) and the document-start flags rst (see _carry_setup), for
    the M pieces of each segment 1 .. S - 1 (triton_bwd_carry.py)."""
    b, l, d = delta.shape
    n = A.shape[1]
    dpg_c = _groups(C, d)
    (bt, bd, ni, no, nw), n_db, m, loc, dtsum, rst = _carry_setup(
        "carry", delta, n, dpg_c, n_split, seg_len, seq_idx)
    zz = z if z is not None else delta
    q, s_q_b, s_q_l = _seq_args(seq_idx, delta)
    launch(_scan_bwd_carry_kernel, (b, n_db, (n_split - 1) * m), (
        delta, A, C, zz, delta_bias if delta_bias is not None else delta, dout, q, loc, dtsum,
        rst, l, d, n, dpg_c, seg_len, triton_cdiv(seg_len, m), m,
        *delta.stride(), *zz.stride(), *_bc_strides(C), *dout.stride(), s_q_b, s_q_l), dict(
        HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus),
        HAS_SEQ_IDX=seq_idx is not None,
        BLOCK_T=bt, BLOCK_D=bd, NI=ni, NO=no), num_warps=nw)
    return m, loc, dtsum, rst


def _dz_buffer(z, du):
    """(dz, laid out like z). When z is the strided half of a contiguous base twice its size (the
    Mamba block's z = in_proj(x)[..., d_inner:]), dz is the same half of a new buffer shaped like
    that base: the kernel writes it with z's offsets, and the caller that split the base can take
    the whole buffer as the base's gradient and fill the other half itself (``_ConvProjFn`` does),
    instead of copying dz into a new (b, l, 2 d) gradient. Else a contiguous (b, l, d) tensor."""
    if z is None:
        return du, False
    base = z._base
    if (z.stride()[1:] != (z.shape[2], 1) and base is not None and base.is_contiguous()
            and base.dtype == z.dtype and base.numel() == 2 * z.numel()):
        buf = _empty(tuple(base.shape), z.dtype, z.device)
        return buf.as_strided(z.shape, z.stride(), z.storage_offset() - base.storage_offset()), True
    return _empty(tuple(z.shape), z.dtype, z.device), False


def _bwd(saved, softplus, has_h0, dout, dhlast, dz_like_z=True):
    u, delta, A, B, C, D, z, delta_bias, ckpt, ypre, seq_idx = saved
    b, l, d = u.shape
    n = A.shape[1]
    dpg_b, dpg_c = _groups(B, d), _groups(C, d)
    _, (bt, bd, ni, no, nw), ck = _plan(l, d, n, dpg_b, dpg_c)
    n_chunks = triton_cdiv(l, bt)
    dev = u.device
    n_dblocks = triton_cdiv(d, bd)
    n_split, seg_ch = _bwd_split(b, l, d, n, dpg_b, dpg_c, dev)
    m, loc, dtsum, rst = 1, None, None, None
    if n_split > 1:
        m, loc, dtsum, rst = _carries(delta, A, C, z, delta_bias, softplus, dout, n_split,
                                      seg_ch * bt, seq_idx)
    du = _empty((b, l, d), u.dtype, dev)
    ddelta = _empty((b, l, d), delta.dtype, dev)
    # dz_like_z False (the custom op): a contiguous dz, the layout its shape function states
    dz, dz_like_z = _dz_buffer(z, du) if dz_like_z or z is None else \
        (_empty(tuple(z.shape), z.dtype, z.device), False)
    # gB / gC: deterministic per-dim-block partials unless they would outgrow about twice the
    # (b, l, d) float32 activations (big dstate, narrow blocks); then float32 atomics
    atomic = n_dblocks * n > _PARTIAL_LIMIT * d
    if atomic:
        dBp = torch.zeros((b, l, d // dpg_b, n), dtype=torch.float32, device=dev)
        dCp = torch.zeros((b, l, d // dpg_c, n), dtype=torch.float32, device=dev)
    else:
        dBp = _empty((n_dblocks, b, l, n), torch.float32, dev)
        dCp = _empty((n_dblocks, b, l, n), torch.float32, dev)
    dAp = _empty((n_split, b, d, n), torch.float32, dev)
    dDp = _empty((n_split, b, d), torch.float32, dev) if D is not None else dAp
    dbp = _empty((n_split, b, d), torch.float32, dev) if delta_bias is not None else dAp
    dh0 = _empty((b, d, n), torch.float32, dev) if has_h0 else dAp
    # per program: the states at the sub-chunk starts of one checkpoint segment (CK_R > 1)
    scratch = (torch.empty((b, n_dblocks, n_split, ck // bt, bd * ni * no), dtype=torch.float32,
                           device=dev) if ck > bt else dAp)
    zz = z if z is not None else u
    q, s_q_b, s_q_l = _seq_args(seq_idx, u)
    launch(_scan_bwd_kernel, (b, n_dblocks, n_split), (
        u, delta, A, B, C, D if D is not None else u, zz,
        delta_bias if delta_bias is not None else u, ckpt, dout,
        dhlast.float().contiguous() if dhlast is not None else dAp,
        ypre if ypre is not None else du,
        loc if n_split > 1 else dAp, dtsum if n_split > 1 else dAp,
        q, rst if n_split > 1 else dAp,
        du, ddelta, dz, dBp, dCp, dAp, dDp, dbp, dh0, scratch,
        l, d, n, dpg_b, dpg_c, n_chunks, ckpt.shape[1], seg_ch, m,
        *u.stride(), *delta.stride(), *zz.stride(), *_bc_strides(B), *_bc_strides(C),
        *dout.stride(), s_q_b, s_q_l), dict(
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(softplus), HAS_DHLAST=dhlast is not None, STORE_DH0=has_h0,
        BLOCK_T=bt, BLOCK_D=bd, NI=ni, NO=no, CK_R=ck // bt, BC_ATOMIC=atomic,
        UNIT_LD=all(x.stride()[1:] == (d, 1) for x in (u, delta, dout)),
        UNIT_Z=zz.stride()[1:] == (d, 1), DZ_LIKE_Z=dz_like_z,
        HAS_SEQ_IDX=seq_idx is not None),
        num_warps=nw, **_launch_opts("bwd"))
    dB = _reduce_bc(dBp, B, d, bd, atomic)
    dC = _reduce_bc(dCp, C, d, bd, atomic)
    dA = dAp.sum((0, 1)).to(A.dtype)
    dD = dDp.sum((0, 1)).to(D.dtype) if D is not None else None
    dbias = dbp.sum((0, 1)).to(delta_bias.dtype) if delta_bias is not None else None
    return du, ddelta, dA, dB, dC, dD, (dz if z is not None else None), dbias, \
        (dh0 if has_h0 else None)


class _SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                return_final_state, need_grad, seq_idx):
        A = A.contiguous()
        D = D.contiguous() if D is not None else None
        delta_bias = delta_bias.contiguous() if delta_bias is not None else None
        y, hlast, ckpt, ypre = _fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                    initial_state, return_final_state, need_grad, seq_idx)
        if need_grad:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt, ypre, seq_idx)
            ctx.softplus = bool(delta_softplus)
            ctx.has_h0 = initial_state is not None
            ctx.h0_dtype = initial_state.dtype if initial_state is not None else None
        if return_final_state:
            return y, hlast
        return y

    @staticmethod
    def backward(ctx, dy, dhlast=None):
        saved = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(saved[0])
        du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = _bwd(
            saved, ctx.softplus, ctx.has_h0, dy.contiguous() if dy.stride(-1) != 1 else dy, dhlast)
        if dh0 is not None:
            dh0 = dh0.to(ctx.h0_dtype)
        return du, ddelta, dA, dB, dC, dD, dz, dbias, None, dh0, None, None, None


# ------------------------------------------------------------------ compiled: the custom ops
def _none(t, ref):
    """An empty stand-in for an absent output (custom ops return tensors only)."""
    return t if t is not None else ref.new_empty(0)


def _fwd_shapes(u, A, B, C, want_ckpt):
    """The shapes of (hlast, ckpt) ``_fwd`` makes: the launch plan's checkpoint spacing."""
    b, l, d = u.shape
    n = A.shape[1]
    l_i, d_i, n_i = int(l), int(d), int(n)  # the plan is a host computation on sizes
    _, _, ck = _plan(l_i, d_i, n_i, _groups(B, d_i), _groups(C, d_i), for_grad=want_ckpt)
    return (b, d, n), (b, triton_cdiv(l_i, ck), d, n)


@custom_op("selective_scan_fwd")
def _fwd_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
            C: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None,
            delta_bias: torch.Tensor | None, softplus: bool, initial_state: torch.Tensor | None,
            want_hlast: bool, want_ckpt: bool, seq_idx: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, hlast, ckpt, ypre) of ``_fwd``; empty stand-ins for those not made."""
    A = A.contiguous()
    D = D.contiguous() if D is not None else None
    delta_bias = delta_bias.contiguous() if delta_bias is not None else None
    y, hlast, ckpt, ypre = _fwd(u, delta, A, B, C, D, z, delta_bias, softplus, initial_state,
                                want_hlast, want_ckpt, seq_idx)
    return y, _none(hlast, u), _none(ckpt, u), _none(ypre, u)


@_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, softplus, initial_state, want_hlast, want_ckpt,
      seq_idx):
    hl_shape, ck_shape = _fwd_shapes(u, A, B, C, want_ckpt)
    f32 = torch.float32
    e = u.new_empty(0)
    return (u.new_empty(u.shape), u.new_empty(hl_shape, dtype=f32) if want_hlast else e,
            u.new_empty(ck_shape, dtype=f32) if want_ckpt else e,
            u.new_empty(u.shape) if want_ckpt and z is not None else e)


@custom_op("selective_scan_bwd")
def _bwd_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
            C: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None,
            delta_bias: torch.Tensor | None, ckpt: torch.Tensor, ypre: torch.Tensor | None,
            seq_idx: torch.Tensor | None, softplus: bool, has_h0: bool, dout: torch.Tensor,
            dhlast: torch.Tensor | None) -> list[torch.Tensor]:
    """[du, ddelta, dA, dB, dC, dD, dz, dbias, dh0] of ``_bwd`` (dz contiguous); empty
    stand-ins for the inputs that are absent."""
    A = A.contiguous()
    D = D.contiguous() if D is not None else None
    delta_bias = delta_bias.contiguous() if delta_bias is not None else None
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    grads = _bwd((u, delta, A, B, C, D, z, delta_bias, ckpt, ypre, seq_idx), softplus, has_h0,
                 dout, dhlast, dz_like_z=False)
    return [_none(g, u) for g in grads]


@_bwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, ckpt, ypre, seq_idx, softplus, has_h0, dout, dhlast):
    e = u.new_empty(0)
    b, _, d = u.shape
    return [u.new_empty(u.shape), delta.new_empty(delta.shape), A.new_empty(A.shape),
            B.new_empty(B.shape), C.new_empty(C.shape),
            D.new_empty(D.shape) if D is not None else e,
            z.new_empty(z.shape) if z is not None else e,
            delta_bias.new_empty(delta_bias.shape) if delta_bias is not None else e,
            u.new_empty((b, d, A.shape[1]), dtype=torch.float32) if has_h0 else e]


def _setup(ctx, inputs, output):
    (u, delta, A, B, C, D, z, delta_bias, softplus, initial_state, _, want_ckpt,
     seq_idx) = inputs
    _, _, ckpt, ypre = output
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt,
                          ypre if z is not None else None, seq_idx)
    ctx.cfg = (bool(softplus), initial_state is not None,
               initial_state.dtype if initial_state is not None else None, want_ckpt,
               bool(inputs[10]))


def _backward(ctx, dy, dhlast, _dckpt, _dypre):
    u, delta, A, B, C, D, z, delta_bias, ckpt, ypre, seq_idx = ctx.saved_tensors
    softplus, has_h0, h0_dtype, want_ckpt, want_hlast = ctx.cfg
    if not want_hlast:  # the stand-in output's gradient (None, or an empty tensor)
        dhlast = None
    if not want_ckpt:
        raise RuntimeError("selective_scan: the forward ran without saving for a backward "
                           "(no input required grad then)")
    if dy is None:
        dy = torch.zeros_like(u)
    du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = _bwd_op(
        u, delta, A, B, C, D, z, delta_bias, ckpt, ypre, seq_idx, softplus, has_h0, dy, dhlast)
    return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
            dbias if delta_bias is not None else None, None,
            dh0.to(h0_dtype) if has_h0 else None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup)


def _scan_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
             return_final_state, need_grad, seq_idx):
    """``_SelectiveScanTriton.apply`` through the custom op (what ``torch.compile`` traces)."""
    y, hlast, _, _ = _fwd_op(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                             initial_state, bool(return_final_state), bool(need_grad), seq_idx)
    return (y, hlast) if return_final_state else y


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                          delta_softplus=False, initial_state=None, return_final_state=False,
                          seq_idx=None):
    """Selective scan on Triton (module docstring: contract, outputs, what backward saves)."""
    dims = check_selective_scan_args("selective_scan_triton", u, delta, A, B, C, D, z,
                                     delta_bias, initial_state, seq_idx)
    return run_selective_scan_triton(dims, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                     initial_state, return_final_state, seq_idx)


def run_selective_scan_triton(dims, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                              delta_softplus=False, initial_state=None, return_final_state=False,
                              seq_idx=None):
    """``selective_scan_triton`` on arguments already checked (``dims``: what
    ``check_selective_scan_args`` returned for them); ``kernels.selective_scan`` calls this so
    that a call checks its arguments once."""
    if dims.seqlen == 0:  # nothing to scan: y is empty and the state passes through
        y = u.new_zeros(u.shape) + 0 * delta.sum()
        if not return_final_state:
            return y
        h = (initial_state.float() if initial_state is not None
             else torch.zeros(dims.batch, dims.dim, dims.dstate, device=u.device))
        return y, h
    # ctx.needs_input_grad is True under torch.no_grad() too: decide here whether the
    # forward must save its checkpoints for a backward
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (u, delta, A, B, C, D, z, delta_bias, initial_state))
    fn = _scan_op if compiling() else _SelectiveScanTriton.apply
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
              return_final_state, need_grad, seq_idx)
