"""Mamba kernels: selective scan, causal depthwise conv1d and the one-token decode steps.

Every op has a plain PyTorch reference (``*_ref``) and a public entry point with an ``impl``
keyword:

- ``"auto"``: the Triton kernel on CUDA tensors when Triton imports (and its module exists),
  else the PyTorch path;
- ``"torch"``: the PyTorch path (for the selective scan the chunked CPU training path,
  ``selective_scan_chunked``; for the other ops their reference);
- ``"triton"``: the Triton kernel. On CPU tensors only under ``TRITON_INTERPRET=1``;
- ``"ref"``: the sequential reference.

All tensors are channel-last, (batch, seqlen, dim). Importing this package never imports Triton:
the Triton modules are imported on first use.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

from ._utils import (
    check_causal_conv1d_args,
    check_causal_conv1d_update_args,
    check_selective_scan_args,
    check_selective_state_update_args,
)
from .causal_conv1d_ref import causal_conv1d_ref, causal_conv1d_update_ref
from .selective_scan_chunked import selective_scan_chunked
from .selective_scan_ref import selective_scan_ref
from .selective_state_update_ref import selective_state_update_ref

__all__ = [
    "selective_scan",
    "selective_scan_ref",
    "selective_scan_chunked",
    "causal_conv1d",
    "causal_conv1d_ref",
    "causal_conv1d_update",
    "causal_conv1d_update_ref",
    "selective_state_update",
    "selective_state_update_ref",
    "triton_available",
    "IMPLS",
]

IMPLS = ("auto", "torch", "triton", "ref")

_TRITON_STATUS: tuple[bool, str] | None = None


def _triton_status() -> tuple[bool, str]:
    """(importable, reason when not). Imports Triton on the first call only."""
    global _TRITON_STATUS
    if _TRITON_STATUS is None:
        if importlib.util.find_spec("triton") is None:
            _TRITON_STATUS = (False, "the 'triton' package is not installed")
        else:
            try:
                import triton  # noqa: F401
                import triton.language  # noqa: F401

                _TRITON_STATUS = (True, "")
            except Exception as e:  # a broken install: say why
                _TRITON_STATUS = (False, f"'import triton' failed: {type(e).__name__}: {e}")
    return _TRITON_STATUS


def triton_available() -> bool:
    """True when Triton can be imported (it may still need CUDA or TRITON_INTERPRET=1 to run)."""
    return _triton_status()[0]


def triton_interpreting() -> bool:
    """True under Triton's interpreter (TRITON_INTERPRET=1), where kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


_MODULES: dict = {}


def _module_present(module: str) -> bool:
    """Whether kernels/<module>.py exists (looked up once: find_spec searches the file system,
    about 50 us per call)."""
    if module not in _MODULES:
        _MODULES[module] = importlib.util.find_spec(f"{__name__}.{module}") is not None
    return _MODULES[module]


