"""hybridseq's kernels: pure tensor functions, one folder per op.

    scan/         Mamba-1 selective scan and its decode step
    ssd/          Mamba-2 SSD scan (chunked state-space duality) and its decode step
    norms/        gated RMSNorm (Mamba-2), fused residual add + RMSNorm
    losses/       fused LM head + cross-entropy (no (N, V) float32 logits)
    conv1d/       causal depthwise conv1d and its decode step
    moe/          router logits and top-k, permutation by expert, grouped expert MLP
    activations/  fused SwiGLU
    attention/    one-token decode attention over a fixed-capacity KV cache (CUDA-graph safe)

Each op folder holds its public entry point, a plain-PyTorch reference (``*_ref``) that runs on
CPU, its CPU training path where that differs from the reference, and its Triton kernels. Every
entry point takes ``impl`` (auto | torch | triton | ref), resolved in one place,
``backend.resolve``. All tensors are channel-last, (batch, seqlen, dim). Importing this package
never imports Triton; the Triton modules load on first use. Under ``torch.compile`` the Triton
kernels run as ``torch.library`` custom ops (``_ops.py``), so a whole model traces without
graph breaks. Nothing here knows about models: the
package imports nothing from the rest of hybridseq.
"""
from __future__ import annotations

from .attention import decode_attention, decode_attention_ref
from .backend import IMPLS, interpreting as triton_interpreting, resolve, triton_available
from .conv1d import causal_conv1d, causal_conv1d_ref, causal_conv1d_update, causal_conv1d_update_ref
from .losses import linear_cross_entropy, linear_cross_entropy_ref
from .norms import add_rmsnorm, add_rmsnorm_ref, rmsnorm_gated, rmsnorm_gated_ref
from .scan import (selective_scan, selective_scan_chunked, selective_scan_ref,
                   selective_state_update, selective_state_update_ref)
from .ssd import ssd_scan, ssd_scan_chunked, ssd_scan_ref, ssd_state_update, ssd_state_update_ref

__all__ = [
    "IMPLS",
    "add_rmsnorm",
    "add_rmsnorm_ref",
    "causal_conv1d",
    "causal_conv1d_ref",
    "causal_conv1d_update",
    "causal_conv1d_update_ref",
    "decode_attention",
    "decode_attention_ref",
    "linear_cross_entropy",
    "linear_cross_entropy_ref",
    "resolve",
    "rmsnorm_gated",
    "rmsnorm_gated_ref",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_ref",
    "selective_state_update",
    "selective_state_update_ref",
    "ssd_scan",
    "ssd_scan_chunked",
    "ssd_scan_ref",
    "ssd_state_update",
    "ssd_state_update_ref",
    "triton_available",
    "triton_interpreting",
]
