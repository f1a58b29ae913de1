"""Causal (optionally sliding-window) attention behind one function, several backends.

Layout: q (b, l, h, d), k and v (b, l, h_kv, d) with ``h % h_kv == 0`` (grouped-query attention:
query head i reads key/value head ``i // (h / h_kv)``). Output (b, l, h, d) in q's dtype.

The mask: query at position i sees key at position j iff ``j <= i`` and, with a sliding
``window`` of W tokens (self included), ``i - j < W``. Scores are scaled by ``d ** -0.5``.

Backends (``impl``):
- ``torch``: the reference. Explicit scores, boolean mask, float32 softmax. Any device.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``. Full causal uses
  ``is_causal`` (on CUDA with cuDNN attention first in the priority list, then the
  FlashAttention-2 and memory-efficient kernels); a window uses an explicit boolean mask (which
  rules out the flash kernels). GQA through ``enable_gqa``.
- ``flex``: ``torch.nn.attention.flex_attention`` with a causal / sliding-window block mask,
  compiled on CUDA. On CPU torch runs it unfused and forward-only (no backward).
- ``flash_attn``: ``flash_attn.flash_attn_func`` (the flash-attn package, when it imports; CUDA,
  fp16/bf16, head_dim <= 256): causal, ``window_size``, native GQA.
- ``auto``: the fastest that supports the call. CUDA: flash_attn when installed, else sdpa for full
  causal (cuDNN inside), else flex for a window, else sdpa. CPU: sdpa.

``attention_with_positions`` is the decode/prefill-with-cache path: keys carry explicit positions
(a ring buffer is not in order), so the mask is built from positions; it runs on sdpa (or the
torch reference when ``impl == "torch"``).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util

import torch
import torch.nn.functional as F

from ..errors import HybridSeqError

BACKENDS = ("torch", "sdpa", "flex", "flash_attn")
IMPLS = ("auto", *BACKENDS)


# ------------------------------------------------------------------------------------------
# availability
# ------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _flash_attn_status() -> tuple[bool, str]:
    if importlib.util.find_spec("flash_attn") is None:
        return False, "the flash-attn package is not installed (pip install 'hybridseq[flash]')"
    try:
        importlib.import_module("flash_attn")
        return True, ""
    except Exception as e:  # a broken build: say why
        return False, f"'import flash_attn' failed: {type(e).__name__}: {e}"


@functools.lru_cache(maxsize=None)
def _flex_status() -> tuple[bool, str]:
    try:
        importlib.import_module("torch.nn.attention.flex_attention")
        return True, ""
    except Exception as e:
        return False, f"torch {torch.__version__} has no FlexAttention ({type(e).__name__}: {e})"


def backend_available(name: str, device_type: str, *, dtype=None, head_dim: int = 64,
                      requires_grad: bool = False) -> tuple[bool, str]:
    """Whether backend ``name`` can run here; (ok, reason when not)."""
    if name in ("torch", "sdpa"):
        return True, ""
    if name == "flex":
        ok, why = _flex_status()
        if not ok:
            return False, why
        if device_type != "cuda" and requires_grad:
            return False, "FlexAttention has no backward on CPU in torch (forward only)"
        return True, ""
    if name == "flash_attn":
        ok, why = _flash_attn_status()
        if not ok:
            return False, why
        if device_type != "cuda":
            return False, "flash-attn runs on CUDA only"
        if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
            return False, f"flash-attn needs fp16/bf16 inputs, got {dtype}"
        if head_dim > 256 or head_dim % 8:
            return False, f"flash-attn needs head_dim <= 256 and a multiple of 8, got {head_dim}"
        return True, ""
    raise HybridSeqError(f"unknown attention impl {name!r} (choices: {', '.join(IMPLS)})")


@functools.lru_cache(maxsize=256)
def select_backend(impl: str, device_type: str, dtype, head_dim: int, window, requires_grad: bool
                   ) -> tuple[str, str]:
    """Resolve ``impl`` to a concrete backend for a call; returns (name, reason).

    An explicit impl that cannot run raises ``HybridSeqError`` naming the reason."""
    if impl not in IMPLS:
        raise HybridSeqError(f"unknown attention impl {impl!r} (choices: {', '.join(IMPLS)})")
    if impl != "auto":
        ok, why = backend_available(impl, device_type, dtype=dtype, head_dim=head_dim,
                                    requires_grad=requires_grad)
        if not ok:
            raise HybridSeqError(f"attention impl {impl!r} cannot run here: {why}")
        return impl, "set by the spec's impl"
    if device_type == "cuda":
        ok, why = backend_available("flash_attn", device_type, dtype=dtype, head_dim=head_dim)
        if ok:
            return "flash_attn", "flash-attn is installed and supports this call"
        if window is None:
            return "sdpa", f"full causal: SDPA (cuDNN / FlashAttention-2 inside); flash_attn: {why}"
        if backend_available("flex", device_type)[0]:
            return "flex", "sliding window: FlexAttention block mask (compiled) skips masked blocks"
        return "sdpa", "sliding window with an explicit mask (FlexAttention unavailable)"
    return "sdpa", f"{device_type}: SDPA is the fastest backend that runs here"


def describe_attention_backend(spec, device, d_model: int | None = None) -> tuple[str, str]:
    """(backend name, why) that an attention block with ``spec`` uses on ``device`` for training
    (bf16 on CUDA, fp32 on CPU). ``head_dim`` comes from the spec, else ``d_model // n_heads``
    (64 when neither is known). For ``hybridseq doctor``."""
    device = torch.device(device)
    impl = spec.get("impl", "auto") or "auto"
    if spec.get("head_dim"):
        head_dim = int(spec["head_dim"])
    elif d_model:
        head_dim = int(d_model) // int(spec.get("n_heads") or 1)
    else:
        head_dim = 64
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return select_backend(impl, device.type, dtype, head_dim, spec.get("window"), True)
    except HybridSeqError as e:
        return "unavailable", str(e)


# ------------------------------------------------------------------------------------------
# masks
# ------------------------------------------------------------------------------------------
def position_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window) -> torch.Tensor:
    """Boolean (lq, lk): key j visible to query i. ``k_pos < 0`` marks an empty cache slot."""
    qp = q_pos[:, None]
    kp = k_pos[None, :]
    mask = (kp >= 0) & (kp <= qp)
    if window is not None:
        mask = mask & (qp - kp < window)
    return mask


@functools.lru_cache(maxsize=32)
def _causal_mask(length: int, window, device: torch.device) -> torch.Tensor:
    pos = torch.arange(length, device=device)
    return position_mask(pos, pos, window)


# ------------------------------------------------------------------------------------------
# backends
# ------------------------------------------------------------------------------------------
def _torch_ref(q, k, v, mask, scale):
    """Reference: fp32 scores and softmax; mask (lq, lk) boolean, True = visible."""
    h, hkv = q.shape[2], k.shape[2]
    if h != hkv:
        k = k.repeat_interleave(h // hkv, dim=2)
        v = v.repeat_interleave(h // hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, v.float()).to(q.dtype)


_CUDA_PRIORITY = None


def _sdpa_context(device_type: str):
    """On CUDA: cuDNN attention first (fastest causal kernel on H100 in our measurements), then
    FlashAttention-2, memory-efficient, math. Elsewhere: torch's default choice."""
    global _CUDA_PRIORITY
    if device_type != "cuda":
        return _null_context()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if _CUDA_PRIORITY is None:
        _CUDA_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                          SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    try:
        return sdpa_kernel(_CUDA_PRIORITY, set_priority=True)
    except TypeError:  # torch without set_priority: keep torch's own order
        return _null_context()


