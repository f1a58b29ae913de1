"""The one place that decides which implementation of a kernel runs (``impl``).

Every op of ``hybridseq.kernels`` takes an ``impl`` keyword and asks ``resolve`` what it means:

- ``"auto"``: the Triton kernel for CUDA tensors when Triton imports (and the op's limits
  allow it, ``fits``), else the plain-PyTorch path;
- ``"torch"``: the plain-PyTorch path (for the scans, their chunked CPU training path);
- ``"triton"``: the Triton kernel: on CUDA tensors, or on CPU tensors under Triton's
  interpreter (``TRITON_INTERPRET=1``); anywhere else a ``RuntimeError`` that says why;
- ``"ref"``: the sequential reference (the scans; elsewhere the same as ``torch``).

The blocks pass their spec's ``impl`` through unchanged, and ``hybridseq doctor`` asks
``describe`` what ``auto`` gives on a device, so the rule is written once. Importing this module
never imports Triton: ``triton_available`` tries it on first use and remembers the answer.
"""
from __future__ import annotations

import importlib.util
import os

IMPLS = ("auto", "torch", "triton", "ref")

_STATUS: list = []  # [(importable, reason)] once known


def _status() -> tuple[bool, str]:
    if not _STATUS:
        if importlib.util.find_spec("triton") is None:
            _STATUS.append((False, "the 'triton' package is not installed"))
        else:
            try:
                import triton  # noqa: F401
                import triton.language  # noqa: F401

                _STATUS.append((True, ""))
            except Exception as e:  # a broken install: keep the reason for the error message
                _STATUS.append((False, f"'import triton' failed: {type(e).__name__}: {e}"))
    return _STATUS[0]


def triton_available() -> bool:
    """True when Triton imports (it may still need CUDA, or the interpreter, to run)."""
    return _status()[0]


def triton_unavailable_reason() -> str:
    """Why Triton does not import ("" when it does)."""
    return _status()[1]


def interpreting() -> bool:
    """True under Triton's interpreter (``TRITON_INTERPRET=1``): kernels run on CPU tensors.
    Read from the environment at each call (Triton reads it when a kernel is first decorated, so
    set it before importing a Triton kernel module)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _is_cuda(where) -> bool:
    if hasattr(where, "is_cuda"):
        return bool(where.is_cuda)
    return str(getattr(where, "type", where)).startswith("cuda")


def resolve(op: str, impl: str, where, *, fits: bool = True, limits: str = "",
            choices: tuple = IMPLS) -> str:
    """``"triton"``, ``"torch"`` or ``"ref"`` for op ``op`` asked for ``impl`` on ``where`` (a
    tensor or a device). ``fits``: the op's own limits (sizes, dtypes) allow its Triton kernel;
    ``limits`` says what they are, for the error when ``impl="triton"`` does not fit.
    ``choices``: the impl values the op accepts. Raises ``ValueError`` for an unknown impl and
    ``RuntimeError`` when ``"triton"`` cannot run here."""
    if impl not in choices:
        raise ValueError(f"{op} impl must be one of {', '.join(map(repr, choices))}, got {impl!r}")
    if impl == "auto":
        return "triton" if fits and _is_cuda(where) and triton_available() else "torch"
    if impl == "triton":
        ok, why = _status()
        if not ok:
            raise RuntimeError(f"{op}(impl='triton'): Triton is unavailable: {why}")
        if not _is_cuda(where) and not interpreting():
            dev = getattr(where, "device", where)
            raise RuntimeError(
                f"{op}(impl='triton'): the tensors are on {dev}; Triton kernels run on CUDA "
                "tensors, or on CPU tensors only under the interpreter (set TRITON_INTERPRET=1 "
                "before importing hybridseq.kernels). Use impl='torch' on CPU.")
        if not fits:
            raise ValueError(f"{op}(impl='triton'): these inputs are outside the Triton kernel's "
                             f"limits{': ' + limits if limits else ''}")
    return impl


def describe(device) -> tuple[str, str]:
    """(backend, why) that ``impl="auto"`` gives for the Mamba kernels on ``device``: what
    ``hybridseq doctor`` prints."""
    ok, why_not = _status()
    if _is_cuda(device):
        if ok:
            return "triton", "CUDA device and Triton imports: fused selective scan + conv kernels"
        return "torch", f"Triton is not importable ({why_not}): chunked PyTorch scan"
    why = "CPU: chunked PyTorch scan (Triton kernels need CUDA"
    why += ("; impl=triton runs them in the Triton interpreter, TRITON_INTERPRET=1 is set)"
            if interpreting() else
            "; set TRITON_INTERPRET=1 to run them in the interpreter with impl=triton)")
    return "torch", why


__all__ = ["IMPLS", "describe", "interpreting", "resolve", "triton_available",
           "triton_unavailable_reason"]
