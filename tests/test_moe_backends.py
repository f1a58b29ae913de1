"""Expert backends against the loop reference; permutation and grouped GEMM against their refs."""
import pytest
import torch

from hybridseq.blocks.moe import MoEBlock
from hybridseq.blocks.moe_experts import experts_grouped, experts_loop
from hybridseq.kernels.grouped_gemm import grouped_mm, grouped_mm_ref, grouped_mm_torch
from hybridseq.kernels.moe_permute import permute, permute_ref, sort_by_expert, unpermute, unpermute_ref

from conftest import requires_cuda


def _grads(blk, x):
    x = x.detach().clone().requires_grad_(True)
    y = blk(x)
    (y * torch.linspace(-1, 1, y.numel(), device=y.device, dtype=y.dtype).view_as(y)).sum().add(blk.aux_loss).backward()
    out = {"y": y.detach(), "x": x.grad}
    out.update({n: p.grad.clone() for n, p in blk.named_parameters()})
    return out


@pytest.mark.parametrize("cfg", [
    dict(n_experts=4, top_k=2),
    dict(n_experts=5, top_k=1, activation="gelu"),
    dict(n_experts=3, top_k=3, shared_experts=1),
    dict(n_experts=6, top_k=2, capacity_factor=0.75),
    dict(n_experts=4, top_k=2, router="sigmoid"),
])
@pytest.mark.parametrize("seqlen", [1, 13])
def test_grouped_matches_loop(cfg, seqlen):
    torch.manual_seed(0)
    spec = {"d_ff": 20, **cfg}
    loop = MoEBlock(12, {**spec, "impl": "loop"}).double()
    grouped = MoEBlock(12, {**spec, "impl": "grouped"}).double()
    grouped.load_state_dict(loop.state_dict())
    x = torch.randn(2, seqlen, 12, dtype=torch.float64)
    a, b = _grads(loop, x), _grads(grouped, x)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-10, rtol=1e-8), k


def test_grouped_with_triton_permutation_matches_loop():
    pytest.importorskip("triton")
    torch.manual_seed(0)
    spec = {"n_experts": 5, "top_k": 2, "d_ff": 20, "capacity_factor": 0.8}
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    loop = MoEBlock(12, {**spec, "impl": "loop"}).to(dev)
    grouped = MoEBlock(12, {**spec, "impl": "grouped"}).to(dev)
    grouped.permute_impl = "triton"
    grouped.load_state_dict(loop.state_dict())
    x = torch.randn(2, 9, 12, device=dev)
    a, b = _grads(loop, x), _grads(grouped, x)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_experts_with_no_tokens_get_zero_grad():
    torch.manual_seed(0)
    n, d, f, e = 7, 8, 6, 5
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    indices = torch.tensor([[0, 3], [3, 0], [0, 3], [3, 0], [0, 3], [3, 0], [0, 3]])  # 1, 2, 4 empty
    weights = torch.rand(n, 2, dtype=torch.float64, requires_grad=True)
    w_in = torch.randn(e, d, 2 * f, dtype=torch.float64, requires_grad=True)
    w_out = torch.randn(e, f, d, dtype=torch.float64, requires_grad=True)
    results = []
    for fn in (experts_loop, experts_grouped):
        y = fn(x, indices, weights, w_in, w_out, "swiglu")
        grads = torch.autograd.grad(y.sin().sum(), (x, weights, w_in, w_out))
        results.append((y, *grads))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-10)
    g_in = results[1][3]
    assert (g_in[[1, 2, 4]] == 0).all() and (g_in[[0, 3]] != 0).any()


def test_permute_unpermute_match_refs_with_drops():
    torch.manual_seed(0)
    n, k, e, d = 9, 2, 4, 5
    indices = torch.randint(0, e + 1, (n, k))  # value e: dropped slot
    order, counts, inv = sort_by_expert(indices, e)
    assert counts.tolist() == torch.bincount(indices.view(-1), minlength=e + 1).tolist()
    assert torch.equal(indices.view(-1)[order], indices.view(-1).sort(stable=True).values)
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    y = torch.randn(n * k, d, dtype=torch.float64, requires_grad=True)
    w = torch.rand(n, k, dtype=torch.float64, requires_grad=True)
    outs = []
    for p_fn, u_fn in ((lambda: permute(x, order, inv, k), lambda: unpermute(y, order, inv, w)),
                       (lambda: permute_ref(x, order, k), lambda: unpermute_ref(y, order, w))):
        xp, yu = p_fn(), u_fn()
        g = torch.autograd.grad((xp.cos().sum() + yu.sin().sum()), (x, y, w))
        outs.append((xp, yu, *g))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("k,d", [(1, 5), (2, 7), (3, 1100)])
def test_permute_triton_matches_ref(k, d):
    """The fused Triton gather-sum / scatter-scale-dot kernels (interpreter on CPU)."""
    pytest.importorskip("triton")
    torch.manual_seed(0)
    n, e = 6, 4
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    indices = torch.randint(0, e + 1, (n, k), device=dev)
    order, counts, inv = sort_by_expert(indices, e)
    x = torch.randn(n, d, device=dev, requires_grad=True)
    y = torch.randn(n * k, d, device=dev, requires_grad=True)
    w = torch.rand(n, k, device=dev, requires_grad=True)
    outs = []
    for impl in ("triton", "ref"):
        if impl == "ref":
            xp, yu = permute_ref(x, order, k), unpermute_ref(y, order, w)
        else:
            xp, yu = permute(x, order, inv, k, impl="triton"), unpermute(y, order, inv, w, impl="triton")
        g = torch.autograd.grad(xp.cos().sum() + yu.sin().sum(), (x, y, w))
        outs.append((xp, yu, *g))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


