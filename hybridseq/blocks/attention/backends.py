"""Causal (optionally sliding-window) attention behind one function, several backends.

Layout: q (b, l, h, d), k and v (b, l, h_kv, d) with ``h % h_kv == 0`` (grouped-query attention:
query head i reads key/value head ``i // (h / h_kv)``). Output (b, l, h, d) in q's dtype.

The mask: query at position i sees key at position j iff ``j <= i`` and, with a sliding
``window`` of W tokens (self included), ``i - j < W``. Scores are scaled by ``d ** -0.5``.

Document masks (packed sequences): ``doc_ids`` (b, l) integer. A *document* is a maximal run of
equal ids in a row (so ``[7, 7, 3, 3, 7]`` holds three documents: a recurring id does not join
its earlier run); query i additionally sees key j only when both lie in the same document. Rows
are separate (no document crosses a row). ``document_layout(doc_ids)`` derives, once per
``doc_ids`` tensor (cached while that tensor lives and is not modified in place, so every layer
of a forward shares it), the run index ``seg``, the position inside the document, the dense
mask, the FlexAttention block mask and flash-attn's ``cu_seqlens``.

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

With ``doc_ids``: ``torch`` and ``sdpa`` take the dense (b, l, l) boolean mask; ``flex`` a
BlockMask whose mask_mod is causal & window & same-document (blocks wholly outside every
document are skipped); ``flash_attn`` runs ``flash_attn_varlen_func`` over the documents
flattened to one sequence (``cu_seqlens``; window through ``window_size``). ``auto`` on CUDA
picks flash_attn (varlen), else flex: the cuDNN and FlashAttention-2 kernels inside SDPA take no
arbitrary mask, so SDPA would fall back to the memory-efficient kernel and compute every masked
block. On CPU: sdpa with the boolean mask (FlexAttention on CPU has no backward).

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

from ...errors import HybridSeqError

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
        if device_type == "cuda" and head_dim < 16:
            # the compiled kernel refuses it (inductor: "embedding dimension ... must be at least 16")
            return False, f"compiled FlexAttention needs head_dim >= 16, got {head_dim}"
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
def select_backend(impl: str, device_type: str, dtype, head_dim: int, window, requires_grad: bool,
                   documents: bool = False) -> tuple[str, str]:
    """Resolve ``impl`` to a concrete backend for a call; returns (name, reason).
    ``documents``: the call carries a document mask (``doc_ids``).

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
            if documents:
                return "flash_attn", ("document mask: flash-attn varlen over cu_seqlens (each "
                                      "document is its own sequence, nothing masked is computed)")
            return "flash_attn", "flash-attn is installed and supports this call"
        if documents:
            if backend_available("flex", device_type, head_dim=head_dim)[0]:
                return "flex", ("document mask: the cuDNN / FlashAttention-2 kernels in SDPA take no "
                                "arbitrary mask, so FlexAttention's block mask (compiled) runs only "
                                f"the blocks inside documents; flash_attn: {why}")
            return "sdpa", ("document mask: SDPA with a dense boolean mask (memory-efficient kernel; "
                            f"FlexAttention unavailable; flash_attn: {why})")
        if window is None:
            return "sdpa", f"full causal: SDPA (cuDNN / FlashAttention-2 inside); flash_attn: {why}"
        if backend_available("flex", device_type, head_dim=head_dim)[0]:
            return "flex", "sliding window: FlexAttention block mask (compiled) skips masked blocks"
        return "sdpa", "sliding window with an explicit mask (FlexAttention unavailable)"
    if documents:
        return "sdpa", (f"{device_type}: SDPA with a dense boolean document mask (FlexAttention "
                        "has no backward here, flash-attn needs CUDA)")
    return "sdpa", f"{device_type}: SDPA is the fastest backend that runs here"


