"""The inference cache of a hybrid model, and "state cartridges" (a cache saved to disk).

One ``HybridCache`` serves every layout: ``states[i]`` is sublayer i's state dict (Mamba: conv +
SSM state, constant size; attention: a KV cache, a ring buffer of ``window`` slots when sliding;
MoE/MLP: ``None``), and ``seqlen_offset`` is the number of tokens already absorbed (the same for
every row of the batch: prompts have equal lengths).

    cache = model.new_cache(batch_size=2, max_seq_len=4096)
    model(prompt_ids, cache=cache)       # prefill; seqlen_offset += prompt length
    cache.save("doc.cartridge")          # safetensors: every state tensor + metadata
    cache = hs.load_cache("doc.cartridge", model)   # continue exactly where it was

Every block updates its state tensors in place (a prefill copies its final states in; a
one-token step writes them), so ``states`` always holds the current state and the same tensors
for the life of the cache: ``save`` works at any point, and a CUDA graph of the decode step
(``hybridseq.decode_graph.GraphedDecodeStep``) keeps reading the right buffers. The position
exists twice: ``seqlen_offset`` on the host (shapes, checks) and ``position``, a 0-d int64
tensor on the states' device that the one-token step reads (RoPE, the KV slot) and advances
without a host synchronisation.

The file holds tensors ``layers.<i>.<name>`` and string metadata: ``format``
("hybridseq-cache"), ``hybridseq_version``, ``config_hash`` (``hybridseq.config.config_hash`` of
the model's config), ``weights_fingerprint`` (a checksum of the weights the state was computed
with), ``layout`` (JSON list of block kinds), ``seqlen_offset``, ``batch_size``,
``max_seq_len``, ``dtype``. Loading checks the hash, the fingerprint, and every tensor's shape.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch

from .errors import HybridSeqError

FORMAT = "hybridseq-cache"


class HybridCache:
    """Per-sublayer inference state of one batch of sequences.

    Attributes: ``states`` (list of dict[str, Tensor] | None, one per sublayer),
    ``seqlen_offset`` (int), ``batch_size``, ``max_seq_len``, ``dtype``, ``layout`` (block kinds),
    ``config_hash``, ``weights_fingerprint``.
    """

    def __init__(self, states: list[dict[str, torch.Tensor] | None], *, batch_size: int,
                 max_seq_len: int, dtype: torch.dtype, layout: list[str], config_hash: str = "",
                 weights_fingerprint: str = "", seqlen_offset: int = 0, device=None):
        self.states = states
        self.batch_size = int(batch_size)
        self.max_seq_len = int(max_seq_len)
        self.dtype = dtype
        self.layout = list(layout)
        self.config_hash = config_hash
        self.weights_fingerprint = weights_fingerprint
        dev = device if device is not None else self.device
        self.position = torch.zeros((), dtype=torch.long, device=dev)
        self._offset = 0
        self.seqlen_offset = int(seqlen_offset)

    # --- position ----------------------------------------------------------------------------
    @property
    def seqlen_offset(self) -> int:
        """Tokens already absorbed (the host copy of ``position``)."""
        return self._offset

    @seqlen_offset.setter
    def seqlen_offset(self, value: int) -> None:
        self._offset = int(value)
        self.position.fill_(self._offset)

    def advance(self, n: int, *, on_device: bool = True) -> None:
        """Count ``n`` more tokens: on the host, and (``on_device``) in ``position`` with a device
        op that a CUDA graph captures. A replayed graph advances ``position`` by itself: its
        owner then counts on the host only (``on_device=False``)."""
        self._offset += int(n)
        if on_device:
            self.position.add_(int(n))

    # --- views -------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every state tensor, named ``layers.<i>.<name>``."""
        out = {}
        for i, st in enumerate(self.states):
            for name, t in (st or {}).items():
                out[f"layers.{i}.{name}"] = t
        return out

    def nbytes(self) -> int:
        """Bytes held by the state tensors (all rows of the batch)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def device(self) -> torch.device | None:
        for t in self.tensors().values():
            return t.device
        return None

    def reset(self) -> None:
        """Forget every token: zero the states, offset 0."""
        for st in self.states:
            for t in (st or {}).values():
                t.zero_()
        self.seqlen_offset = 0

    def __repr__(self) -> str:
        return (f"HybridCache(batch_size={self.batch_size}, max_seq_len={self.max_seq_len}, "
                f"seqlen_offset={self.seqlen_offset}, dtype={self.dtype}, "
                f"layers={len(self.states)}, nbytes={self.nbytes()})")

    # --- save / load -------------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        from . import __version__

        return {
            "format": FORMAT,
            "hybridseq_version": __version__,
            "config_hash": self.config_hash,
            "weights_fingerprint": self.weights_fingerprint,
            "layout": json.dumps(self.layout),
            "seqlen_offset": str(self.seqlen_offset),
            "batch_size": str(self.batch_size),
            "max_seq_len": str(self.max_seq_len),
            "dtype": str(self.dtype).replace("torch.", ""),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write every state tensor and the metadata to a safetensors file (atomically: a
        temporary file in the same folder, then a rename)."""
        from safetensors.torch import save_file

        path = os.fspath(path)
        tensors = {k: t.detach().contiguous().cpu() for k, t in self.tensors().items()}
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".cache-", suffix=".tmp", dir=folder)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=self.metadata())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, model: Any, *, device=None,
             check_weights: bool = True) -> "HybridCache":
        """Restore a cache saved by ``save`` for ``model`` (a ``HybridLM``).

        Raises ``HybridSeqError`` when the file is not a hybridseq cache, when it was made by a
        model with another config (``config_hash``) or, unless ``check_weights=False``, other
        weights, or when a tensor's shape does not match."""
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise HybridSeqError(f"{path}: no such cache file")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise HybridSeqError(f"{path}: not a readable safetensors cache ({e})") from None
        if meta.get("format") != FORMAT:
            raise HybridSeqError(f"{path}: not a hybridseq cache (metadata format "
                                 f"{meta.get('format')!r})")
        if meta.get("config_hash") != model.config_hash:
            raise HybridSeqError(
                f"{path}: this cache was saved from a different model (config hash "
                f"{meta.get('config_hash', '?')[:12]}, layout {meta.get('layout')}); this model's "
                f"config hash is {model.config_hash[:12]} (layout {json.dumps(model.layout)})")
        if check_weights and meta.get("weights_fingerprint") != model.weights_fingerprint():
            raise HybridSeqError(
                f"{path}: this cache was computed with other weights (same config, fingerprint "
                f"{meta.get('weights_fingerprint')} vs {model.weights_fingerprint()}); pass "
                "check_weights=False to load it anyway")
        batch, max_len, offset, dtype = _checked_metadata(path, meta)
        device = device if device is not None else next(model.parameters()).device
        # the shapes the metadata implies, on the meta device (nothing allocated), against the
        # file's tensors: an edited max_seq_len or batch size is refused before any allocation
        shapes = model.new_cache(batch, max_len, device="meta", dtype=dtype).tensors()
        if set(shapes) != set(tensors):
            missing = sorted(set(shapes) - set(tensors))
            extra = sorted(set(tensors) - set(shapes))
            raise HybridSeqError(f"{path}: cache tensors do not match the model "
                                 f"(missing {missing[:4]}, unexpected {extra[:4]})")
        for name, t in tensors.items():
            if tuple(t.shape) != tuple(shapes[name].shape):
                raise HybridSeqError(f"{path}: {name} has shape {tuple(t.shape)}, the model "
                                     f"expects {tuple(shapes[name].shape)} for the batch "
                                     f"{batch} and max_seq_len {max_len} of its metadata")
        cache = model.new_cache(batch, max_len, device=device, dtype=dtype)
        expected = cache.tensors()
        for name, t in tensors.items():
            expected[name].copy_(t)  # into the fresh cache's own buffers (dtype/device cast)
        cache.seqlen_offset = offset
        return cache


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "float64": torch.float64}
MAX_SEQ_LEN = 1 << 24  # positions a cartridge may declare (16M tokens)


def _checked_metadata(path: str, meta: dict) -> tuple[int, int, int, torch.dtype]:
    """(batch_size, max_seq_len, seqlen_offset, dtype) from a cartridge's metadata, each checked:
    the metadata is data from a file, never trusted to size an allocation unchecked."""
    def integer(key: str, lo: int, hi: int) -> int:
        raw = meta.get(key)
        try:
            v = int(str(raw), 10)
        except (TypeError, ValueError):
            raise HybridSeqError(f"{path}: metadata {key}={raw!r} is not an integer") from None
        if not lo <= v <= hi:
            raise HybridSeqError(f"{path}: metadata {key}={v} is out of range ({lo}..{hi})")
        return v

    batch = integer("batch_size", 1, 1 << 20)
    max_len = integer("max_seq_len", 1, MAX_SEQ_LEN)
    offset = integer("seqlen_offset", 0, 1 << 40)  # recurrent and ring caches decode past max_seq_len
    name = meta.get("dtype")
    if name not in _DTYPES:
        raise HybridSeqError(f"{path}: metadata dtype={name!r} is not one of {', '.join(_DTYPES)}")
    return batch, max_len, offset, _DTYPES[name]
