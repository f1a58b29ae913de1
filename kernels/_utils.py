"""Argument checks shared by the kernel entry points, and small tensor helpers.

``kernels/`` must not import ``hybridseq``, so bad arguments raise ``ValueError`` (wrong shape or
value) or ``TypeError`` (wrong dtype), each message naming the function, the argument, what was
expected and what was given.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_tensor(fn: str, name: str, t, expected: tuple, expected_desc: str) -> None:
    """Check that ``t`` is a floating tensor whose shape equals ``expected`` (None = any size)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{fn}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}"
        )
    ok = t.dim() == len(expected) and all(
        e is None or e == s for e, s in zip(expected, t.shape)
    )
    if not ok:
        raise ValueError(f"{fn}: {name} must have shape {expected_desc}, got {_shape(t)}")


def check_same_device(fn: str, ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(
                f"{fn}: {name} is on {t.device} but {ref_name} is on {ref.device}; "
                "all tensors must be on one device"
            )


def check_groups(fn: str, name: str, t: torch.Tensor, dim: int, lead: tuple, lead_desc: str):
    """B or C: ``lead + (n,)`` or ``lead + (g, n)`` with ``dim % g == 0``. Returns (g, n)."""
    check_tensor(fn, name, t, (*lead, None) if t.dim() == len(lead) + 1 else (*lead, None, None),
                 f"{lead_desc[:-1]}, dstate) or {lead_desc[:-1]}, ngroups, dstate)")
    if t.dim() == len(lead) + 1:
        return 1, t.shape[-1]
    g, n = t.shape[-2], t.shape[-1]
    if g < 1 or dim % g != 0:
        raise ValueError(
            f"{fn}: {name} has {g} groups, which must divide dim={dim} "
            f"(shape {_shape(t)})"
        )
    return g, n


@dataclass(frozen=True)
class ScanDims:
    batch: int
    seqlen: int
    dim: int
    dstate: int
    groups_B: int
    groups_C: int


def check_selective_scan_args(
    fn, u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None
) -> ScanDims:
    """Validate the selective-scan arguments of DESIGN.md; return the sizes."""
    check_tensor(fn, "u", u, (None, None, None), "(batch, seqlen, dim)")
    b, l, d = u.shape
    check_tensor(fn, "delta", delta, (b, l, d), f"(batch, seqlen, dim) = ({b}, {l}, {d}) like u")
    check_tensor(fn, "A", A, (d, None), f"(dim, dstate) = ({d}, dstate)")
    n = A.shape[1]
    if n < 1:
        raise ValueError(f"{fn}: A must have dstate >= 1, got shape {_shape(A)}")
    gB, nB = check_groups(fn, "B", B, d, (b, l), f"(batch, seqlen) = ({b}, {l})")
    gC, nC = check_groups(fn, "C", C, d, (b, l), f"(batch, seqlen) = ({b}, {l})")
    for name, nn in (("B", nB), ("C", nC)):
        if nn != n:
            raise ValueError(f"{fn}: {name} has dstate {nn} but A has dstate {n} (A is (dim, dstate))")
    if D is not None:
        check_tensor(fn, "D", D, (d,), f"(dim,) = ({d},)")
    if z is not None:
        check_tensor(fn, "z", z, (b, l, d), f"(batch, seqlen, dim) = ({b}, {l}, {d}) like u")
    if delta_bias is not None:
        check_tensor(fn, "delta_bias", delta_bias, (d,), f"(dim,) = ({d},)")
    if initial_state is not None:
        check_tensor(fn, "initial_state", initial_state, (b, d, n),
                     f"(batch, dim, dstate) = ({b}, {d}, {n})")
    check_same_device(fn, "u", u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
                      initial_state=initial_state)
    return ScanDims(b, l, d, n, gB, gC)


def check_causal_conv1d_args(fn, x, weight, bias=None, activation=None, initial_state=None):
    """Validate causal_conv1d arguments: x (b, l, d), weight (d, w), bias (d,),
    initial_state (b, w-1, d). Returns (b, l, d, w)."""
    check_tensor(fn, "x", x, (None, None, None), "(batch, seqlen, dim)")
    b, l, d = x.shape
    check_tensor(fn, "weight", weight, (d, None), f"(dim, width) = ({d}, width)")
    w = weight.shape[1]
    if w < 1:
        raise ValueError(f"{fn}: weight must have width >= 1, got shape {_shape(weight)}")
    if bias is not None:
        check_tensor(fn, "bias", bias, (d,), f"(dim,) = ({d},)")
    check_activation(fn, activation)
    if initial_state is not None:
        check_tensor(fn, "initial_state", initial_state, (b, w - 1, d),
                     f"(batch, width - 1, dim) = ({b}, {w - 1}, {d})")
    check_same_device(fn, "x", x, weight=weight, bias=bias, initial_state=initial_state)
    return b, l, d, w


def check_causal_conv1d_update_args(fn, x, conv_state, weight, bias=None, activation=None):
    """Validate causal_conv1d_update arguments: x (b, d), conv_state (b, w-1, d), weight (d, w)."""
    check_tensor(fn, "x", x, (None, None), "(batch, dim)")
    b, d = x.shape
    check_tensor(fn, "weight", weight, (d, None), f"(dim, width) = ({d}, width)")
    w = weight.shape[1]
    if w < 1:
        raise ValueError(f"{fn}: weight must have width >= 1, got shape {_shape(weight)}")
    check_tensor(fn, "conv_state", conv_state, (b, w - 1, d),
                 f"(batch, width - 1, dim) = ({b}, {w - 1}, {d})")
    if bias is not None:
        check_tensor(fn, "bias", bias, (d,), f"(dim,) = ({d},)")
    check_activation(fn, activation)
    check_same_device(fn, "x", x, conv_state=conv_state, weight=weight, bias=bias)
    return b, d, w


def check_selective_state_update_args(
    fn, state, x, dt, A, B, C, D=None, z=None, dt_bias=None
):
    """Validate selective_state_update arguments: state (b, d, n), x/dt/z (b, d),
    A (d, n), B/C (b, n) or (b, g, n), D/dt_bias (d,). Returns (b, d, n)."""
    check_tensor(fn, "x", x, (None, None), "(batch, dim)")
    b, d = x.shape
    check_tensor(fn, "A", A, (d, None), f"(dim, dstate) = ({d}, dstate)")
    n = A.shape[1]
    check_tensor(fn, "state", state, (b, d, n), f"(batch, dim, dstate) = ({b}, {d}, {n})")
    check_tensor(fn, "dt", dt, (b, d), f"(batch, dim) = ({b}, {d}) like x")
    for name, t in (("B", B), ("C", C)):
        _, nn = check_groups(fn, name, t, d, (b,), f"(batch) = ({b})")
        if nn != n:
            raise ValueError(f"{fn}: {name} has dstate {nn} but A has dstate {n}")
    if D is not None:
        check_tensor(fn, "D", D, (d,), f"(dim,) = ({d},)")
    if z is not None:
        check_tensor(fn, "z", z, (b, d), f"(batch, dim) = ({b}, {d}) like x")
    if dt_bias is not None:
        check_tensor(fn, "dt_bias", dt_bias, (d,), f"(dim,) = ({d},)")
    check_same_device(fn, "x", x, state=state, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)
    return b, d, n


def check_activation(fn, activation):
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"{fn}: activation must be None or 'silu', got {activation!r}")


def compute_dtype(*tensors) -> torch.dtype:
    """float64 when any given tensor is float64 (reference/test precision), else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) \
        else torch.float32


def expand_groups(BC: torch.Tensor, dim: int) -> torch.Tensor:
    """B or C per channel: (b, l, 1, n) (a view that broadcasts over dim) for (b, l, n);
    (b, l, dim, n) (one copy, channel i takes group i // (dim // g)) for (b, l, g, n)."""
    if BC.dim() == 3:
        return BC.unsqueeze(2)
    g = BC.shape[2]
    return BC.repeat_interleave(dim // g, dim=2)