def describe_attention_backend(spec, device, d_model: int | None = None, *,
                               documents: bool = False) -> tuple[str, str]:
    """(backend name, why) that an attention block with ``spec`` uses on ``device`` for training
    (bf16 on CUDA, fp32 on CPU), with a document mask when ``documents``. ``head_dim`` comes from
    the spec, else ``d_model // n_heads`` (64 when neither is known). For ``hybridseq doctor``."""
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
        return select_backend(impl, device.type, dtype, head_dim, spec.get("window"), True,
                              documents)
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
# document masks (packed sequences)
# ------------------------------------------------------------------------------------------
def _flex_mask_mod(window, seg=None):
    """The FlexAttention mask_mod: causal, within ``window`` (when set), and, with ``seg`` (b, l)
    document run indices, inside one document. Index arguments are int tensors (FlexAttention
    calls it with broadcastable index tensors, vmapped or inside the compiled kernel)."""
    w = None if window is None else int(window)

    def mask_mod(b, h, qi, ki):
        m = qi >= ki
        if w is not None:
            m = m & (qi - ki < w)
        if seg is not None:
            m = m & (seg[b, qi] == seg[b, ki])
        return m

    return mask_mod


class DocumentLayout:
    """What the backends need from ``doc_ids`` (b, l), built once per ``doc_ids`` tensor.

    - ``starts`` (b, l) bool: a document begins at t (t == 0, or ``doc_ids[t] != doc_ids[t-1]``);
    - ``seg`` (b, l) int64: the run index of t's document in its row (0, 1, ...);
    - ``positions`` (b, l) int64: ``t - start of t's document`` (RoPE positions that restart);
    - ``mask(window)``: (b, l, l) bool, key j visible to query i (causal & window & same run);
    - ``block_mask(window)``: the FlexAttention BlockMask of the same rule (B = b, H broadcast);
    - ``varlen()``: (cu_seqlens int32 (n_docs + 1,), max_seqlen int) over the b * l tokens
      flattened row after row (a row start always starts a document), for flash-attn varlen.
    Each is computed on first use and kept (``varlen`` waits for the device once: max_seqlen)."""

    def __init__(self, doc_ids: torch.Tensor):
        b, l = doc_ids.shape
        dev = doc_ids.device
        starts = torch.ones(b, l, dtype=torch.bool, device=dev)
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        idx = torch.arange(l, device=dev).expand(b, l)
        self.shape = (b, l)
        self.device = dev
        self.starts = starts
        self.seg = starts.long().cumsum(1) - 1
        self.positions = idx - torch.where(starts, idx, 0).cummax(1).values
        self._masks: dict = {}
        self._block_masks: dict = {}
        self._varlen = None

    def mask(self, window=None) -> torch.Tensor:
        if window not in self._masks:
            l = self.shape[1]
            pos = torch.arange(l, device=self.device)
            m = position_mask(pos, pos, window)[None] & (self.seg[:, :, None] == self.seg[:, None, :])
            self._masks[window] = m
        return self._masks[window]

    def block_mask(self, window=None):
        if window not in self._block_masks:
            from torch.nn.attention.flex_attention import create_block_mask

            b, l = self.shape
            self._block_masks[window] = create_block_mask(
                _flex_mask_mod(window, self.seg), b, None, l, l, device=self.device)
        return self._block_masks[window]

    def varlen(self) -> tuple[torch.Tensor, int]:
        if self._varlen is None:
            b, l = self.shape
            first = self.starts.reshape(-1).nonzero().flatten()
            cu = torch.cat([first, first.new_tensor([b * l])]).to(torch.int32)
            self._varlen = (cu, int((cu[1:] - cu[:-1]).max().item()))
        return self._varlen


_LAYOUTS = None  # WeakIdKeyDictionary: doc_ids tensor -> (its _version, {device: DocumentLayout})


