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
    fn, u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None, seq_idx=None
) -> ScanDims:
    """Validate the selective-scan arguments (the contract in docs/kernels.md); return the sizes."""
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
    check_seq_idx(fn, seq_idx, b, l)
    check_same_device(fn, "u", u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
                      initial_state=initial_state, seq_idx=seq_idx)
    return ScanDims(b, l, d, n, gB, gC)


def check_causal_conv1d_args(fn, x, weight, bias=None, activation=None, initial_state=None,
                             seq_idx=None):
    """Validate causal_conv1d arguments: x (b, l, d), weight (d, w), bias (d,),
    initial_state (b, w-1, d), seq_idx (b, l) integer. Returns (b, l, d, w)."""
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
    check_seq_idx(fn, seq_idx, b, l)
    check_same_device(fn, "x", x, weight=weight, bias=bias, initial_state=initial_state,
                      seq_idx=seq_idx)
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


def doc_starts(seq_idx: torch.Tensor) -> torch.Tensor:
    """(b, l) bool: True at the tokens that start a new document after the first, i.e. where
    seq_idx differs from the token before (never at t = 0)."""
    starts = torch.zeros(seq_idx.shape, dtype=torch.bool, device=seq_idx.device)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return starts


def expand_groups(BC: torch.Tensor, dim: int) -> torch.Tensor:
    """B or C per channel: (b, l, 1, n) (a view that broadcasts over dim) for (b, l, n);
    (b, l, dim, n) (one copy, channel i takes group i // (dim // g)) for (b, l, g, n)."""
    if BC.dim() == 3:
        return BC.unsqueeze(2)
    g = BC.shape[2]
    return BC.repeat_interleave(dim // g, dim=2)


@dataclass(frozen=True)
class SSDDims:
    batch: int
    seqlen: int
    nheads: int
    headdim: int
    ngroups: int
    dstate: int


_INT_DTYPES = (torch.int32, torch.int64)


def check_dt_limit(fn: str, dt_limit) -> None:
    """dt_limit: None or a pair (lo, hi) of real numbers with lo <= hi (hi may be inf)."""
    if dt_limit is None:
        return
    if not isinstance(dt_limit, (tuple, list)) or len(dt_limit) != 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in dt_limit):
        raise TypeError(f"{fn}: dt_limit must be None or a pair (lo, hi) of numbers, "
                        f"got {dt_limit!r}")
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    if not lo <= hi:  # also false when either is NaN
        raise ValueError(f"{fn}: dt_limit must be a pair (lo, hi) with lo <= hi, got {dt_limit!r}")


def check_seq_idx(fn: str, seq_idx, b: int, l: int) -> None:
    """seq_idx: None or an int32/int64 tensor (batch, seqlen), non-decreasing along each row.
    Monotonicity is checked for CPU tensors only (on a GPU it would cost a device sync and break
    CUDA-graph capture)."""
    if seq_idx is None:
        return
    if not isinstance(seq_idx, torch.Tensor):
        raise TypeError(f"{fn}: seq_idx must be a torch.Tensor, got {type(seq_idx).__name__}")
    if seq_idx.dtype not in _INT_DTYPES:
        raise TypeError(f"{fn}: seq_idx must be int32 or int64, got {seq_idx.dtype}")
    if tuple(seq_idx.shape) != (b, l):
        raise ValueError(f"{fn}: seq_idx must have shape (batch, seqlen) = ({b}, {l}), "
                         f"got {_shape(seq_idx)}")
    if seq_idx.device.type == "cpu" and l > 1 and bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any()):
        raise ValueError(f"{fn}: seq_idx must be non-decreasing along each row")


