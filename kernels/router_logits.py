"""MoE router logits in fp32: logits = x.float() @ W^T for x (N, D) in any float dtype and the
router weight W (E, D) fp32.

- ``router_logits_ref(x, w)``: ``F.linear(x.float(), w.float())`` (autograd; it materialises the
  fp32 copy of x, keeps it for dW, and returns dx in fp32 then casts it back).
- ``router_logits(x, w, impl)``: impl ``torch`` (the reference), ``triton``
  (``router_logits_triton.py``: the same fp32 math read straight from x; dx written in x's
  dtype; on CPU only under TRITON_INTERPRET=1) or ``auto`` (triton for CUDA tensors when Triton
  imports, else torch). The MoE router knob ``Router.logits_impl`` picks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import triton_available

ROUTER_LOGITS_IMPLS = ("auto", "torch", "triton")


def router_logits_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), w.float())


class _RouterLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        from .router_logits_triton import router_logits_fwd_triton

        ctx.save_for_backward(x, w)
        return router_logits_fwd_triton(x, w)

    @staticmethod
    def backward(ctx, g):
        from .router_logits_triton import router_logits_bwd_triton

        x, w = ctx.saved_tensors
        dx, dw = router_logits_bwd_triton(g, x, w, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return dx, (dw.to(w.dtype) if dw is not None else None)


def router_logits(x: torch.Tensor, w: torch.Tensor, impl: str = "torch") -> torch.Tensor:
    """(N, E) fp32 logits of x (N, D) and w (E, D) fp32 (see the module docstring)."""
    if impl not in ROUTER_LOGITS_IMPLS:
        raise ValueError(f"router logits impl must be one of {'|'.join(ROUTER_LOGITS_IMPLS)}, got {impl!r}")
    if impl == "auto":
        impl = "triton" if x.is_cuda and triton_available() else "torch"
    if impl == "torch" or x.dtype == torch.float64:
        return router_logits_ref(x, w)
    return _RouterLogits.apply(x, w.float())