def document_layout(doc_ids: torch.Tensor, device=None) -> DocumentLayout:
    """The (cached) ``DocumentLayout`` of ``doc_ids`` (b, l) integer, on ``device`` (default:
    doc_ids's). The cache holds one entry per live ``doc_ids`` tensor object (weakly: it goes
    with the tensor) and is refreshed when the tensor is modified in place, so all layers of one
    forward, given the same tensor, share masks (an inference-mode tensor has no version counter,
    so its layout is rebuilt on each call). Errors: not 2-D or not an integer tensor."""
    global _LAYOUTS
    if not isinstance(doc_ids, torch.Tensor) or doc_ids.dim() != 2:
        shape = tuple(doc_ids.shape) if isinstance(doc_ids, torch.Tensor) else type(doc_ids).__name__
        raise HybridSeqError(f"doc_ids must be a (batch, seqlen) integer tensor, got {shape}")
    if doc_ids.dtype.is_floating_point or doc_ids.dtype.is_complex or doc_ids.dtype == torch.bool:
        raise HybridSeqError(f"doc_ids must hold integer document ids, got dtype {doc_ids.dtype}")
    device = doc_ids.device if device is None else torch.device(device)
    if doc_ids.is_inference():  # no version counter to see in-place changes by: no caching
        return DocumentLayout(doc_ids.detach().to(device))
    if _LAYOUTS is None:
        from torch.utils.weak import WeakIdKeyDictionary

        _LAYOUTS = WeakIdKeyDictionary()
    entry = _LAYOUTS.get(doc_ids)
    if entry is None or entry[0] != doc_ids._version:
        entry = (doc_ids._version, {})
        _LAYOUTS[doc_ids] = entry
    layout = entry[1].get(device)
    if layout is None:
        layout = entry[1][device] = DocumentLayout(doc_ids.detach().to(device))
    return layout


