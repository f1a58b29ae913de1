"""Throughput accounting for the training log: MFU, GPU memory, and per-layer MoE load.

MFU = 3 x forward FLOPs per token (the closed forms of ``hybridseq show``: matmuls, scan,
attention and the LM head; training ~ forward + 2x backward) x tokens/s of this process / the
device's dense peak. The peak is known for the GPUs listed in ``PEAK_TFLOPS`` (bf16/fp16 dense,
no sparsity) and can be given with the environment variable ``HYBRIDSEQ_PEAK_TFLOPS``; without a
known peak (CPU, fp32, an unlisted GPU) MFU is not logged rather than guessed.
"""
from __future__ import annotations

import os

import torch

# dense bf16/fp16 tensor-core peak per GPU, TFLOP/s (vendor datasheets, SXM parts)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def peak_flops(device: torch.device, precision: str | None) -> float | None:
    """The dense peak FLOP/s of ``device`` for ``precision`` (bf16/fp16), or None when unknown."""
    env = os.environ.get("HYBRIDSEQ_PEAK_TFLOPS")
    if env:
        return float(env) * 1e12
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():  # longest names first would matter only for GH200
        if key in name:
            return tflops * 1e12
    return None


def perf_fields(device: torch.device, flops_per_token: float | None, tokens_per_s: float,
                peak: float | None) -> dict:
    """``mfu`` (when the peak is known) and ``gpu_mem_gib`` (peak allocated since the last call,
    on CUDA) for one log record."""
    out = {}
    if peak and flops_per_token:
        out["mfu"] = 3.0 * flops_per_token * tokens_per_s / peak
    if device.type == "cuda":
        out["gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    return out


def moe_load(model: torch.nn.Module) -> dict:
    """``moe_load/<layer>``: each MoE layer's fraction of token slots per expert in its last
    forward (a list, one float per expert); ``moe_max_load``: the largest max/mean over layers."""
    out, worst = {}, None
    for i, layer in enumerate(getattr(model, "layers", [])):
        block = getattr(layer, "block", layer)
        load = (getattr(block, "metrics", None) or {}).get("load")  # blocks with routed experts
        if load is None:
            continue
        load = torch.as_tensor(load, dtype=torch.float32).detach().cpu()
        out[f"moe_load/{i}"] = [round(float(v), 5) for v in load]
        ratio = float(load.max() / load.mean().clamp_min(1e-12))
        worst = ratio if worst is None else max(worst, ratio)
    if worst is not None:
        out["moe_max_load"] = worst
    return out
