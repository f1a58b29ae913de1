"""MoE router logits in fp32: logits = x.float() @ W^T for x (N, D) in any float dtype and the
router weight W (E, D) fp32.

- ``router_logits_ref(x, w)``: ``F.linear(x.float(), w.float())`` (autograd; it materialises the
  fp32 copy of x, keeps it for dW, and returns dx in fp32 then casts it back).
- ``router_logits(x, w, impl)``: impl ``torch`` (the reference), ``triton``
  (``router_logits_triton.py``: the same fp32 math read straight from x; dx written in x's
  dtype; on CPU only under TRITON_INTERPRET=1) or ``auto`` (triton for CUDA tensors when Triton
  imports, else torch). The MoE router knob ``Router.logits_impl`` picks.
- ``router_logits_tap(x, w, impl)``: (logits, x_tap): the same logits, and x passed through (a
  view) for x's other consumers (the experts). With the Triton impl the backward then adds the
  gradient x_tap receives into the router's dx inside the dx kernel: no separate (N, D) add of
  the two gradients of x, which autograd would otherwise launch (61 us a step for a d_model 2048,
  16384-token layer on an H100).

Under ``torch.compile`` the Triton path runs as the custom op ``hybridseq::router_logits_fwd``
(``router_logits_triton.py``), and x_tap is x itself (a custom op cannot return a view of its
input): autograd then adds x's two gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._ops import compiling
from ..backend import resolve

ROUTER_LOGITS_IMPLS = ("auto", "torch", "triton")


def router_logits_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), w.float())


class _RouterLogits(torch.autograd.Function):
    """(logits, a view of x); the backward adds the view's gradient (x's other consumers) into
    the router's dx kernel. ``router_logits`` ignores the view (its gradient is then None)."""

    @staticmethod
    def forward(ctx, x, w):
        from .router_logits_triton import router_logits_fwd_triton

        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not zeros
        ctx.save_for_backward(x, w)
        return router_logits_fwd_triton(x, w), x.view_as(x)

    @staticmethod
    def backward(ctx, g, g_x):
        from .router_logits_triton import router_logits_bwd_triton

        x, w = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if g is None:  # only x's other consumers sent a gradient
            return g_x, None
        if g_x is not None and g_x.dtype != x.dtype:
            g_x = g_x.to(x.dtype)
        dx, dw = router_logits_bwd_triton(g, x, w, need_dx, need_dw,
                                          dx_add=g_x if need_dx else None)
        return dx, (dw.to(w.dtype) if dw is not None else None)


def _resolve(impl: str, x: torch.Tensor) -> str:
    if x.dtype == torch.float64:  # the reference's own precision: no kernel
        impl = "torch" if impl in ROUTER_LOGITS_IMPLS else impl
    return resolve("router logits", impl, x, choices=ROUTER_LOGITS_IMPLS)


def router_logits_tap(x: torch.Tensor, w: torch.Tensor, impl: str = "torch"):
    """(logits (N, E) fp32, x_tap): see the module docstring. x_tap is x itself on the torch
    path; on the Triton path a view of x whose gradient the router's backward adds into its dx."""
    if _resolve(impl, x) == "torch":
        return router_logits_ref(x, w), x
    if compiling():  # the custom op; x's other consumers read x itself
        from .router_logits_triton import router_logits_fwd_op

        return router_logits_fwd_op(x, w.float()), x
    logits, x_tap = _RouterLogits.apply(x, w.float())
    # without a gradient of x, x's other consumers get x itself (the view would require grad
    # through w and give them a gradient path for nothing)
    return logits, (x_tap if x.requires_grad else x)


def router_logits(x: torch.Tensor, w: torch.Tensor, impl: str = "torch") -> torch.Tensor:
    """(N, E) fp32 logits of x (N, D) and w (E, D) fp32 (see the module docstring)."""
    if _resolve(impl, x) == "torch":
        return router_logits_ref(x, w)
    if compiling():
        from .router_logits_triton import router_logits_fwd_op

        return router_logits_fwd_op(x, w.float())
    return _RouterLogits.apply(x, w.float())[0]