class _null_context:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _expand_kv(q, k, v):
    """GQA -> MHA by repeating each key/value head h / h_kv times (for kernels without GQA)."""
    g = q.shape[2] // k.shape[2]
    if g == 1:
        return k, v
    return k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)


def _sdpa(q, k, v, *, mask=None, causal=False, scale):
    if mask is not None and q.is_cuda:  # the masked CUDA kernels take no GQA: expand the heads
        k, v = _expand_kv(q, k, v)
    gqa = q.shape[2] != k.shape[2]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    with _sdpa_context(q.device.type):
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=causal,
                                           scale=scale, enable_gqa=gqa)
    return o.transpose(1, 2)


_FLEX_COMPILED = None


def _flex_fn(device_type: str):
    global _FLEX_COMPILED
    from torch.nn.attention.flex_attention import flex_attention

    if device_type != "cuda":
        return flex_attention
    if _FLEX_COMPILED is None:
        # default dynamic: the second sequence length compiles a shape-generic kernel, so
        # prompts of many lengths do not each pay a compilation
        _FLEX_COMPILED = torch.compile(flex_attention)
    return _FLEX_COMPILED


@functools.lru_cache(maxsize=32)
def _flex_block_mask(length: int, window, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    if window is None:
        def mask_mod(b, h, qi, ki):
            return qi >= ki
    else:
        w = int(window)

        def mask_mod(b, h, qi, ki):
            return (qi >= ki) & (qi - ki < w)
    return create_block_mask(mask_mod, None, None, length, length, device=device)


def _flex(q, k, v, *, window, scale):
    import warnings

    if not torch.is_grad_enabled():  # torch's CPU path refuses inputs that require grad
        q, k, v = q.detach(), k.detach(), v.detach()
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    bm = _flex_block_mask(q.shape[1], window, q.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention.*")
        o = _flex_fn(q.device.type)(qh, kh, vh, block_mask=bm, scale=scale,
                                    enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)


def _flash_attn(q, k, v, *, window, scale):
    from flash_attn import flash_attn_func

    ws = (-1, -1) if window is None else (int(window) - 1, 0)
    return flash_attn_func(q, k, v, softmax_scale=scale, causal=True, window_size=ws)


# ------------------------------------------------------------------------------------------
# entry points
# ------------------------------------------------------------------------------------------
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window=None, impl: str = "auto",
              scale: float | None = None) -> torch.Tensor:
    """Causal self-attention over one sequence chunk (query i and key i at the same position).

    q (b, l, h, d); k, v (b, l, h_kv, d). Returns (b, l, h, d)."""
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"attention: q has {q.shape[1]} positions, k has {k.shape[1]}; use "
                         "attention_with_positions for a cache")
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    name, _ = select_backend(impl, q.device.type, q.dtype, d, window, needs_grad)
    if name == "flash_attn":
        return _flash_attn(q, k, v, window=window, scale=scale)
    if name == "flex":
        return _flex(q, k, v, window=window, scale=scale)
    if name == "sdpa":
        if window is None or window >= q.shape[1]:
            return _sdpa(q, k, v, causal=True, scale=scale)
        return _sdpa(q, k, v, mask=_causal_mask(q.shape[1], window, q.device), scale=scale)
    return _torch_ref(q, k, v, _causal_mask(q.shape[1], window, q.device), scale)