def _resolve_impl(op: str, impl, tensor, module: str) -> str:
    """Turn ``impl`` into one of "torch", "triton", "ref", or raise a clear error."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
    if impl == "auto":
        if tensor.is_cuda and triton_available() and _module_present(module):
            return "triton"
        return "torch"
    if impl == "triton":
        ok, why = _triton_status()
        if not ok:
            raise RuntimeError(f"{op}(impl='triton'): Triton is unavailable: {why}")
        if not tensor.is_cuda and not triton_interpreting():
            raise RuntimeError(
                f"{op}(impl='triton'): the tensors are on {tensor.device}; Triton kernels run on "
                "CUDA tensors, or on CPU tensors only under the interpreter (set "
                "TRITON_INTERPRET=1 before importing hybridseq.kernels). Use impl='torch' on CPU."
            )
        if not _module_present(module):
            raise NotImplementedError(
                f"{op}(impl='triton'): the Triton kernel module kernels/{module}.py is missing"
            )
    return impl


def _triton_fn(op: str, module: str, attr: str):
    mod = importlib.import_module(f"{__name__}.{module}")
    fn = getattr(mod, attr, None)
    if fn is None:
        raise NotImplementedError(f"{op}(impl='triton'): kernels/{module}.py defines no {attr}")
    return fn


def selective_scan(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    initial_state=None,
    return_final_state=False,
    impl="auto",
):
    """Selective scan (Mamba-1 S6), contract of DESIGN.md:

        dt = softplus(delta + delta_bias)  (or delta + delta_bias),
        h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t  (fp32 state, h_{-1} = initial_state or 0),
        y_t = C_t . h_t + D u_t,  y = y * silu(z) when z is given.

    u, delta, z: (b, l, d); B, C: (b, l, n) or (b, l, g, n) with d % g == 0; A: (d, n) fp32;
    D, delta_bias: (d,); initial_state: (b, d, n). Returns y (u's dtype), or (y, h_last (b, d, n)
    fp32) with ``return_final_state``. Differentiable in every tensor input.
    """
    dims = check_selective_scan_args("selective_scan", u, delta, A, B, C, D, z, delta_bias,
                                     initial_state)
    which = _resolve_impl("selective_scan", impl, u, "selective_scan_triton")
    if which == "triton":  # checked above: the module's entry point that does not check again
        fn = _triton_fn("selective_scan", "selective_scan_triton", "run_selective_scan_triton")
        return fn(dims, u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                  delta_softplus=delta_softplus, initial_state=initial_state,
                  return_final_state=return_final_state)
    if which == "ref":
        fn = selective_scan_ref
    else:
        fn = selective_scan_chunked
    return fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
              initial_state=initial_state, return_final_state=return_final_state)


def causal_conv1d(x, weight, bias=None, activation=None, initial_state=None,
                  return_final_state=False, impl="auto"):
    """Causal depthwise conv1d over time: y[:, t, c] = act(bias[c] + sum_k weight[c, k] *
    x[:, t - (w-1) + k, c]), with the w-1 inputs before t=0 taken from ``initial_state``
    (b, w-1, d) or zeros. x (b, l, d), weight (d, w), bias (d,), activation None|"silu".
    Returns y (b, l, d), or (y, final_state (b, w-1, d)) = the last w-1 inputs."""
    check_causal_conv1d_args("causal_conv1d", x, weight, bias, activation, initial_state)
    which = _resolve_impl("causal_conv1d", impl, x, "causal_conv1d_triton")
    fn = (_triton_fn("causal_conv1d", "causal_conv1d_triton", "causal_conv1d_triton")
          if which == "triton" else causal_conv1d_ref)
    return fn(x, weight, bias=bias, activation=activation, initial_state=initial_state,
              return_final_state=return_final_state)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, impl="auto"):
    """One decoding step of ``causal_conv1d``: x (b, d) one token, conv_state (b, w-1, d) the
    previous w-1 inputs. Returns (y (b, d), new_conv_state (b, w-1, d)); conv_state is not
    modified."""
    check_causal_conv1d_update_args("causal_conv1d_update", x, conv_state, weight, bias, activation)
    which = _resolve_impl("causal_conv1d_update", impl, x, "causal_conv1d_triton")
    fn = (_triton_fn("causal_conv1d_update", "causal_conv1d_triton", "causal_conv1d_update_triton")
          if which == "triton" else causal_conv1d_update_ref)
    return fn(x, conv_state, weight, bias=bias, activation=activation)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                           dt_softplus=False, impl="auto"):
    """One decoding step of ``selective_scan``: state (b, d, n) fp32, x/dt/z (b, d), B/C (b, n) or
    (b, g, n). Returns (y (b, d) in x's dtype, new_state (b, d, n) fp32); ``state`` is not
    modified."""
    check_selective_state_update_args("selective_state_update", state, x, dt, A, B, C, D, z,
                                      dt_bias)
    which = _resolve_impl("selective_state_update", impl, x, "selective_state_update_triton")
    fn = (_triton_fn("selective_state_update", "selective_state_update_triton",
                     "selective_state_update_triton")
          if which == "triton" else selective_state_update_ref)
    return fn(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
