"""``hybridseq doctor``: versions, devices, and which backend each block kind will use, and why.

Versions come from package metadata (nothing heavy is imported). Backends are asked from the code
that picks them: each block kind's spec (``spec.backend(device)``, at the kind's defaults), which
asks ``hybridseq.kernels.backend`` or the kind's own backend choice.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

PACKAGES = ("torch", "triton", "deepspeed", "omegaconf", "numpy", "safetensors", "tqdm",
            "flash_attn", "megablocks", "mamba_ssm", "causal_conv1d")
_DIST_NAMES = {"flash_attn": "flash-attn", "mamba_ssm": "mamba-ssm", "causal_conv1d": "causal-conv1d"}


def _version(pkg: str) -> str | None:
    for name in (pkg, _DIST_NAMES.get(pkg, pkg), pkg.replace("_", "-")):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def devices() -> dict:
    import torch

    out = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "cuda_available": torch.cuda.is_available(), "cuda_version": torch.version.cuda, "gpus": []}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out["gpus"].append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                                "memory_gib": round(p.total_memory / 2**30, 1),
                                "bf16": torch.cuda.is_bf16_supported()})
    return out


def collect(device=None) -> dict:
    import torch

    from .train.engine import resolve_device

    dev = torch.device(device) if device is not None else resolve_device("auto")
    from .blocks import KINDS

    backends = {}
    for kind, spec_class in KINDS.items():
        try:
            backends[kind] = dict(zip(("backend", "why"), spec_class().backend(dev)))
        except Exception as e:  # noqa: BLE001 - a broken backend is exactly what doctor reports
            backends[kind] = {"backend": "error", "why": f"{type(e).__name__}: {e}"}
    return {
        "python": sys.version.split()[0], "platform": platform.platform(),
        "versions": {p: _version(p) for p in PACKAGES},
        "devices": devices(), "device": str(dev),
        "precision": "bf16 autocast" if dev.type == "cuda" else "fp32",
        "backends": backends,
        "env": {k: os.environ[k] for k in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "DS_ACCELERATOR")
                if k in os.environ},
    }


def format_report(info: dict) -> str:
    lines = [f"hybridseq doctor  (python {info['python']}, {info['platform']})", "", "packages:"]
    for p, v in info["versions"].items():
        lines.append(f"  {p:<14} {v or '-- not installed'}")
    d = info["devices"]
    lines += ["", "devices:", f"  cpu: {d['cpu_count']} cores, torch threads {d['torch_threads']}"]
    if d["gpus"]:
        for g in d["gpus"]:
            lines.append(f"  cuda:{g['index']}: {g['name']} (sm {g['capability']}, {g['memory_gib']} GiB, "
                         f"bf16 {'yes' if g['bf16'] else 'no'}), CUDA {d['cuda_version']}")
    else:
        lines.append("  cuda: not available")
    lines += ["", f"training on {info['device']} ({info['precision']}): backend per block kind"]
    for kind, b in info["backends"].items():
        lines.append(f"  {kind:<10} {b['backend']:<12} {b['why']}")
    if info["env"]:
        lines += ["", "environment: " + ", ".join(f"{k}={v}" for k, v in info["env"].items())]
    return "\n".join(lines)