def check_ssd_args(fn, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_limit=None,
                   initial_state=None, seq_idx=None) -> SSDDims:
    """Validate the SSD (Mamba-2) scan arguments: x, z (b, l, h, p); dt (b, l, h); A (h,);
    B, C (b, l, g, n) with h % g == 0; D (h,) or (h, p); dt_bias (h,); initial_state
    (b, h, p, n); seq_idx (b, l) int; dt_limit (lo, hi). Returns the sizes."""
    check_tensor(fn, "x", x, (None, None, None, None), "(batch, seqlen, nheads, headdim)")
    b, l, h, p = x.shape
    check_tensor(fn, "dt", dt, (b, l, h), f"(batch, seqlen, nheads) = ({b}, {l}, {h})")
    check_tensor(fn, "A", A, (h,), f"(nheads,) = ({h},)")
    check_tensor(fn, "B", B, (b, l, None, None),
                 f"(batch, seqlen, ngroups, dstate) = ({b}, {l}, ngroups, dstate)")
    g, n = B.shape[2], B.shape[3]
    if g < 1 or h % g != 0:
        raise ValueError(f"{fn}: B has {g} groups, which must divide nheads={h} "
                         f"(shape {_shape(B)})")
    check_tensor(fn, "C", C, (b, l, g, n),
                 f"(batch, seqlen, ngroups, dstate) = ({b}, {l}, {g}, {n}) like B")
    _check_ssd_common(fn, h, p, n, D, dt_bias, dt_limit)
    if z is not None:
        check_tensor(fn, "z", z, (b, l, h, p), f"(batch, seqlen, nheads, headdim) = "
                     f"({b}, {l}, {h}, {p}) like x")
    if initial_state is not None:
        check_tensor(fn, "initial_state", initial_state, (b, h, p, n),
                     f"(batch, nheads, headdim, dstate) = ({b}, {h}, {p}, {n})")
    check_seq_idx(fn, seq_idx, b, l)
    check_same_device(fn, "x", x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias,
                      initial_state=initial_state, seq_idx=seq_idx)
    return SSDDims(b, l, h, p, g, n)


def _check_ssd_common(fn, h, p, n, D, dt_bias, dt_limit):
    if n < 1:
        raise ValueError(f"{fn}: B and C must have dstate >= 1, got dstate {n}")
    if D is not None:
        desc = f"(nheads,) = ({h},) or (nheads, headdim) = ({h}, {p})"
        two_d = isinstance(D, torch.Tensor) and D.dim() == 2
        check_tensor(fn, "D", D, (h, p) if two_d else (h,), desc)
    if dt_bias is not None:
        check_tensor(fn, "dt_bias", dt_bias, (h,), f"(nheads,) = ({h},)")
    check_dt_limit(fn, dt_limit)


def check_ssd_state_update_args(fn, state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                                dt_limit=None) -> SSDDims:
    """Validate ssd_state_update arguments: state (b, h, p, n) float32 (float64 for reference
    precision), updated in place; x, z (b, h, p); dt (b, h); A (h,); B, C (b, g, n) with
    h % g == 0; D (h,) or (h, p); dt_bias (h,). Returns the sizes (seqlen 1)."""
    check_tensor(fn, "x", x, (None, None, None), "(batch, nheads, headdim)")
    b, h, p = x.shape
    check_tensor(fn, "dt", dt, (b, h), f"(batch, nheads) = ({b}, {h})")
    check_tensor(fn, "A", A, (h,), f"(nheads,) = ({h},)")
    check_tensor(fn, "B", B, (b, None, None), f"(batch, ngroups, dstate) = ({b}, ngroups, dstate)")
    g, n = B.shape[1], B.shape[2]
    if g < 1 or h % g != 0:
        raise ValueError(f"{fn}: B has {g} groups, which must divide nheads={h} "
                         f"(shape {_shape(B)})")
    check_tensor(fn, "C", C, (b, g, n), f"(batch, ngroups, dstate) = ({b}, {g}, {n}) like B")
    check_tensor(fn, "state", state, (b, h, p, n),
                 f"(batch, nheads, headdim, dstate) = ({b}, {h}, {p}, {n})")
    if state.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{fn}: state must be float32 (float64 for reference precision), "
                        f"got {state.dtype}")
    _check_ssd_common(fn, h, p, n, D, dt_bias, dt_limit)
    if z is not None:
        check_tensor(fn, "z", z, (b, h, p), f"(batch, nheads, headdim) = ({b}, {h}, {p}) like x")
    check_same_device(fn, "x", x, state=state, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)
    return SSDDims(b, 1, h, p, g, n)


def check_chunk_size(fn: str, chunk_size) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be a positive int, got {chunk_size!r}")


