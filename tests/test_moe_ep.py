"""Expert parallelism on 2 CPU ranks (gloo), applied to a built block from outside
(``shard_experts``): outputs and gradients equal the 1-rank layer."""
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D = 12
CASES = [
    {"n_experts": 4, "top_k": 2, "d_ff": 10, "impl": "grouped"},
    {"n_experts": 4, "top_k": 1, "d_ff": 10, "impl": "loop", "activation": "gelu", "shared_experts": 1},
    {"n_experts": 6, "top_k": 2, "d_ff": 10, "impl": "grouped", "capacity_factor": 1.0},
]


def _inputs(case_idx, rank):
    g = torch.Generator().manual_seed(100 * case_idx + rank)
    n = 5 + 4 * rank  # different token counts per rank
    return torch.randn(1, n, D, generator=g, dtype=torch.float64), torch.randn(1, n, D, generator=g, dtype=torch.float64)


def _worker(rank, world, init_file, out_dir):
    sys.path.insert(0, ROOT)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from hybridseq.blocks.moe import MoEBlock

    results = []
    for ci, spec in enumerate(CASES):
        torch.manual_seed(0)
        blk = MoEBlock(D, {**spec, "ep_size": world}).double()  # the same weights on every rank
        blk.shard_experts(dist.group.WORLD)  # keeps this rank's experts
        assert blk.w_in.shape[0] == spec["n_experts"] // world and blk.w_in._expert_parallel
        x, c = _inputs(ci, rank)
        x.requires_grad_(True)
        y = blk(x)
        (y * c).sum().backward()
        router_grad = blk.router.weight.grad.clone()
        dist.all_reduce(router_grad)
        results.append({"y": y.detach(), "x_grad": x.grad, "w_in": blk.w_in.grad, "w_out": blk.w_out.grad,
                        "router": router_grad, "dropped": blk.metrics["dropped"]})
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_expert_parallel_two_ranks_equal_one_rank(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    sys.path.insert(0, ROOT)
    from hybridseq.blocks.moe import MoEBlock

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for ci, spec in enumerate(CASES):
        torch.manual_seed(0)
        full = MoEBlock(D, spec).double()
        e_loc = spec["n_experts"] // world
        for r in range(world):
            x, c = _inputs(ci, r)
            x.requires_grad_(True)
            y = full(x)
            (y * c).sum().backward()
            got = ranks[r][ci]
            assert torch.allclose(got["y"], y, atol=1e-12), (ci, r)
            assert torch.allclose(got["x_grad"], x.grad, atol=1e-12), (ci, r)
            assert got["dropped"].item() == full.metrics["dropped"].item()
        # gradients summed over both ranks' tokens
        for r in range(world):
            sl = slice(r * e_loc, (r + 1) * e_loc)
            assert torch.allclose(ranks[r][ci]["w_in"], full.w_in.grad[sl], atol=1e-12), ci
            assert torch.allclose(ranks[r][ci]["w_out"], full.w_out.grad[sl], atol=1e-12), ci
            assert torch.allclose(ranks[r][ci]["router"], full.router.weight.grad, atol=1e-12), ci
