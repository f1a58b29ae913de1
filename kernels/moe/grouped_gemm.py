"""Grouped GEMM: rows of ``a`` (M, K) are split into G consecutive groups of ``counts`` rows;
group g is multiplied by b[g] (K, N). Returns (M, N), differentiable in a and b.

Backends (``impl``):
- ``"torch"``: ``torch._grouped_mm`` (CUTLASS on Hopper). It requires the row strides to be
  multiples of 16 bytes, so K and N are zero-padded to that multiple when they are not (the
  padding is sliced off; exact). Used on CUDA for bfloat16; its CPU backward failed in torch 2.13
  ("Invalid strides/sizes"), so it is not used on CPU.
- ``"padded"``: rows scattered into a (G, C, K) buffer, C = the largest group, one ``bmm``;
  wasted work grows with imbalance (C * G vs M rows). Any device, any dtype. Needs the counts on
  the host (one synchronisation).
- ``"loop"``: one matmul per group (slices); the host-side counts again.
- ``"auto"``: ``torch`` for CUDA bfloat16, else ``padded``.
``grouped_mm_ref`` is the plain definition (a Python loop) for the tests.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _pad_last(t: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = (-t.shape[-1]) % multiple
    return F.pad(t, (0, extra)) if extra else t


def _pad_dim(t: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    extra = (-t.shape[dim]) % multiple
    if not extra:
        return t
    pad = [0, 0] * (t.dim() - dim - 1) + [0, extra]
    return F.pad(t, pad)


def grouped_mm_torch(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``torch._grouped_mm`` with 16-byte-aligned K and N (zero padding where needed)."""
    n_out = b.shape[-1]
    align = max(1, 16 // a.element_size())
    a_p = _pad_last(a, align)
    b_p = _pad_last(_pad_dim(b, 1, align), align)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    y = torch._grouped_mm(a_p, b_p, offs=offs)
    return y[:, :n_out] if y.shape[-1] != n_out else y


def grouped_mm_padded(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """One bmm over a (G, C, K) buffer, C = max(counts)."""
    g = b.shape[0]
    m = a.shape[0]
    if m == 0:
        return a.new_zeros(0, b.shape[-1]) + 0 * b.sum()
    cap = int(counts.max().item())
    group = torch.repeat_interleave(torch.arange(g, device=a.device), counts, output_size=m)
    start = torch.cumsum(counts, 0) - counts
    dest = group * cap + (torch.arange(m, device=a.device) - start[group])
    buf = a.new_zeros(g * cap, a.shape[-1]).index_copy(0, dest, a)
    y = torch.bmm(buf.view(g, cap, -1), b).view(g * cap, -1)
    return y.index_select(0, dest)


def grouped_mm_loop(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    outs, start = [], 0
    for g, c in enumerate(counts.tolist()):
        if c:
            outs.append(a[start:start + c] @ b[g])
        start += c
    if not outs:
        return a.new_zeros(0, b.shape[-1]) + 0 * b.sum()
    return torch.cat(outs, 0)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    if impl == "auto":
        impl = "torch" if (a.is_cuda and a.dtype == torch.bfloat16) else "padded"
    if impl == "torch":
        return grouped_mm_torch(a, b, counts)
    if impl == "padded":
        return grouped_mm_padded(a, b, counts)
    if impl == "loop":
        return grouped_mm_loop(a, b, counts)
    raise ValueError(f"grouped_mm impl must be auto|torch|padded|loop, got {impl!r}")


def grouped_mm_ref(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    out = a.new_zeros(a.shape[0], b.shape[-1])
    start = 0
    for g, c in enumerate(counts.tolist()):
        out[start:start + c] = a[start:start + c] @ b[g]
        start += c
    return out
