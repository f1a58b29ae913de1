"""Training state on disk without pickle: a JSON tree plus a safetensors file of its tensors.

``save_state(obj, folder, name)`` writes ``name.json`` and ``name.safetensors``; ``load_state``
reads them back. ``obj`` is a tree of dicts, lists, tuples, tensors, numpy arrays, ints, floats,
bools, strings, bytes and None (what optimizer, scheduler, grad-scaler and RNG states are made
of). Each tensor is stored in the safetensors file under a generated name and referenced from
the JSON; dicts with keys that are not strings (an optimizer's per-parameter state is keyed by
int) and tuples are written in tagged forms, so the tree comes back with the same types.

Reading either file never runs code: JSON and safetensors are data formats, so a run folder
received from someone else can be resumed safely.
"""
from __future__ import annotations

import base64
import json
import os

import numpy as np
import torch

from ..errors import HybridSeqError

_T, _A, _TUP, _D, _B = "__tensor__", "__ndarray__", "__tuple__", "__dict__", "__bytes__"


def _encode(obj, tensors: dict):
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {_T: key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        arr = obj
        if arr.dtype == np.uint32:  # no uint32 in safetensors' torch mapping: stored widened
            arr = arr.astype(np.int64)
        tensors[key] = torch.from_numpy(np.ascontiguousarray(arr))
        return {_A: key, "dtype": str(obj.dtype)}
    if isinstance(obj, (bool, int, str)) or obj is None:
        return obj
    if isinstance(obj, float):
        return obj
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, bytes):
        return {_B: base64.b64encode(obj).decode("ascii")}
    if isinstance(obj, tuple):
        return {_TUP: [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {_D: [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"cannot store a {type(obj).__name__} in a training state")


def _decode(obj, tensors: dict, where: str):
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if _T in obj:
        return _tensor(tensors, obj[_T], where)
    if _A in obj:
        return _tensor(tensors, obj[_A], where).numpy().astype(np.dtype(obj["dtype"]))
    if _B in obj:
        return base64.b64decode(obj[_B])
    if _TUP in obj:
        return tuple(_decode(v, tensors, where) for v in obj[_TUP])
    if _D in obj:
        return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in obj[_D]}
    return {k: _decode(v, tensors, where) for k, v in obj.items()}


def _tensor(tensors: dict, key, where: str):
    if key not in tensors:
        raise HybridSeqError(f"{where}: the state names tensor {key!r}, which its safetensors file lacks")
    return tensors[key]


def save_state(obj, folder: str, name: str) -> list[str]:
    """Write ``obj`` as ``folder/name.json`` and ``folder/name.safetensors``; returns the paths."""
    from safetensors.torch import save_file

    from .checkpoint import atomic_write_bytes

    tensors: dict = {}
    tree = _encode(obj, tensors)
    st_path = os.path.join(folder, name + ".safetensors")
    js_path = os.path.join(folder, name + ".json")
    tmp = st_path + f".tmp-{os.getpid()}"
    # safetensors refuses tensors that share memory: give each its own storage
    save_file({k: v.clone() if v.numel() else v for k, v in tensors.items()}, tmp)
    with open(tmp, "rb") as fh:
        data = fh.read()
    os.remove(tmp)
    atomic_write_bytes(st_path, data)
    atomic_write_bytes(js_path, json.dumps({"format": "hybridseq-state", "version": 1, "tree": tree},
                                           separators=(",", ":")).encode("utf-8"))
    return [js_path, st_path]


def load_state(folder: str, name: str):
    """The tree ``save_state`` wrote (tensors on CPU). ``HybridSeqError`` when the files are
    missing, truncated or not a hybridseq state."""
    from safetensors.torch import load_file

    js_path = os.path.join(folder, name + ".json")
    st_path = os.path.join(folder, name + ".safetensors")
    for p in (js_path, st_path):
        if not os.path.isfile(p):
            raise HybridSeqError(f"{folder}: missing {os.path.basename(p)}")
    try:
        with open(js_path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (ValueError, UnicodeDecodeError) as e:
        raise HybridSeqError(f"{js_path}: not a readable training state ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != "hybridseq-state":
        raise HybridSeqError(f"{js_path}: not a hybridseq training state")
    try:
        tensors = load_file(st_path)
    except Exception as e:  # a truncated or foreign file
        raise HybridSeqError(f"{st_path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return _decode(doc["tree"], tensors, js_path)


__all__ = ["load_state", "save_state"]
