"""``hybridseq doctor``: versions, devices, and which backend each block kind will use, and why.

Versions come from package metadata (nothing heavy is imported). Backends are asked from the code
that picks them: ``hybridseq.kernels.triton_available()`` for the Mamba scan,
``describe_attention_backend(spec, device)`` for attention, and the MoE block's ``resolve_impl``
(or ``describe_moe_backend`` when a build exposes one) for MoE.
"""
from __future__ import annotations

import importlib
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


def _mamba_backend(device) -> tuple[str, str]:
    try:
        kernels = importlib.import_module("hybridseq.kernels")
    except Exception as e:  # noqa: BLE001 - report, do not crash the doctor
        return "unavailable", f"hybridseq.kernels failed to import: {e}"
    triton_ok = bool(getattr(kernels, "triton_available", lambda: False)())
    if device.type == "cuda":
        if triton_ok:
            return "triton", "CUDA device and Triton imports: fused selective scan + conv kernels"
        return "torch", "Triton is not importable: chunked PyTorch scan"
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    why = "CPU: chunked PyTorch scan (Triton kernels need CUDA"
    why += "; impl=triton runs them in the Triton interpreter, TRITON_INTERPRET=1 is set)" if interp else \
        "; set TRITON_INTERPRET=1 to run them in the interpreter with impl=triton)"
    return "torch", why


def _attention_backend(device) -> tuple[str, str]:
    from .config.schema import BLOCK_DEFAULTS

    for modname in ("hybridseq.blocks.attention", "hybridseq.blocks.attention_backends"):
        try:
            mod = importlib.import_module(modname)
        except Exception as e:  # noqa: BLE001
            return "unavailable", f"{modname} failed to import: {e}"
        fn = getattr(mod, "describe_attention_backend", None)
        if fn is not None:
            full = fn(dict(BLOCK_DEFAULTS["attention"]), device)
            window = fn({**BLOCK_DEFAULTS["attention"], "window": 256}, device)
            docs = fn(dict(BLOCK_DEFAULTS["attention"]), device, documents=True)
            why = f"{full[1]} (sliding window: {window[0]}, {window[1]})" if window != full else full[1]
            return full[0], f"{why} (document masks: {docs[0]}, {docs[1]})"
    return "torch SDPA", "this build does not describe its attention backends"


def _moe_backend(device) -> tuple[str, str]:
    try:
        mod = importlib.import_module("hybridseq.blocks.moe")
    except Exception as e:  # noqa: BLE001
        return "unavailable", f"hybridseq.blocks.moe failed to import: {e}"
    if hasattr(mod, "describe_moe_backend"):
        return tuple(mod.describe_moe_backend({"impl": "auto"}, device))
    impl = mod.resolve_impl("auto", device) if hasattr(mod, "resolve_impl") else "loop"
    mb = mod.megablocks_available() if hasattr(mod, "megablocks_available") else False
    doc = (getattr(mod.resolve_impl, "__doc__", "") or "").strip().replace("\n", " ")
    why = " ".join(doc.replace("``", "").split()).rstrip(".") or "default"
    why += f"; megablocks {'installed' if mb else 'not installed'}"
    return impl, why


def collect(device=None) -> dict:
    import torch

    from .train.engine import resolve_device

    dev = torch.device(device) if device is not None else resolve_device("auto")
    backends = {}
    for kind, fn in (("mamba", _mamba_backend), ("attention", _attention_backend), ("moe", _moe_backend)):
        try:
            backends[kind] = dict(zip(("backend", "why"), fn(dev)))
        except Exception as e:  # noqa: BLE001 - a broken backend is exactly what doctor reports
            backends[kind] = {"backend": "error", "why": f"{type(e).__name__}: {e}"}
    backends["mlp"] = {"backend": "torch", "why": "dense matmuls (cuBLAS on CUDA)"}
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