def attention_with_positions(q, k, v, q_pos=None, k_pos=None, *, window=None, impl: str = "auto",
                             scale: float | None = None) -> torch.Tensor:
    """Attention of queries at positions ``q_pos`` (lq,) to keys at ``k_pos`` (lk,) (any order;
    ``-1`` = empty slot), with the causal / window rule of this module. ``q_pos = k_pos = None``:
    every key is visible to every query (the caller knows it, e.g. a decode step), so no mask is
    built and nothing waits on the device. Backend: the torch reference when ``impl == "torch"``,
    else sdpa."""
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    if q_pos is None:
        if impl == "torch":
            mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device)
            return _torch_ref(q, k, v, mask, scale)
        return _sdpa(q, k, v, scale=scale)
    mask = position_mask(q_pos, k_pos, window)
    if impl == "torch":
        return _torch_ref(q, k, v, mask, scale)
    return _sdpa(q, k, v, mask=mask, scale=scale)


def attention_tail(q, k, v, *, impl: str = "auto", scale: float | None = None) -> torch.Tensor:
    """Causal attention of the last ``lq`` positions of a sequence to all its ``lk >= lq`` keys
    (in order, no window): query i sits at key position ``lk - lq + i`` ("bottom-right" causal,
    a chunk prefilled after cached keys). Backends: flash_attn (native), sdpa (on CUDA a
    lower-right ``CausalBias``, which the flash / efficient kernels run without a mask tensor;
    elsewhere a boolean mask), torch."""
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    lq, lk = q.shape[1], k.shape[1]
    if impl == "torch":
        pos = torch.arange(lk, device=q.device)
        return _torch_ref(q, k, v, position_mask(pos[lk - lq:], pos, None), scale)
    name, _ = select_backend(impl, q.device.type, q.dtype, d, None, False)
    if name == "flash_attn":
        return _flash_attn(q, k, v, window=None, scale=scale)
    if q.is_cuda:  # no mask tensor; (importing the bias module pulls in torch._dynamo: CUDA only)
        from torch.nn.attention.bias import causal_lower_right

        k, v = _expand_kv(q, k, v)
        return _sdpa(q, k, v, mask=causal_lower_right(lq, lk), scale=scale)
    pos = torch.arange(lk, device=q.device)
    return _sdpa(q, k, v, mask=position_mask(pos[lk - lq:], pos, None), scale=scale)


def attention_flops(batch: int, n_heads: int, seqlen: int, head_dim: int, *, causal: bool = True,
                    window=None, mode: str = "fwd") -> float:
    """FLOPs of the two attention matmuls (QK^T and PV), the FlashAttention benchmark convention:
    4 b h l^2 d for full attention, halved when causal (window: the exact visible-pair count);
    backward = 2.5 x forward."""
    if window is None:
        pairs = seqlen * seqlen / 2 if causal else seqlen * seqlen
    else:
        w = min(int(window), seqlen)
        pairs = w * (w + 1) / 2 + (seqlen - w) * w  # exact number of visible (i, j) pairs
    fwd = 4.0 * batch * n_heads * head_dim * pairs
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd_bwd": 3.5 * fwd}[mode]


__all__ = ["BACKENDS", "IMPLS", "attention", "attention_tail", "attention_with_positions", "backend_available",
           "describe_attention_backend", "position_mask", "select_backend", "attention_flops"]
