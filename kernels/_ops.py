"""How the Triton kernels meet ``torch.compile``: ``torch.library`` custom ops, used while tracing.

Every Triton launcher of ``hybridseq.kernels`` is also registered as a custom op in the
``hybridseq`` namespace (``torch.ops.hybridseq.<name>``), next to the launcher in its Triton
module, with

- ``register_fake``: the shape function. Dynamo and AOTAutograd trace the op on fake tensors
  through it, without running a kernel (a Triton launch is opaque to them: it takes raw
  pointers and strides, which a fake tensor does not have);
- ``register_autograd`` for the differentiable ops: the backward is another custom op, so a
  compiled forward+backward holds both as single graph nodes.

Each public entry point keeps its Python side (argument checks, ``impl`` resolution, reshapes)
outside the ops: dynamo traces that Python. Only the kernel launches sit inside.

Two routes to the same kernels. Eager calls go through the ops' plain autograd.Function twins,
because a custom op's dispatch costs about 20 us of host time per call with autograd (measured
on CPU: 27 us against 8 for an autograd.Function doing the same), which a small model's
training step, already host-bound, would pay for every kernel. While ``torch.compile`` traces
(``compiling()``), the entry points call the custom ops instead; the compiled graph then calls
them with no Python around each one. Both routes call the same launch functions, and the tests
hold their results equal.
"""
from __future__ import annotations

import contextlib

import torch

NAMESPACE = "hybridseq"


def compiling() -> bool:
    """True while dynamo traces (``torch.compile``): entry points then call the custom ops."""
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(fn()) if fn is not None else False


def qualname(name: str) -> str:
    """The op's full name, ``hybridseq::<name>``."""
    return f"{NAMESPACE}::{name}"


def custom_op(name: str, mutates_args=()):
    """``torch.library.custom_op`` under the ``hybridseq`` namespace (the schema is inferred from
    the function's annotations). An op already registered under that name (its module executed
    a second time, e.g. imported as ``kernels.x`` and as ``hybridseq.kernels.x``) is returned as
    it is: the registry is process-wide, and a second definition would raise."""
    def wrap(fn):
        existing = _existing(qualname(name))
        if existing is not None:
            return existing
        return torch.library.custom_op(qualname(name), mutates_args=tuple(mutates_args))(fn)

    return wrap


def _existing(qual: str):
    try:
        from torch._library.custom_ops import OPDEFS
    except ImportError:  # a torch that keeps no such table: define (first import only)
        return None
    return OPDEFS.get(qual)


def profile_scope(name: str):
    """A ``record_function`` scope ``hybridseq.<name>`` while the torch profiler records (so a
    profile can tell an entry point's CPU ops, e.g. the chunked scans', from the rest, as
    ``hybridseq bench train --profile`` does); nothing otherwise, nor while compiling."""
    if not getattr(torch.autograd.profiler, "_is_profiler_enabled", True) or compiling():
        return contextlib.nullcontext()
    return torch.autograd.profiler.record_function(f"{NAMESPACE}.{name}")


__all__ = ["NAMESPACE", "compiling", "custom_op", "profile_scope", "qualname"]
