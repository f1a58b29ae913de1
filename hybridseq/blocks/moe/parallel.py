"""Expert parallelism: the experts of an MoE layer sharded over an EP process group.

``shard_experts(block, group)`` (``MoEBlock.shard_experts``) turns a built single-device block
into one shard: with P = the group's size, EP rank r keeps experts [r E/P, (r+1) E/P) of
``w_in`` / ``w_out`` (the rest is freed) and routes through the group from then on. Build the
model with the same seed on every rank, as the trainers do, and the sharded model holds exactly
the single-device model's weights. Every rank routes its own tokens with a replicated router,
then:

1. sort its token-slots by expert (so by owning rank), drop the capacity-dropped ones;
2. exchange the per-expert counts (all_to_all_single of E integers), so each rank knows how many
   rows it receives from each source rank for each of its local experts;
3. all_to_all_single the token rows to their owners; regroup the received rows by local expert;
   run the local experts (grouped GEMM, or the per-expert loop for impl ``loop``);
4. undo the regrouping, all_to_all_single the results back, un-permute with the combine weights.

The all-to-all is differentiable (``AllToAll``: its backward is the all-to-all with the split
sizes swapped), so gradients of tokens routed elsewhere come back to their rank and every
rank's expert weights receive the gradient of all the tokens they processed. The expert weights
are marked ``p._expert_parallel = True``: data-parallel gradient averaging must not sum them over
the EP group (they are different experts); the router and shared experts are replicated.
Works with gloo (CPU tensors) and NCCL (CUDA).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ...errors import ConfigError
from ...kernels.moe.permute import permute, sort_by_expert, unpermute
from .experts import run_sorted_experts


@torch.no_grad()
def shard_experts(block, group) -> None:
    """Keep this rank's experts of ``block`` (an ``MoEBlock`` with all its experts) and route
    through ``group`` (module docstring). Call before the optimizer is built."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if block.n_experts % size:
        raise ConfigError(f"the expert-parallel group has {size} ranks, which does not divide "
                          f"n_experts={block.n_experts}", key="moe.ep_size")
    if block.ep_group is not None:
        raise ValueError(f"MoE layer {block.layer_idx} is already sharded over {block.ep_size} ranks")
    e = block.n_experts // size
    for name in ("w_in", "w_out"):
        full = getattr(block, name)
        shard = nn.Parameter(full.detach()[rank * e:(rank + 1) * e].clone(),
                             requires_grad=full.requires_grad)
        shard._expert_parallel = True  # sharded over the EP group: not all-reduced over it
        setattr(block, name, shard)
    block.ep_size, block.ep_rank, block.ep_group, block.n_local_experts = size, rank, group, e


class AllToAll(torch.autograd.Function):
    """Differentiable ``all_to_all_single`` over dim 0: rank r sends ``send_splits[q]`` rows to
    rank q and receives ``recv_splits[q]`` rows from rank q (rows ordered by source rank)."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        out = grad.new_empty((sum(send_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), send_splits, recv_splits, group=ctx.group)
        return out, None, None, None


def all_to_all(x, send_splits, recv_splits, group):
    return AllToAll.apply(x, list(send_splits), list(recv_splits), group)


def expert_parallel_experts(x, indices, weights, w_in, w_out, activation, n_experts, group,
                            impl="grouped", may_drop=False):
    """y (N, d) = the MoE expert output for this rank's tokens, experts sharded over ``group``.

    x (N, d), indices (N, k) in [0, E] (E: dropped), weights (N, k) fp32; w_in/w_out hold this
    rank's E/P experts. Every rank of the group must call it (collective). The split sizes of the
    all-to-all must be known on the host: one synchronisation per forward (and one more in
    capacity mode). ``impl`` "loop" runs the local experts one by one, any other the grouped GEMM.
    """
    n, k = indices.shape
    p = dist.get_world_size(group)
    e_local = n_experts // p
    order, counts, inv = sort_by_expert(indices, n_experts)
    x_perm = permute(x, order, inv, k)
    send_counts = counts[:n_experts].contiguous()
    n_send = int(send_counts.sum().item()) if may_drop else n * k

    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send_splits = send_counts.view(p, e_local).sum(1).tolist()
    recv_by_src = recv_counts.view(p, e_local)                  # [source rank, local expert]
    recv_splits = recv_by_src.sum(1).tolist()

    if n_send < n * k:  # drop the capacity-dropped rows (a full slice would cost a copy in backward)
        x_perm = x_perm[:n_send]
    x_recv = all_to_all(x_perm, send_splits, recv_splits, group)
    # received rows are ordered (source rank, local expert): regroup them by local expert
    local_eid = torch.repeat_interleave(
        torch.arange(e_local, device=x.device).repeat(p), recv_by_src.reshape(-1),
        output_size=x_recv.shape[0])
    order2, counts2, inv2 = sort_by_expert(local_eid.view(-1, 1), e_local)
    x_loc = permute(x_recv, order2, inv2, 1)
    gemm_impl = "loop" if impl == "loop" else "auto"
    y_loc = run_sorted_experts(x_loc, counts2[:e_local], w_in, w_out, activation, gemm_impl)
    y_recv = permute(y_loc, inv2, order2, 1)                    # back to (source, expert) order
    y_back = all_to_all(y_recv, recv_splits, send_splits, group)
    if n_send < n * k:
        y_back = torch.cat([y_back, y_back.new_zeros(n * k - n_send, y_back.shape[-1])], 0)
    return unpermute(y_back, order, inv, weights)
