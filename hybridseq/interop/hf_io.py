"""Files of a Hugging Face checkpoint folder: ``config.json``, the safetensors weights (one
``model.safetensors`` or shards listed in ``model.safetensors.index.json``) and the tokenizer
files; and the import of ``transformers`` itself (an optional dependency: the ``hf`` extra).

Nothing here touches the network: a source is a local folder.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from ..errors import HybridSeqError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# tokenizer (and generation) files copied beside the weights in either direction
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _json_default(o):
    raise TypeError(f"not JSON: {type(o).__name__}")


def read_config(folder: str | os.PathLike) -> dict:
    """``folder/config.json`` as a dict (transformers writes infinity as ``{"__float__":
    "Infinity"}``; such values come back as floats)."""
    path = Path(folder) / CONFIG_FILE
    if not Path(folder).is_dir():
        raise HybridSeqError(f"{folder}: not a folder (give a local Hugging Face checkpoint folder)")
    if not path.is_file():
        raise HybridSeqError(f"{folder}: no {CONFIG_FILE} (not a Hugging Face checkpoint folder)")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f, object_hook=_float_hook)
    except (OSError, ValueError) as e:
        raise HybridSeqError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise HybridSeqError(f"{path}: expected a JSON object")
    return data


def _float_hook(obj: dict):
    if set(obj) == {"__float__"}:
        return float(obj["__float__"])
    return obj


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint: the shards of ``model.safetensors.index.json``, or
    ``model.safetensors``."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise HybridSeqError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        files = sorted({folder / name for name in weight_map.values()})
        missing = [str(p.name) for p in files if not p.is_file()]
        if missing:
            raise HybridSeqError(f"{index}: shard files missing: {', '.join(missing[:4])}")
        return files
    single = folder / WEIGHTS_FILE
    if single.is_file():
        return [single]
    others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    hint = f" (found {', '.join(others[:3])}: pickled weights are not read; convert them to safetensors)" if others else ""
    raise HybridSeqError(f"{folder}: no {WEIGHTS_FILE} or {INDEX_FILE}{hint}")


def read_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's safetensors files, by name (on the CPU)."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for k in f.keys():
                    if k in out:
                        raise HybridSeqError(f"{path}: tensor {k!r} appears in two shards")
                    out[k] = f.get_tensor(k)
        except HybridSeqError:
            raise
        except Exception as e:
            raise HybridSeqError(f"{path}: not a readable safetensors file ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    return out


def write_checkpoint(folder: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor],
                     copy_from: str | os.PathLike | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (metadata ``format: pt``, which
    transformers requires) atomically into ``folder`` (a temporary sibling renamed over it), with
    the tokenizer files of ``copy_from`` when given."""
    from safetensors.torch import save_file

    folder = Path(folder)
    parent = folder.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=parent))
    try:
        state = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        with open(tmp / CONFIG_FILE, "w", encoding="utf-8") as f:
            json.dump(_json_safe(config), f, indent=2, sort_keys=True, default=_json_default)
            f.write("\n")
        if copy_from is not None:
            copy_tokenizer_files(copy_from, tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)
        for p in tmp.iterdir():
            os.chmod(p, 0o666 & ~mask)
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


def _json_safe(v):
    """Infinity as transformers writes it (``{"__float__": "Infinity"}``)."""
    if isinstance(v, float) and math.isinf(v):
        return {"__float__": "Infinity" if v > 0 else "-Infinity"}
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files present in ``src`` into ``dst``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        p = Path(src) / name
        if p.is_file():
            shutil.copyfile(p, Path(dst) / name)
            copied.append(name)
    return copied


def import_transformers():
    """``transformers``, or a ``HybridSeqError`` saying how to install it.

    A checkout of hybridseq holds a top-level ``kernels/`` folder (``hybridseq.kernels`` links
    to it). When the checkout's root is on ``sys.path`` (running from it), that folder shadows
    the ``kernels`` distribution transformers imports on its own; the distribution is then
    imported first with the checkout's root off ``sys.path``."""
    if importlib.util.find_spec("transformers") is None:
        raise HybridSeqError("this needs the transformers package: pip install 'hybridseq[hf]'")
    _unshadow_kernels()
    return importlib.import_module("transformers")


def _unshadow_kernels() -> None:
    if "kernels" in sys.modules:
        return
    try:
        spec = importlib.util.find_spec("kernels")
    except (ImportError, ValueError):
        return
    if spec is None or not spec.origin:
        return
    ours = Path(__file__).resolve().parents[1] / "kernels"
    origin = Path(spec.origin).resolve()
    if ours.resolve() not in origin.parents:
        return  # the distribution itself, or nothing of ours
    shadow_root = str(origin.parent.parent)
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != shadow_root]
    try:
        if importlib.util.find_spec("kernels") is not None:
            importlib.import_module("kernels")
    except Exception:
        sys.modules.pop("kernels", None)
    finally:
        sys.path[:] = saved


__all__ = ["CONFIG_FILE", "DTYPES", "INDEX_FILE", "TOKENIZER_FILES", "WEIGHTS_FILE", "copy_tokenizer_files",
           "import_transformers", "read_config", "read_weights", "weight_files", "write_checkpoint"]
