"""Triton one-token decode attention over the visible slots of a KV cache (split-K, "flash
decoding"), inference only.

Same contract as ``ref.py``: for batch row b and query head i of KV head j = i // G (G = n_heads //
n_kv_heads), softmax(scale * q . k) v over the slots 0 .. min(pos, cap - 1) of k_cache[b, j],
v_cache[b, j].

Two kernels:

- ``_decode_split_kernel``, grid (batch * n_kv_heads, n_splits). A program takes one KV head and
  the G query heads that read it (each key and value is loaded once for the whole GQA group) and
  the slots [split * split_len, (split + 1) * split_len) of its cache row, cut at the visible
  end. It loads ``pos`` from memory (so one CUDA graph serves every position) and walks its slots
  in blocks of BLOCK_N keeping an online softmax in float32: running max m (log2 units), running
  sum l and accumulator acc = sum_s 2^(x_s - m) v_s. Masked loads never touch a slot past the
  visible end, and a split that starts past it loads no key and stores nothing. The scores and
  the weighted sum are two ``tl.dot`` on tensor cores with fp32 accumulation, the G query rows
  padded to 16: for 16-bit caches q and the softmax weights are rounded to the cache's dtype (as
  in flash attention); for float32 caches the dots run as three TF32 products ("tf32x3",
  float32-level error). With one split the program normalises and writes o itself; otherwise it
  writes (m, l, acc) to float32 scratch.
- ``_decode_merge_kernel``, grid (batch * n_heads,): merges the splits that did work with the
  log-sum-exp rule, o = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s, M = max_s m_s.

The number of splits comes from the static shape only (cap, batch * n_kv_heads, the SM count):
enough programs to fill the GPU when every slot is visible; the number that do work grows with
pos. The scratch is allocated per call (the caching allocator makes that cheap, and inside CUDA
graph capture it comes from the graph's pool).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._launch import launch
from .._ops import compiling, custom_op
from .._utils import check_decode_attention_args
from ..backend import interpreting

__all__ = ["decode_attention_triton", "decode_plan", "run_decode_attention_triton"]

_INTERPRET = interpreting()  # Triton read the same variable when it decorated the kernels
_LOG2E = 1.4426950408889634
_FP16 = (torch.float16, torch.bfloat16)

# Tuning (H100, triton 3.6): programs per SM wanted when every slot is visible, the most splits,
# the fewest slots a split may have, the split kernel's warps and software-pipeline stages, and
# the precision of the dots on float32 caches: "tf32x3" (three TF32 products, float32-level error,
# 2-3x faster there than "ieee" FMA dots, which also ran out of shared memory at head_dim 256).
PROGRAMS_PER_SM = 2
MAX_SPLITS = 128
MIN_SPLIT_LEN = 256
NUM_WARPS = 4
NUM_STAGES = 2
FP32_PRECISION = "tf32x3"


def _alloc(shape, dtype, device):
    """Uninitialised buffer (tests replace this to poison outputs and scratch with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _dot(a, b, NATIVE: tl.constexpr, PREC: tl.constexpr):
    """a @ b with fp32 accumulation: a tensor-core dot (PREC: Triton's input_precision for fp32
    operands, None for 16-bit ones); under Triton's interpreter (NATIVE False: its bf16 dots
    multiply the raw bits) the same products in fp32."""
    if NATIVE:
        return tl.dot(a, b, input_precision=PREC)
    return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")


@triton.jit
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, m_ptr, l_ptr, acc_ptr,
                         HKV, CAP, HEAD_DIM, SPLIT_LEN, N_SPLITS, qk_scale,
                         s_qb, s_qh, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                         s_pos, s_ob, s_oh, s_od,
                         G: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr,
                         BLOCK_N: tl.constexpr, PREC: tl.constexpr, DIRECT: tl.constexpr,
                         INTERPRET: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // HKV).to(tl.int64)
    j = (pid % HKV).to(tl.int64)
    # visible slots 0 .. n_vis - 1 (pos < cap for a linear cache; a ring buffer is full once
    # pos >= cap - 1); int64 until clamped, pos can exceed int32 in a long ring-buffer decode
    pos = tl.load(pos_ptr + b * s_pos).to(tl.int64)
    n_vis = tl.minimum(pos + 1, CAP).to(tl.int32)
    lo = split * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, n_vis)

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    gmask = g < G
    dmask = d < HEAD_DIM
    heads = j * G + g
    q = tl.load(q_ptr + b * s_qb + heads[:, None] * s_qh + d[None, :] * s_qd,
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    q = q.to(k_ptr.dtype.element_ty)  # the dot's operands share a dtype: the cache's
    k_row = k_ptr + b * s_kb + j * s_kh
    v_row = v_ptr + b * s_vb + j * s_vh

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        nmask = n < hi
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_row + n[:, None] * s_kn + d[None, :] * s_kd, mask=kv_mask, other=0.0)
        x = _dot(q, tl.trans(k), not INTERPRET, PREC)  # (G_PAD, BLOCK_N) fp32
        # scores in log2 units; slots past the visible end get -inf (every block has at least
        # one visible slot, so the running max stays finite)
        x = tl.where(nmask[None, :], x * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(x - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_row + n[:, None] * s_vn + d[None, :] * s_vd, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, not INTERPRET, PREC)
        m_i = m_new

    if DIRECT:  # one split: it saw every visible slot (n_vis >= 1, so l_i > 0)
        o = acc / l_i[:, None]
        tl.store(o_ptr + b * s_ob + heads[:, None] * s_oh + d[None, :] * s_od,
                 o.to(o_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])
    else:
        # splits past the visible end store nothing; the merge skips them
        keep = gmask & ((g * 0 + lo) < n_vis)
        row = (b * HKV * G + heads) * N_SPLITS + split  # scratch row of (b, head, split)
        tl.store(m_ptr + row, m_i, mask=keep)
        tl.store(l_ptr + row, l_i, mask=keep)
        tl.store(acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc,
                 mask=keep[:, None] & dmask[None, :])


@triton.jit
def _decode_merge_kernel(m_ptr, l_ptr, acc_ptr, pos_ptr, o_ptr,
                         H, CAP, HEAD_DIM, SPLIT_LEN, N_SPLITS, s_pos, s_ob, s_oh, s_od,
                         S_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # b * H + head
    b = pid // H
    h = pid % H
    pos = tl.load(pos_ptr + b * s_pos).to(tl.int64)
    n_vis = tl.minimum(pos + 1, CAP).to(tl.int32)
    n_act = (n_vis + SPLIT_LEN - 1) // SPLIT_LEN  # splits that did work: 0 .. n_act - 1
    base = pid * N_SPLITS

    s = tl.arange(0, S_PAD)
    m = tl.load(m_ptr + base + s, mask=s < n_act, other=float("-inf"))
    m_max = tl.max(m, axis=0)  # finite: split 0 always has a visible slot
    lsum = tl.load(l_ptr + base + s, mask=s < n_act, other=0.0)
    denom = tl.sum(tl.exp2(m - m_max) * lsum, axis=0)

    d = tl.arange(0, D_PAD)
    dmask = d < HEAD_DIM
    acc = tl.zeros([D_PAD], tl.float32)
    for s0 in range(0, n_act, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        smask = ss < n_act
        ms = tl.load(m_ptr + base + ss, mask=smask, other=float("-inf"))
        a = tl.load(acc_ptr + (base + ss)[:, None] * HEAD_DIM + d[None, :],
                    mask=smask[:, None] & dmask[None, :], other=0.0)
        acc += tl.sum(tl.exp2(ms - m_max)[:, None] * a, axis=0)
    o = acc / denom
    tl.store(o_ptr + b * s_ob + h * s_oh + d * s_od, o.to(o_ptr.dtype.element_ty), mask=dmask)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_sms(device) -> int:
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None
                         else torch.cuda.current_device())
    return 4  # the interpreter on CPU: a small pretend GPU, so the default plan splits too


def decode_plan(batch: int, n_heads: int, n_kv_heads: int, cap: int, head_dim: int,
                dtype: torch.dtype, n_sms: int, *, n_splits=None, block_n=None) -> dict:
    """Launch parameters from the static shape only (never from pos): the padded group and head
    sizes (a tensor-core dot needs >= 16 rows and a reduction of >= 16), the key block, the
    dot's fp32 precision, and the split of the cap slots into ``n_splits`` splits of
    ``split_len`` slots (a multiple of the block; n_splits * split_len >= cap, and every split
    starts below cap). ``n_splits`` / ``block_n`` force those values (tests, tuning)."""
    return dict(_plan(batch, n_heads, n_kv_heads, cap, head_dim, dtype, n_sms, n_splits,
                      block_n, _tunables()))


def _tunables() -> tuple:
    return PROGRAMS_PER_SM, MAX_SPLITS, MIN_SPLIT_LEN, FP32_PRECISION


@functools.lru_cache(maxsize=1024)
def _plan(batch, n_heads, n_kv_heads, cap, head_dim, dtype, n_sms, n_splits, block_n, tunables):
    """``decode_plan``, cached per shape (and per value of the module's tunables, so changing
    one takes effect): a decode step asks for the same plan every time. Do not modify the
    returned dict."""
    g = n_heads // n_kv_heads
    d_pad = max(16, triton.next_power_of_2(head_dim))
    g_pad = max(16, triton.next_power_of_2(g))
    if block_n is None:  # about 8192 elements per key/value block (fp32: at most 64 keys)
        block_n = 16 if _INTERPRET else max(32, min(128 if dtype in _FP16 else 64, 8192 // d_pad))
    n_blocks = triton.cdiv(cap, block_n)
    if n_splits is None:  # enough programs to fill the GPU when every slot is visible
        n_splits = min(triton.cdiv(PROGRAMS_PER_SM * n_sms, max(1, batch * n_kv_heads)),
                       MAX_SPLITS)
        if not _INTERPRET:  # splits of at least MIN_SPLIT_LEN slots: the merge stays cheap
            n_splits = min(n_splits, max(1, cap // MIN_SPLIT_LEN))
    n_splits = max(1, min(int(n_splits), n_blocks))
    split_len = triton.cdiv(n_blocks, n_splits) * block_n
    n_splits = triton.cdiv(cap, split_len)  # drop splits that would start at or past cap
    prec = FP32_PRECISION if dtype == torch.float32 else None
    return dict(G=g, G_PAD=g_pad, D_PAD=d_pad, BLOCK_N=block_n, PREC=prec,
                n_splits=n_splits, split_len=split_len)


def run_decode_attention_triton(q, k_cache, v_cache, pos, scale=None, *, n_splits=None,
                                block_n=None):
    """``decode_attention_triton`` without the argument checks (the caller made them).
    ``pos``: an int or an int32/int64 tensor of shape () or (batch,) on q's device."""
    b, h, d = q.shape
    if not isinstance(pos, torch.Tensor):
        # a fill kernel, not a host-to-device copy: no synchronisation (but a captured graph
        # keeps this value: pass a device tensor to replay one graph for every position)
        pos = torch.full((), int(pos), dtype=torch.int64, device=q.device)
    scale = d ** -0.5 if scale is None else float(scale)
    if compiling():
        return _decode_op(q, k_cache, v_cache, pos, scale, n_splits, block_n)
    return _launch_decode(q, k_cache, v_cache, pos, scale, n_splits, block_n)


def _launch_decode(q, k_cache, v_cache, pos, scale, n_splits, block_n):
    b, h, d = q.shape
    hkv, cap = k_cache.shape[1], k_cache.shape[2]
    o = _alloc((b, h, d), q.dtype, q.device)
    if b == 0 or h == 0:
        return o
    s_pos = pos.stride(0) if pos.dim() == 1 else 0
    plan = _plan(b, h, hkv, cap, d, k_cache.dtype, _num_sms(q.device), n_splits, block_n,
                 _tunables())
    ns, split_len = plan["n_splits"], plan["split_len"]
    direct = ns == 1
    if direct:  # no scratch: the split kernel writes o (dummy tensors for the scratch pointers)
        m = lsum = acc = o
    else:
        rows = b * h * ns  # one buffer: acc (rows, d) first (16-byte aligned), then m, l
        buf = _alloc((rows * (d + 2),), torch.float32, q.device)
        acc, m, lsum = buf[:rows * d], buf[rows * d:rows * (d + 1)], buf[rows * (d + 1):]
    warps = 1 if _INTERPRET else NUM_WARPS
    args = (q, k_cache, v_cache, pos, o, m, lsum, acc,
            hkv, cap, d, split_len, ns, scale * _LOG2E,
            *q.stride(), *k_cache.stride(), *v_cache.stride(), s_pos, *o.stride())
    consts = dict(G=plan["G"], G_PAD=plan["G_PAD"], D_PAD=plan["D_PAD"],
                  BLOCK_N=plan["BLOCK_N"], PREC=plan["PREC"], DIRECT=direct,
                  INTERPRET=_INTERPRET)
    launch(_decode_split_kernel, (b * hkv, ns), args, consts, num_warps=warps,
           num_stages=1 if _INTERPRET else NUM_STAGES)
    if not direct:
        s_pad = triton.next_power_of_2(ns)
        d_pad = triton.next_power_of_2(d)
        args = (m, lsum, acc, pos, o, h, cap, d, split_len, ns, s_pos, *o.stride())
        consts = dict(S_PAD=s_pad, D_PAD=d_pad, BLOCK_S=max(1, min(s_pad, 2048 // d_pad)))
        launch(_decode_merge_kernel, (b * h,), args, consts, num_warps=1 if _INTERPRET else 2)
    return o


@custom_op("decode_attention")
def _decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
               scale: float, n_splits: int | None, block_n: int | None) -> torch.Tensor:
    """o (b, h, d): the decode attention as the custom op ``hybridseq::decode_attention`` (what
    ``torch.compile`` traces; ``kernels._ops``)."""
    return _launch_decode(q, k_cache, v_cache, pos, scale, n_splits, block_n)


@_decode_op.register_fake
def _(q, k_cache, v_cache, pos, scale, n_splits, block_n):
    return q.new_empty(q.shape)


def decode_attention_triton(q, k_cache, v_cache, pos, *, ring=False, scale=None):
    """One-token decode attention on CUDA (or the interpreter); see ``decode_attention_ref``.
    q, k_cache and v_cache float16, bfloat16 or float32 (k_cache and v_cache of one dtype),
    head_dim <= 256, any cap and any strides. Returns o (batch, n_heads, head_dim) in q's dtype.
    No autograd (decoding runs under ``torch.no_grad()``)."""
    from . import triton_limits

    check_decode_attention_args("decode_attention_triton", q, k_cache, v_cache, pos, ring, scale)
    why = triton_limits(q, k_cache, v_cache)
    if why:
        raise ValueError(f"decode_attention_triton: these inputs are outside the Triton "
                         f"kernel's limits: {why}")
    return run_decode_attention_triton(q, k_cache, v_cache, pos, scale)