def check_rmsnorm_gated_args(fn, x, weight, z=None, eps=1e-5, group_size=None) -> tuple:
    """Validate rmsnorm_gated arguments: x, z (..., d); weight (d,); group_size None or a
    positive divisor of d; eps >= 0. Returns (d, group_size)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{fn}: x must have shape (..., d), got a 0-d tensor")
    check_tensor(fn, "x", x, (None,) * x.dim(), "(..., d)")
    d = x.shape[-1]
    check_tensor(fn, "weight", weight, (d,), f"(d,) = ({d},)")
    if z is not None:
        check_tensor(fn, "z", z, tuple(x.shape), f"{_shape(x)} like x")
    if group_size is None:
        group_size = max(d, 1)
    elif isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 \
            or d % group_size != 0:
        raise ValueError(f"{fn}: group_size must be None or a positive divisor of d={d}, "
                         f"got {group_size!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"{fn}: eps must be a number >= 0, got {eps!r}")
    check_same_device(fn, "x", x, weight=weight, z=z)
    return d, group_size


def check_decode_attention_args(fn, q, k_cache, v_cache, pos, ring=False, scale=None) -> tuple:
    """Validate decode_attention arguments: q (batch, n_heads, head_dim); k_cache, v_cache
    (batch, n_kv_heads, cap, head_dim) with n_heads % n_kv_heads == 0; pos a Python int or an
    int32/int64 tensor of shape () or (batch,) on q's device; scale None or a number.
    A Python int pos must be >= 0, and < cap for a linear cache (``ring=False``); the values of a
    tensor pos are the caller's promise (reading them would need a device sync and break CUDA-graph
    capture). Returns (batch, n_heads, n_kv_heads, cap, head_dim)."""
    check_tensor(fn, "q", q, (None, None, None), "(batch, n_heads, head_dim)")
    b, h, d = q.shape
    check_tensor(fn, "k_cache", k_cache, (b, None, None, d),
                 f"(batch, n_kv_heads, cap, head_dim) = ({b}, n_kv_heads, cap, {d})")
    hkv, cap = k_cache.shape[1], k_cache.shape[2]
    check_tensor(fn, "v_cache", v_cache, (b, hkv, cap, d),
                 f"(batch, n_kv_heads, cap, head_dim) = ({b}, {hkv}, {cap}, {d}) like k_cache")
    if d < 1 or cap < 1 or hkv < 1:
        raise ValueError(f"{fn}: head_dim, n_kv_heads and cap must be >= 1, got q {_shape(q)} "
                         f"and k_cache {_shape(k_cache)}")
    if h % hkv != 0:
        raise ValueError(f"{fn}: n_heads={h} (q {_shape(q)}) must be a multiple of "
                         f"n_kv_heads={hkv} (k_cache {_shape(k_cache)})")
    if not isinstance(ring, bool):
        raise TypeError(f"{fn}: ring must be a bool, got {type(ring).__name__}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"{fn}: scale must be None or a number, got {type(scale).__name__}")
    if isinstance(pos, torch.Tensor):
        if pos.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{fn}: pos must be an int32 or int64 tensor (or a Python int), "
                            f"got {pos.dtype}")
        if pos.dim() > 1 or (pos.dim() == 1 and pos.shape[0] != b):
            raise ValueError(f"{fn}: pos must have shape () or (batch,) = ({b},), "
                             f"got {_shape(pos)}")
        check_same_device(fn, "q", q, pos=pos)
    elif isinstance(pos, int) and not isinstance(pos, bool):
        if pos < 0 or (not ring and pos >= cap):
            raise ValueError(f"{fn}: pos must be in [0, cap) = [0, {cap}) for a linear cache "
                             f"(>= 0 with ring=True), got {pos}")
    else:
        raise TypeError(f"{fn}: pos must be an int or an integer tensor, got {type(pos).__name__}")
    check_same_device(fn, "q", q, k_cache=k_cache, v_cache=v_cache)
    return b, h, hkv, cap, d


def check_add_rmsnorm_args(fn, x, residual, weight, eps=1e-5, out_dtype=None) -> int:
    """Validate add_rmsnorm arguments: x (..., d); residual None or x's shape; weight (d,);
    eps >= 0; out_dtype None or a float dtype. Returns d."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{fn}: x must have shape (..., d), got a 0-d tensor")
    check_tensor(fn, "x", x, (None,) * x.dim(), "(..., d)")
    d = x.shape[-1]
    if residual is not None:
        check_tensor(fn, "residual", residual, tuple(x.shape), f"{_shape(x)} like x")
    check_tensor(fn, "weight", weight, (d,), f"(d,) = ({d},)")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"{fn}: eps must be a number >= 0, got {eps!r}")
    if out_dtype is not None and out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fn}: out_dtype must be None or a float dtype, got {out_dtype!r}")
    check_same_device(fn, "x", x, residual=residual, weight=weight)
    return d
