"""Top-level entry points: build a model from a config, save/load weights, load a saved cache.

    cfg = hs.load_config("layouts/jamba.yaml")
    model = hs.build_model(cfg)                       # vocab "auto" -> the task's vocabulary
    hs.save_pretrained(model, cfg, "out/jamba")       # model.safetensors + config.yaml (+ tokenizer.json)
    model = hs.load_pretrained("out/jamba")
    cache = hs.load_cache("prompt.cartridge", model)  # a cache saved with cache.save(path)
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from .cache import HybridCache
from .config import HybridConfig, config_hash, load_config, save_config
from .config.derived import canonical_json, config_payload, payload_differences
from .errors import ConfigError, HybridSeqError
from .model import HybridLM

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"
TOKENIZER_NAME = "tokenizer.json"  # a Hugging Face tokenizers file, kept beside the weights
_DERIVED_KEYS = ("stack", "stage_starts")


def resolve_vocab(cfg, vocab_size: int | None = None) -> int:
    """``model.vocab_size`` when it is an int; for "auto": ``vocab_size`` when given, else the
    vocabulary of ``train.task`` (``hybridseq.data.task_vocab_size``). Not yet padded."""
    v = cfg.model.vocab_size
    if v != "auto":
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"must be a positive int or 'auto', got {v!r}", key="model.vocab_size")
        return int(v)
    if vocab_size is not None:
        return int(vocab_size)
    from .data import task_vocab_size

    return int(task_vocab_size(cfg.train.task))


def build_model(cfg, vocab_size: int | None = None) -> HybridLM:
    """A freshly initialised ``HybridLM`` for ``cfg`` (a ``load_config`` result, or anything
    ``load_config`` accepts). ``model.vocab_size: auto`` becomes ``vocab_size`` or the task's
    vocabulary, padded to ``model.pad_vocab_multiple`` inside the model; ``model.cfg`` is the
    config with the resolved (unpadded) vocabulary."""
    if not isinstance(cfg, HybridConfig):
        cfg = load_config(cfg)
    return HybridLM(cfg.with_vocab(resolve_vocab(cfg, vocab_size)))


def _source_config(cfg) -> dict:
    """A plain config dict without the keys ``load_config`` derives."""
    c = load_config(cfg).to_dict()
    return {k: v for k, v in c.items() if k not in _DERIVED_KEYS}


def save_pretrained(model: HybridLM, cfg=None, folder: str | os.PathLike = "model",
                    tokenizer: str | os.PathLike | None = None) -> Path:
    """Write ``folder/model.safetensors`` (the state dict; a tied head is not stored twice: it is
    the embedding) and ``folder/config.yaml`` (the resolved config, vocab as an int), and
    ``folder/tokenizer.json`` when the model has one: the file ``tokenizer``, else
    ``model.tokenizer_json`` (the bytes ``load_pretrained`` read from beside the weights, or the
    trainer set from its data). Atomic: the files go to a temporary sibling folder that is then
    renamed over ``folder``.

    ``cfg`` defaults to ``model.cfg``; a given ``cfg`` (e.g. with its ``train`` section) must
    describe the same model (same ``config_hash`` once its vocab is resolved)."""
    from safetensors.torch import save_file

    from . import __version__

    if cfg is None:
        cfg = model.cfg
    c = _source_config(cfg)
    c["model"]["vocab_size"] = model.vocab_size_unpadded
    if config_hash({**c, "stack": list(model.stack)}) != model.config_hash:
        raise HybridSeqError("save_pretrained: cfg does not describe this model (its config hash "
                             "differs from the model's)")
    tokenizer_json = getattr(model, "tokenizer_json", None)
    if tokenizer is not None:
        try:
            tokenizer_json = Path(tokenizer).read_bytes()
        except OSError as e:
            raise HybridSeqError(f"save_pretrained: cannot read the tokenizer {tokenizer}: {e.strerror or e}") from None
    folder = Path(folder)
    parent = folder.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=parent))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={
            "format": "hybridseq-model", "hybridseq_version": __version__,
            "config_hash": model.config_hash,
            "config_payload": canonical_json(config_payload({**c, "stack": list(model.stack)}))})
        save_config(c, tmp / CONFIG_NAME)
        if tokenizer_json is not None:
            (tmp / TOKENIZER_NAME).write_bytes(tokenizer_json)
        _readable_by_others(tmp)
        old = None
        if folder.exists():
            old = parent / f".{folder.name}.old-{os.getpid()}"
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _readable_by_others(folder: Path) -> None:
    """A saved model folder reads like any other output (0755 / 0644 under the usual umask):
    ``mkdtemp`` makes its temporary folder private to its owner."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for f in folder.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~mask)