@pytest.mark.parametrize("impl", ["padded", "loop"])
def test_grouped_mm_backends_match_ref(impl):
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1])
    a = torch.randn(9, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 7, 3, dtype=torch.float64, requires_grad=True)
    outs = []
    for fn in (lambda: grouped_mm(a, b, counts, impl=impl), lambda: grouped_mm_ref(a, b, counts)):
        y = fn()
        outs.append((y, *torch.autograd.grad(y.tanh().sum(), (a, b))))
    for u, v in zip(*outs):
        assert torch.allclose(u, v, atol=1e-12)


def test_grouped_mm_torch_pads_unaligned_strides():
    # torch._grouped_mm's forward runs on CPU (torch 2.13); K = 7, N = 3 need padding to 16 bytes
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm missing")
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 2])
    a = torch.randn(10, 7).bfloat16()
    b = torch.randn(4, 7, 3).bfloat16()
    y = grouped_mm_torch(a, b, counts)
    assert y.shape == (10, 3)
    assert torch.allclose(y.float(), grouped_mm_ref(a.float(), b.float(), counts), atol=0.1, rtol=0.02)


def test_impl_megablocks_without_package_is_a_clear_error():
    from hybridseq.blocks.moe import megablocks_available
    from hybridseq.errors import ConfigError

    if megablocks_available():
        pytest.skip("megablocks installed")
    with pytest.raises(ConfigError, match="megablocks"):
        MoEBlock(16, {"n_experts": 4, "top_k": 2, "impl": "megablocks"})


@requires_cuda
@pytest.mark.parametrize("top_k", [1, 2, 8])
def test_grouped_matches_loop_cuda_bf16(top_k):
    torch.manual_seed(0)
    spec = {"n_experts": 8, "top_k": top_k, "d_ff": 200}
    loop = MoEBlock(72, {**spec, "impl": "loop"}).cuda().bfloat16()
    grouped = MoEBlock(72, {**spec, "impl": "grouped"}).cuda().bfloat16()
    grouped.load_state_dict(loop.state_dict())
    x = torch.randn(3, 37, 72, device="cuda", dtype=torch.bfloat16)
    a, b = _grads(loop, x), _grads(grouped, x)
    for k in a:
        err = (a[k].float() - b[k].float()).abs().max().item()
        scale = a[k].float().abs().max().item() + 1e-6
        assert err <= 0.02 * scale, (k, err, scale)


@requires_cuda
def test_megablocks_matches_loop_cuda_bf16():
    from hybridseq.blocks.moe import megablocks_available

    if not megablocks_available():
        pytest.skip("megablocks / grouped_gemm not installed")
    torch.manual_seed(0)
    spec = {"n_experts": 8, "top_k": 2, "d_ff": 256}
    loop = MoEBlock(128, {**spec, "impl": "loop"}).cuda().bfloat16()
    mb = MoEBlock(128, {**spec, "impl": "megablocks"}).cuda().bfloat16()
    mb.load_state_dict(loop.state_dict())
    x = torch.randn(2, 64, 128, device="cuda", dtype=torch.bfloat16)
    a, b = _grads(loop, x), _grads(mb, x)
    for k in a:
        err = (a[k].float() - b[k].float()).abs().max().item()
        assert err <= 0.02 * (a[k].float().abs().max().item() + 1e-6), (k, err)


@requires_cuda
def test_grouped_under_bf16_autocast_cuda():
    """fp32 parameters, bf16 autocast (the trainer's GPU mode): grouped runs in bf16 like loop."""
    torch.manual_seed(0)
    spec = {"n_experts": 4, "top_k": 2, "d_ff": 96}
    loop = MoEBlock(64, {**spec, "impl": "loop"}).cuda()
    grouped = MoEBlock(64, {**spec, "impl": "grouped"}).cuda()
    grouped.load_state_dict(loop.state_dict())
    x = torch.randn(2, 33, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = _grads(loop, x), _grads(grouped, x)
    assert b["y"].dtype == torch.bfloat16 and b["w_in"].dtype == torch.float32
    for k in a:
        err = (a[k].float() - b[k].float()).abs().max().item()
        assert err <= 0.02 * (a[k].float().abs().max().item() + 1e-6), (k, err)


@requires_cuda
def test_grouped_dropless_has_no_host_sync_cuda():
    """The dropless grouped path (router, losses, metrics, sort, permute, grouped GEMMs, Triton
    un-permute) never waits for the GPU: bincount/nonzero/.item() would show up here."""
    torch.manual_seed(0)
    blk = MoEBlock(64, {"n_experts": 8, "top_k": 2, "d_ff": 128, "impl": "grouped"}).cuda().bfloat16()
    x = torch.randn(2, 40, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    (blk(x).float().sum() + blk.aux_loss).backward()  # warm-up: lazy init, Triton compilation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        (blk(x).float().sum() + blk.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
