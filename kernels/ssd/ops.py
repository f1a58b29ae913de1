"""The Triton SSD scan (``triton_ssd.py``) as ``torch.library`` custom ops: what ``torch.compile``
traces (``kernels._ops``). Eager calls keep ``triton_ssd._SSDTriton``; both run
``triton_ssd._forward`` / ``_backward``.

    hybridseq::ssd_scan_fwd(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, ...)
        -> (y, hlast, dtp, cs, hin, ypre)        with its autograd
    hybridseq::ssd_scan_bwd(...) -> [dx, ddt, dA, dB, dC, dD, dz, dbias, dh0]

Outputs a call does not make (ypre without z or without a backward; dD, dz, dbias, dh0 without
those inputs) are empty stand-ins: custom ops return tensors only.
"""
from __future__ import annotations

import torch

from .._ops import custom_op
from .triton_ssd import _backward, _forward, check_triton_sizes, chunk_length


def _e(ref):
    return ref.new_empty(0)


def _own(t):
    """``t``, or a copy when it is a view of a scratch buffer (an op's outputs own storage)."""
    return t.clone() if t._base is not None else t


def _plan_shapes(x, chunk_size):
    """(NC, LP): the chunks and the padded length of the launch plan (``triton_ssd._Plan``), a
    host computation on the sequence length."""
    L = int(x.shape[1])
    q = chunk_length(chunk_size, L)
    nc = -(-L // q)
    return nc, nc * q


@custom_op("ssd_scan_fwd")
def _fwd_op(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
            D: torch.Tensor | None, z: torch.Tensor | None, dt_bias: torch.Tensor | None,
            initial_state: torch.Tensor | None, seq_idx: torch.Tensor | None, softplus: bool,
            has_limit: bool, lo: float, hi: float, chunk_size: int, need_grad: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                       torch.Tensor]:
    A = A.contiguous()
    D = D.contiguous() if D is not None else None
    dt_bias = dt_bias.contiguous() if dt_bias is not None else None
    y, hlast, dtp, cs, hin, ypre = _forward(x, dt, A, B, C, D, z, dt_bias, softplus,
                                            (lo, hi) if has_limit else None, initial_state,
                                            seq_idx, chunk_size, need_grad)
    return y, hlast, dtp, cs, hin, (ypre if ypre is not None else _e(x))


@_fwd_op.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, softplus, has_limit, lo, hi,
      chunk_size, need_grad):
    b, L, H, P = x.shape
    N = B.shape[3]
    NC, LP = _plan_shapes(x, chunk_size)
    f32 = dict(dtype=torch.float32)
    return (x.new_empty((b, L, H, P)), x.new_empty((b, H, P, N), **f32),
            x.new_empty((b, H, LP), **f32), x.new_empty((b, H, LP), **f32),
            x.new_empty((b, NC + 1, H, P, N), **f32),
            x.new_empty((b, L, H, P)) if need_grad and z is not None else _e(x))


@custom_op("ssd_scan_bwd")
def _bwd_op(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
            C: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None,
            dt_bias: torch.Tensor | None, seq_idx: torch.Tensor | None, dtp: torch.Tensor,
            cs: torch.Tensor, hin: torch.Tensor, ypre: torch.Tensor | None, softplus: bool,
            has_limit: bool, lo: float, hi: float, has_h0: bool, chunk_size: int,
            dy: torch.Tensor, dhlast: torch.Tensor | None) -> list[torch.Tensor]:
    A = A.contiguous()
    D = D.contiguous() if D is not None else None
    dt_bias = dt_bias.contiguous() if dt_bias is not None else None
    grads = _backward((x, dt, A, B, C, D, z, dt_bias, seq_idx, dtp, cs, hin, ypre), softplus,
                      (lo, hi) if has_limit else None, has_h0, chunk_size, dy, dhlast)
    return [_own(g) if g is not None else _e(x) for g in grads]


@_bwd_op.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, seq_idx, dtp, cs, hin, ypre, softplus, has_limit, lo, hi,
      has_h0, chunk_size, dy, dhlast):
    b, L, H, P = x.shape
    e = _e(x)
    new = lambda t: t.new_empty(tuple(t.shape))  # noqa: E731
    return [x.new_empty((b, L, H, P)), new(dt), new(A), new(B), new(C),
            new(D) if D is not None else e, new(z) if z is not None else e,
            new(dt_bias) if dt_bias is not None else e,
            x.new_empty((b, H, P, B.shape[3]), dtype=torch.float32) if has_h0 else e]


def _setup(ctx, inputs, output):
    (x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, softplus, has_limit, lo, hi,
     chunk_size, need_grad) = inputs
    _, _, dtp, cs, hin, ypre = output
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, seq_idx, dtp, cs, hin,
                          ypre if z is not None else None)
    ctx.cfg = (bool(softplus), bool(has_limit), float(lo), float(hi), int(chunk_size),
               initial_state is not None,
               initial_state.dtype if initial_state is not None else None, bool(need_grad))


def _backward_fn(ctx, dy, dhlast, *_):
    x, dt, A, B, C, D, z, dt_bias, seq_idx, dtp, cs, hin, ypre = ctx.saved_tensors
    softplus, has_limit, lo, hi, chunk_size, has_h0, h0_dtype, need_grad = ctx.cfg
    if not need_grad:
        raise RuntimeError("ssd_scan: the forward ran without saving for a backward (no input "
                           "required grad then)")
    if dy is None:
        dy = torch.zeros_like(x)
    dx, ddt, dA, dB, dC, dD, dz, dbias, dh0 = _bwd_op(
        x, dt, A, B, C, D, z, dt_bias, seq_idx, dtp, cs, hin, ypre, softplus, has_limit, lo, hi,
        has_h0, chunk_size, dy, dhlast)
    return (dx, ddt, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
            dbias if dt_bias is not None else None, dh0.to(h0_dtype) if has_h0 else None,
            None, None, None, None, None, None, None)


_fwd_op.register_autograd(_backward_fn, setup_context=_setup)


def ssd_scan_op(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=None,
                initial_state=None, seq_idx=None, return_final_state=False, chunk_size=256):
    """``triton_ssd.ssd_scan_triton`` through the custom ops (arguments checked by the caller,
    as there)."""
    check_triton_sizes("ssd_scan_triton", x, B, C, z)
    b, L, H, P = x.shape
    if L == 0:  # nothing to scan: y is empty and the state passes through
        y = x.new_zeros(x.shape) + 0 * dt.sum()
        if not return_final_state:
            return y
        h = (initial_state.float() if initial_state is not None
             else torch.zeros(b, H, P, B.shape[3], device=x.device))
        return y, h
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (x, dt, A, B, C, D, z, dt_bias, initial_state))
    lo, hi = (float(dt_limit[0]), float(dt_limit[1])) if dt_limit is not None else (0.0, 0.0)
    y, hlast, *_ = _fwd_op(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx,
                           bool(dt_softplus), dt_limit is not None, lo, hi, int(chunk_size),
                           bool(need_grad))
    return (y, hlast) if return_final_state else y


__all__ = ["ssd_scan_op"]