def load_pretrained(folder: str | os.PathLike, device=None) -> HybridLM:
    """Rebuild the model of ``folder/config.yaml`` and load ``folder/model.safetensors``
    (strict: every key and shape must match). The config must describe the weights: its hash
    must equal the one stored with them (an edited ``config.yaml`` is refused, naming the keys
    that changed). Floating tensors keep the dtype they were saved in (float32-tagged parameters
    stay float32). A ``tokenizer.json`` beside the weights is kept as ``model.tokenizer_json``
    (bytes; None without one), so that ``save_pretrained`` carries it along. Returned in eval
    mode."""
    from safetensors import safe_open

    folder = Path(folder)
    wpath, cpath = folder / WEIGHTS_NAME, folder / CONFIG_NAME
    for p in (wpath, cpath):
        if not p.is_file():
            raise HybridSeqError(f"{folder}: not a saved hybridseq model (missing {p.name})")
    model = HybridLM(load_config(str(cpath)))
    try:
        with safe_open(str(wpath), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # truncated or not a safetensors file
        raise HybridSeqError(f"{wpath}: not a readable safetensors file ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    _check_config_matches(meta, model, cpath)
    dtype = state.get("embed.weight", next(iter(state.values()))).dtype
    if dtype.is_floating_point and dtype != torch.float32:
        model.to(dtype)
    missing, unexpected = [], []
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise HybridSeqError(f"{wpath}: weights do not match {cpath} (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]})")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise HybridSeqError(f"{wpath}: {k} has shape {tuple(v.shape)}, the config gives "
                                 f"{tuple(own[k].shape)}")
    model.load_state_dict(state, strict=True)
    tpath = folder / TOKENIZER_NAME
    model.tokenizer_json = tpath.read_bytes() if tpath.is_file() else None
    if device is not None:
        model.to(device)
    return model.eval()


def _check_config_matches(meta: dict, model: HybridLM, cpath: Path) -> None:
    saved = meta.get("config_hash")
    if not saved or saved == model.config_hash:
        return
    import json

    diffs = []
    if meta.get("config_payload"):
        try:
            diffs = payload_differences(json.loads(meta["config_payload"]), config_payload(model.cfg))
        except (ValueError, TypeError, AttributeError):
            diffs = []
    what = ("; changed: " + ", ".join(diffs[:6]) + (" ..." if len(diffs) > 6 else "")) if diffs else ""
    raise HybridSeqError(f"{cpath}: this config does not describe the weights saved beside it (config hash "
                         f"{model.config_hash[:12]}, weights {saved[:12]}){what}")


def load_cache(path: str | os.PathLike, model: HybridLM, *, device=None,
               check_weights: bool = True) -> HybridCache:
    """Restore a cache written by ``cache.save(path)`` for ``model`` (see ``HybridCache.load``):
    a cache from another model is refused with ``HybridSeqError``."""
    return HybridCache.load(path, model, device=device, check_weights=check_weights)


__all__ = ["build_model", "load_cache", "load_pretrained", "resolve_vocab", "save_pretrained"]
