"""Small Triton helpers shared by the SSD kernels (triton_state.py, triton_chunk_scan.py,
triton_bwd_chunk.py, triton_bwd_dt.py).

Conventions of every SSD kernel:

- ``DOT`` (constexpr) picks the operand type of the tensor-core products: 0 float32 with IEEE
  products (exact float32, used for float32 inputs), 1 bfloat16, 2 float16 (16-bit inputs: the
  operands are cast to the inputs' type, the products accumulate in float32), 3 float32 in
  tf32 (an opt-in speed mode for float32 inputs on the GPU), 4 bfloat16 operands multiplied
  as float32 (what the host picks for bfloat16 under Triton's interpreter).
- Document masks: ``seq_idx`` is non-decreasing, so "same document" is "equal seq_idx". Without
  seq_idx (``HAS_SEQ`` False) every token is in document 0.
- The decay between two steps s <= t of one chunk is exp(cs_t - cs_s), cs the cumulative sum of
  dt * A within the chunk (one scalar per head and step). Pairs outside the causal, same-document
  square get the argument -inf before exp, so every exp argument is <= 0 for A <= 0 and a masked
  entry is exactly 0.
- Loops over blocks are ``tl.range(..., disable_licm=True)``: hoisting their loop-invariant
  tile-sized index and mask tensors out of the loop keeps those live in registers through it
  (for the backward chunk kernels at P64 N128 the sm_90 compiler then spilled several times
  more: 864 against 424 bytes a thread for the column kernel).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _softplus(x):
    """log(1 + exp(x)) without overflow: max(x, 0) + log1p(exp(-|x|)), the log1p written as
    u * log(1 + u) / ((1 + u) - 1) (exact to float32 rounding also where 1 + u rounds to 1)."""
    u = tl.exp(-tl.abs(x))
    w = 1.0 + u
    lp = tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))
    return tl.maximum(x, 0.0) + lp


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _dt_eff(dt_raw, bias, mask, lo, hi, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
            HAS_LIMIT: tl.constexpr):
    """The step size the recurrence uses: softplus(dt + dt_bias) (each part optional), clamped
    to [lo, hi]; 0 off ``mask`` (past the sequence end: decay 1, no input)."""
    v = dt_raw.to(tl.float32)
    if HAS_BIAS:
        v = v + bias
    if SOFTPLUS:
        v = _softplus(v)
    if HAS_LIMIT:
        v = tl.minimum(tl.maximum(v, lo), hi)
    return tl.where(mask, v, 0.0)


@triton.jit
def _dot(a, b, DOT: tl.constexpr):
    """a @ b accumulated in float32, operands in the precision ``DOT`` names (module doc)."""
    if DOT == 0:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif DOT == 1:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif DOT == 2:
        return tl.dot(a.to(tl.float16), b.to(tl.float16))
    elif DOT == 3:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")
    else:
        # DOT 4: bfloat16 operands, multiplied as float32 (the same values as DOT 1: Triton's
        # interpreter mis-computes bfloat16 dots, so the host picks this mode there)
        return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32),
                      input_precision="ieee")


@triton.jit
def _lp(a, DOT: tl.constexpr):
    """a in the operand type of ``_dot`` (cast once where a tile feeds several products)."""
    if DOT == 1:
        return a.to(tl.bfloat16)
    elif DOT == 2:
        return a.to(tl.float16)
    elif DOT == 4:
        return a.to(tl.bfloat16).to(tl.float32)
    else:
        return a.to(tl.float32)


@triton.jit
def _seq_at(seq_ptr, off, HAS_SEQ: tl.constexpr):
    """seq_idx at one offset, as int64 (0 without seq_idx)."""
    if HAS_SEQ:
        return tl.load(seq_ptr + off).to(tl.int64)
    else:
        return tl.full((), 0, tl.int64)


@triton.jit
def _seq_vec(seq_ptr, offs, mask, HAS_SEQ: tl.constexpr):
    """seq_idx at a vector of offsets (masked lanes: -1), as int64 (0 without seq_idx)."""
    if HAS_SEQ:
        return tl.load(seq_ptr + offs, mask=mask, other=-1).to(tl.int64)
    else:
        return tl.zeros(offs.shape, tl.int64)


@triton.jit
def _gate_grad_in(dy, z, HAS_Z: tl.constexpr):
    """The gradient reaching y before the gate: dy * silu(z) (dy without z), float32."""
    g = dy.to(tl.float32)
    if HAS_Z:
        zf = z.to(tl.float32)
        g = g * zf * _sigmoid(zf)
    return g