# ------------------------------------------------------------------------------------------
# backends
# ------------------------------------------------------------------------------------------
def _torch_ref(q, k, v, mask, scale):
    """Reference: fp32 scores and softmax; mask (lq, lk) or (b, lq, lk) boolean, True = visible."""
    if mask.dim() == 3:
        mask = mask[:, None]
    h, hkv = q.shape[2], k.shape[2]
    if h != hkv:
        k = k.repeat_interleave(h // hkv, dim=2)
        v = v.repeat_interleave(h // hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, v.float()).to(q.dtype)


_CUDA_PRIORITY = None


def _sdpa_context(device_type: str, cudnn: bool = True):
    """On CUDA: cuDNN attention first (fastest causal kernel on H100 in our measurements), then
    FlashAttention-2, memory-efficient, math. Elsewhere: torch's default choice.

    ``cudnn=False`` leaves cuDNN out: for the inference-cache paths, whose key length grows by one
    at every decode step. cuDNN builds an execution plan for every new shape (tens of ms each; a
    2-layer D=64 model decoded at 46.6 ms/step under bf16 autocast against 3.0 ms in fp32, H100),
    while the other kernels take any length at no extra cost."""
    global _CUDA_PRIORITY
    if device_type != "cuda":
        return _null_context()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if _CUDA_PRIORITY is None:
        _CUDA_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                          SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    order = _CUDA_PRIORITY if cudnn else _CUDA_PRIORITY[1:]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch without set_priority: keep torch's own order
        return sdpa_kernel(order) if not cudnn else _null_context()


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


def _sdpa(q, k, v, *, mask=None, causal=False, scale, cudnn: bool = True):
    if mask is not None and q.is_cuda:  # the masked CUDA kernels take no GQA: expand the heads
        k, v = _expand_kv(q, k, v)
    gqa = q.shape[2] != k.shape[2]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    with _sdpa_context(q.device.type, cudnn):
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

    return create_block_mask(_flex_mask_mod(window), None, None, length, length, device=device)


def _flex(q, k, v, *, window, scale, layout: DocumentLayout | None = None):
    import warnings

    if not torch.is_grad_enabled():  # torch's CPU path refuses inputs that require grad
        q, k, v = q.detach(), k.detach(), v.detach()
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if layout is None:
        bm = _flex_block_mask(q.shape[1], window, q.device)
    else:
        bm = layout.block_mask(window)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention.*")
        o = _flex_fn(q.device.type)(qh, kh, vh, block_mask=bm, scale=scale,
                                    enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)


def _flash_attn(q, k, v, *, window, scale):
    from flash_attn import flash_attn_func

    ws = (-1, -1) if window is None else (int(window) - 1, 0)
    return flash_attn_func(q, k, v, softmax_scale=scale, causal=True, window_size=ws)


def _flash_attn_varlen(q, k, v, layout: DocumentLayout, *, window, scale):
    """Each document as its own sequence: (b, l) tokens flattened, boundaries ``cu_seqlens``."""
    from flash_attn import flash_attn_varlen_func

    b, l, h, d = q.shape
    hkv = k.shape[2]
    cu, max_len = layout.varlen()
    ws = (-1, -1) if window is None else (int(window) - 1, 0)
    o = flash_attn_varlen_func(q.reshape(b * l, h, d), k.reshape(b * l, hkv, d),
                               v.reshape(b * l, hkv, d), cu, cu, max_len, max_len,
                               softmax_scale=scale, causal=True, window_size=ws)
    return o.view(b, l, h, d)


# ------------------------------------------------------------------------------------------
# entry points
# ------------------------------------------------------------------------------------------
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window=None, impl: str = "auto",
              scale: float | None = None, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Causal self-attention over one sequence chunk (query i and key i at the same position).

    q (b, l, h, d); k, v (b, l, h_kv, d); ``doc_ids`` (b, l) integer or None: a document mask
    (see the module docstring). Returns (b, l, h, d)."""
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"attention: q has {q.shape[1]} positions, k has {k.shape[1]}; use "
                         "attention_with_positions for a cache")
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    layout = None
    if doc_ids is not None:
        layout = document_layout(doc_ids, q.device)
        if layout.shape != tuple(q.shape[:2]):
            raise HybridSeqError(f"doc_ids has shape {tuple(doc_ids.shape)}, the queries "
                                 f"(batch, seqlen) = {tuple(q.shape[:2])}")
    name, _ = select_backend(impl, q.device.type, q.dtype, d, window, needs_grad, layout is not None)
    if layout is not None:
        if name == "flash_attn":
            return _flash_attn_varlen(q, k, v, layout, window=window, scale=scale)
        if name == "flex":
            return _flex(q, k, v, window=window, scale=scale, layout=layout)
        if name == "sdpa":
            return _sdpa(q, k, v, mask=layout.mask(window)[:, None], scale=scale)
        return _torch_ref(q, k, v, layout.mask(window), scale)
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
        return _sdpa(q, k, v, scale=scale, cudnn=False)
    mask = position_mask(q_pos, k_pos, window)
    if impl == "torch":
        return _torch_ref(q, k, v, mask, scale)
    return _sdpa(q, k, v, mask=mask, scale=scale, cudnn=False)


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
        return _sdpa(q, k, v, mask=causal_lower_right(lq, lk), scale=scale, cudnn=False)
    pos = torch.arange(lk, device=q.device)
    return _sdpa(q, k, v, mask=position_mask(pos[lk - lq:], pos, None), scale=scale, cudnn=False)


def _visible_pairs(seqlen: int, causal: bool, window) -> float:
    if window is None:
        return seqlen * seqlen / 2 if causal else seqlen * seqlen
    w = min(int(window), seqlen)
    return w * (w + 1) / 2 + (seqlen - w) * w  # exact number of visible (i, j) pairs


def attention_flops(batch: int, n_heads: int, seqlen: int, head_dim: int, *, causal: bool = True,
                    window=None, mode: str = "fwd", doc_lens=None) -> float:
    """FLOPs of the two attention matmuls (QK^T and PV), the FlashAttention benchmark convention:
    4 b h l^2 d for full attention, halved when causal (window: the exact visible-pair count);
    backward = 2.5 x forward. ``doc_lens``: the document lengths of each row (summing to
    ``seqlen``): only the work inside documents counts, each document as its own sequence."""
    if doc_lens is None:
        pairs = _visible_pairs(seqlen, causal, window)
    else:
        doc_lens = [int(n) for n in doc_lens]
        if sum(doc_lens) != seqlen or min(doc_lens, default=0) < 1:
            raise HybridSeqError(f"doc_lens {doc_lens} must be positive and sum to seqlen={seqlen}")
        pairs = sum(_visible_pairs(n, causal, window) for n in doc_lens)
    fwd = 4.0 * batch * n_heads * head_dim * pairs
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd_bwd": 3.5 * fwd}[mode]


__all__ = ["BACKENDS", "IMPLS", "DocumentLayout", "attention", "attention_tail", "attention_with_positions",
           "backend_available", "describe_attention_backend", "document_layout", "position_mask",
           "select_backend", "attention_flops"]
