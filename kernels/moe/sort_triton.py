"""Triton counting sort of MoE token-slots by expert (``permute.sort_by_expert``'s CUDA path).

For ``ids`` (S,) the expert of each token-slot, values in [0, B) (B = n_experts + 1: the last bin
holds dropped slots), it returns exactly what a stable argsort gives:

    order (S,) int64   slots sorted by (expert, slot): order[r] = the slot at row r
    inv   (S,) int64   inv[order[r]] = r
    counts (B,) int64  slots per bin

in three launches, none of which synchronises with the host:

1. ``_block_hist_kernel``: per block p of BLOCK_S slots, the count of each bin -> hist (B, P) int32;
2. ``_bin_scan_kernel``: per bin, the exclusive prefix sum over blocks -> before (B, P), and the
   bin's total -> counts (torch.cumsum over the outer dimension of a (P, B) tensor took 85 us here);
3. ``_scatter_kernel``: a slot's row = start[bin] (exclusive cumsum over bins of the counts) +
   before[bin, p] + its rank among the earlier slots of its block with the same bin (a BLOCK_S x
   BLOCK_S comparison). Writes order and inv.

Against torch's path (a radix argsort on uint8 keys, a scatter_add histogram and an index_put
for inv: about 15 launches, 35-45 us for 32768 slots in an H100 profile).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._ops import custom_op

BLOCK_S = 64
# bins (experts + 1) the counting sort takes: the scatter kernel compares each block's slots
# with next_pow2(bins + 1) bins
MAX_BINS = 512
SCAN_BLOCK = 1024  # blocks per step of the per-bin scan (tests lower it to run its loop)


@triton.jit
def _block_hist_kernel(ids_ptr, hist_ptr, S, NB, P, BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr):
    p = tl.program_id(0)
    s = p * BLOCK_S + tl.arange(0, BLOCK_S)
    # out-of-range slots count in bin NB (< BLOCK_B), which is not stored
    ids = tl.load(ids_ptr + s, mask=s < S, other=NB).to(tl.int32)
    h = tl.histogram(ids, BLOCK_B)
    b = tl.arange(0, BLOCK_B)
    tl.store(hist_ptr + b * P + p, h.to(tl.int32), mask=b < NB)


@triton.jit
def _bin_scan_kernel(hist_ptr, before_ptr, counts_ptr, P, BLOCK_P: tl.constexpr):
    """One program per bin: before[b, p] = slots of bin b in blocks 0..p-1; counts[b] = all."""
    b = tl.program_id(0).to(tl.int64)
    carry = tl.zeros([], dtype=tl.int32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        v = tl.load(hist_ptr + b * P + p, mask=p < P, other=0)
        c = tl.cumsum(v, 0)
        tl.store(before_ptr + b * P + p, carry + c - v, mask=p < P)
        carry += tl.sum(v, 0)
    tl.store(counts_ptr + b, carry.to(tl.int64))


@triton.jit
def _scatter_kernel(ids_ptr, before_ptr, counts_ptr, order_ptr, inv_ptr, S, NB, P,
                    BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr):
    p = tl.program_id(0)
    i = tl.arange(0, BLOCK_S)
    s = p * BLOCK_S + i
    m = s < S
    ids = tl.load(ids_ptr + s, mask=m, other=NB).to(tl.int32)
    b = tl.arange(0, BLOCK_B)
    bm = b < NB
    total = tl.load(counts_ptr + b, mask=bm, other=0).to(tl.int32)
    base = tl.cumsum(total, 0) - total + tl.load(before_ptr + b * P + p, mask=bm, other=0)
    onehot = ids[:, None] == b[None, :]
    row = tl.sum(tl.where(onehot, base[None, :], 0), axis=1)
    earlier = (ids[:, None] == ids[None, :]) & (i[None, :] < i[:, None])
    row += tl.sum(earlier.to(tl.int32), axis=1)
    tl.store(order_ptr + row, s.to(tl.int64), mask=m)
    tl.store(inv_ptr + s, row.to(tl.int64), mask=m)


def sort_by_bin_triton(ids: torch.Tensor, n_bins: int):
    """(order, counts, inv) of ``ids`` (any shape, int values in [0, n_bins)); see the module
    docstring. n_bins <= ``MAX_BINS``."""
    flat = ids.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    s = flat.numel()
    dev = flat.device
    order = torch.empty(s, dtype=torch.int64, device=dev)
    inv = torch.empty(s, dtype=torch.int64, device=dev)
    if s == 0:
        return order, torch.zeros(n_bins, dtype=torch.int64, device=dev), inv
    counts = torch.empty(n_bins, dtype=torch.int64, device=dev)
    p = triton.cdiv(s, BLOCK_S)
    bb = triton.next_power_of_2(n_bins + 1)
    hist = torch.empty(n_bins, p, dtype=torch.int32, device=dev)
    before = torch.empty_like(hist)
    _block_hist_kernel[(p,)](flat, hist, s, n_bins, p, BLOCK_S=BLOCK_S, BLOCK_B=bb)
    _bin_scan_kernel[(n_bins,)](hist, before, counts, p, BLOCK_P=min(SCAN_BLOCK, triton.next_power_of_2(p)))
    _scatter_kernel[(p,)](flat, before, counts, order, inv, s, n_bins, p, BLOCK_S=BLOCK_S, BLOCK_B=bb)
    return order, counts, inv


@custom_op("moe_sort_by_bin")
def sort_by_bin_op(ids: torch.Tensor, n_bins: int) -> tuple[torch.Tensor, torch.Tensor,
                                                            torch.Tensor]:
    """``sort_by_bin_triton`` as the custom op ``hybridseq::moe_sort_by_bin`` (what
    ``torch.compile`` traces; ``kernels._ops``)."""
    return sort_by_bin_triton(ids, n_bins)


@sort_by_bin_op.register_fake
def _(ids, n_bins):
    s = ids.numel()
    i64 = dict(dtype=torch.int64)
    return ids.new_empty((s,), **i64), ids.new_empty((n_bins,), **i64), ids.new_empty((s,), **i64)
