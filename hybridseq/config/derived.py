"""Values derived from a config: the kind of each sublayer and a hash that identifies a model
(its weights' shapes and meaning)."""
from __future__ import annotations

import hashlib
import json
from typing import Mapping


def block_kinds(cfg) -> list[str]:
    """The block kind of each sublayer, in order (``cfg`` from ``load_config``)."""
    if hasattr(cfg, "kinds"):
        return list(cfg.kinds)
    return [str(cfg["blocks"][symbol]["kind"]) for symbol in cfg["stack"]]


def config_hash(cfg) -> str:
    """sha256 (hex) of a canonical JSON of what defines the model's weights and computation
    (``config_payload``): ``model`` (less ``ModelSpec.hash_exclude``, and less the
    ``ModelSpec.hash_optional`` keys at their default) and, per sublayer, its block
    spec's ``canonical`` form (derived sizes resolved, ``impl``, init and training-only keys left
    out). Symbol names, pipeline stages, ``train`` and ``deepspeed`` do not count. ``cfg``: a
    ``HybridConfig`` or its ``to_dict()`` form (``"auto"`` vocabularies hash as the string)."""
    return hashlib.sha256(canonical_json(config_payload(cfg)).encode("utf-8")).hexdigest()


def canonical_json(payload: dict) -> str:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)


def payload_differences(saved: dict, current: dict) -> list[str]:
    """The dotted keys where two ``config_payload`` dicts differ ('layers[3].top_k: 2 -> 1')."""
    out = []
    for k in sorted(set(saved.get("model", {})) | set(current.get("model", {}))):
        a, b = saved.get("model", {}).get(k), current.get("model", {}).get(k)
        if a != b:
            out.append(f"model.{k}: {a!r} -> {b!r}")
    la, lb = saved.get("layers", []), current.get("layers", [])
    if len(la) != len(lb):
        out.append(f"layout: {len(la)} -> {len(lb)} sublayers")
    for i, (a, b) in enumerate(zip(la, lb)):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                out.append(f"layers[{i}].{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return out


def config_payload(cfg) -> dict:
    """What ``config_hash`` hashes (see there)."""
    from ..blocks import kind_spec
    from ..blocks.spec import drop_defaults
    from .sections import ModelSpec

    if not isinstance(cfg, Mapping) and hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    model = {k: v for k, v in dict(cfg["model"]).items() if k not in ModelSpec.hash_exclude}
    drop_defaults(model, ModelSpec.hash_optional)
    d_model = int(model["d_model"])
    specs = {}
    for s in set(cfg["stack"]):
        raw = cfg["blocks"][s]
        spec = raw if hasattr(raw, "canonical") else kind_spec(raw["kind"]).from_mapping(
            {k: v for k, v in dict(raw).items() if k != "kind"}, key=f"blocks.{s}")
        specs[s] = spec.canonical(d_model)
    return {"version": 1, "model": model, "layers": [specs[s] for s in cfg["stack"]]}
