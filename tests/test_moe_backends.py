"""Expert backends against the loop reference; permutation and grouped GEMM against their refs."""
import pytest
import torch

from hybridseq.blocks.moe import MoEBlock, MoEKernels
from hybridseq.blocks.moe.experts import experts_grouped, experts_loop
from hybridseq.kernels.moe.grouped_gemm import grouped_mm, grouped_mm_ref, grouped_mm_torch
from hybridseq.kernels.moe.permute import permute, permute_ref, sort_by_expert, unpermute, unpermute_ref

from conftest import requires_cuda


def _grads(blk, x):
    blk.zero_grad(set_to_none=True)  # a second call on one block must not accumulate
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
    grouped = MoEBlock(12, {**spec, "impl": "grouped"}, kernels=MoEKernels(permute="triton")).to(dev)
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


@pytest.mark.parametrize("e", [1, 7, 255, 256, 300, 40000])
def test_sort_by_expert_narrow_keys_match_int64_sort(e):
    """The sort runs on uint8 / int16 / int32 keys; the order must be the int64 stable sort's."""
    g = torch.Generator().manual_seed(e)
    indices = torch.randint(0, e + 1, (513, 3), generator=g)
    indices[::7] = e  # dropped slots (value e) at the top of the key range
    order, counts, inv = sort_by_expert(indices, e)
    assert torch.equal(order, torch.argsort(indices.view(-1), stable=True))
    assert torch.equal(inv[order], torch.arange(order.numel()))
    assert counts.tolist() == torch.bincount(indices.view(-1), minlength=e + 1).tolist()


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


# --- fused SwiGLU kernels and the one-op grouped expert MLP ---------------------------------------

from hybridseq.kernels.moe.grouped_mlp import LAYOUTS, as_layout, grouped_mlp  # noqa: E402
from hybridseq.kernels.activations.swiglu import (silu_mul, silu_mul_ref, swiglu, swiglu_bwd,  # noqa: E402
                                      swiglu_bwd_ref, swiglu_fwd, swiglu_fwd_ref, swiglu_ref)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("m,f", [(1, 8), (5, 24), (3, 1100)])
def test_swiglu_matches_ref(impl, m, f):
    """Fused SwiGLU forward/backward (Triton interpreter on CPU) against autograd through
    F.silu(g) * u; h is a column slice of a wider tensor (strided rows), f not a power of 2."""
    if impl == "triton":
        pytest.importorskip("triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    base = torch.randn(m, 2 * f + 6, device=dev)
    h = base[:, 3:3 + 2 * f].requires_grad_(False)
    outs = []
    for fn in (lambda t: swiglu(t, impl), swiglu_ref):
        t = h.detach().clone().requires_grad_(True)
        a = fn(t)
        ga = torch.linspace(-2, 2, a.numel(), device=dev).view_as(a)
        (g,) = torch.autograd.grad(a, t, ga)
        outs.append((a, g))
    for u, v in zip(*outs):
        assert u.shape == v.shape
        assert torch.allclose(u, v, atol=1e-5, rtol=1e-5), (u - v).abs().max()


@pytest.mark.parametrize("shape", [(1, 8), (2, 3, 24), (4, 1100)])
def test_silu_mul_triton_matches_ref(shape):
    """Separate gate/up tensors (an MLP with two projections; ``u`` is a strided column slice)."""
    pytest.importorskip("triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g0 = torch.randn(*shape, device=dev)
    u0 = torch.randn(*shape[:-1], shape[-1] + 4, device=dev)[..., 2:2 + shape[-1]]
    outs = []
    for fn in (lambda g, u: silu_mul(g, u, "triton"), silu_mul_ref):
        g, u = g0.clone().requires_grad_(True), u0.detach().clone().requires_grad_(True)
        a = fn(g, u)
        ga = torch.linspace(-2, 2, a.numel(), device=dev).view_as(a)
        outs.append((a, *torch.autograd.grad(a, (g, u), ga)))
    for x, y in zip(*outs):
        assert x.shape == y.shape and torch.allclose(x, y, atol=1e-5, rtol=1e-5), (x - y).abs().max()
    with pytest.raises(ValueError, match="one shape"):
        silu_mul(g0, g0[..., :-1])


def test_swiglu_bf16_math_in_fp32():
    """bf16 in/out, math in fp32: the torch twins and the Triton kernels agree to bf16 rounding."""
    pytest.importorskip("triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    h = (torch.randn(7, 2 * 40, device=dev) * 3).bfloat16()
    da = torch.randn(7, 40, device=dev).bfloat16()
    a_ref, dh_ref = swiglu_fwd_ref(h), swiglu_bwd_ref(h, da)
    assert a_ref.dtype == torch.bfloat16 and dh_ref.shape == h.shape
    a, dh = swiglu_fwd(h, "triton"), swiglu_bwd(h, da, "triton")
    assert torch.allclose(a.float(), a_ref.float(), atol=1e-2, rtol=1e-2)
    assert torch.allclose(dh.float(), dh_ref.float(), atol=1e-2, rtol=1e-2)
    with pytest.raises(ValueError, match="even"):
        swiglu_fwd(h[:, :5], "torch")


def test_as_layout_keeps_values_and_sets_strides():
    b = torch.randn(3, 5, 8)
    n, k = as_layout(b, "n"), as_layout(b, "k")
    assert n.data_ptr() == b.data_ptr() and k.stride(-2) == 1 and torch.equal(k, b)
    bt = b.transpose(-2, -1)
    assert as_layout(bt, "k").data_ptr() == b.data_ptr()
    assert as_layout(bt, "n").stride(-1) == 1 and torch.equal(as_layout(bt, "n"), bt)


def _mlp_ref(x, counts, w_in, w_out, activation):
    from hybridseq.blocks.moe.experts import expert_activation

    h = expert_activation(grouped_mm_ref(x, w_in, counts), activation)
    return grouped_mm_ref(h, w_out, counts)


def _mlp_case(dtype, activation="swiglu", counts=(3, 0, 5, 1), d=8, f=16, n_out=8, k_major=False):
    """k_major: both weights stored K-contiguous (transposed views), as the MoE layer stores w_in."""
    torch.manual_seed(0)
    counts = torch.tensor(counts)
    m, e = int(counts.sum()), counts.numel()
    n_in = 2 if activation == "swiglu" else 1
    x = torch.randn(m, d, dtype=dtype, requires_grad=True)
    if k_major:
        w_in = torch.randn(e, n_in * f, d, dtype=dtype).transpose(1, 2).requires_grad_(True)
        w_out = torch.randn(e, n_out, f, dtype=dtype).transpose(1, 2).requires_grad_(True)
    else:
        w_in = torch.randn(e, d, n_in * f, dtype=dtype, requires_grad=True)
        w_out = torch.randn(e, f, n_out, dtype=dtype, requires_grad=True)
    gy = torch.randn(m, n_out, dtype=dtype)
    return counts, x, w_in, w_out, gy


@pytest.mark.parametrize("k_major", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_grouped_mlp_matches_autograd_ref_fp64(layout, activation, k_major):
    """The explicit backward (dgrad, wgrad, activation') against autograd through the reference,
    with an empty group (its weight grads must be exactly 0), for weights stored N- or
    K-contiguous; the weight grads come back with their weight's strides."""
    counts, x, w_in, w_out, gy = _mlp_case(torch.float64, activation, k_major=k_major)
    assert (w_in.stride(-2) == 1) == k_major
    outs = []
    for fn in (lambda: grouped_mlp(x, counts, w_in, w_out, activation, act_impl="torch", layout=layout,
                                   gemm="loop"),
               lambda: _mlp_ref(x, counts, w_in, w_out, activation)):
        y = fn()
        outs.append((y, *torch.autograd.grad(y, (x, w_in, w_out), gy)))
    for u, v in zip(*outs):
        assert torch.allclose(u, v, atol=1e-10, rtol=1e-10), (u - v).abs().max()
    assert (outs[0][2][1] == 0).all() and (outs[0][3][1] == 0).all()
    assert outs[0][2].stride() == w_in.stride() and outs[0][3].stride() == w_out.stride()


@pytest.mark.parametrize("layout,k_major", [("n.k", False), ("k.n", False), ("auto", True)])
def test_grouped_mlp_torch_gemms_and_triton_act_cpu(layout, k_major):
    """The real torch._grouped_mm calls (they run forward-only on CPU in fp32, which is all this
    op uses) with transposed operands, and the Triton SwiGLU (interpreter; on a CUDA machine the
    compiled kernels cannot take CPU tensors, so the torch twin)."""
    pytest.importorskip("triton")
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm missing")
    act = "torch" if torch.cuda.is_available() else "triton"
    counts, x, w_in, w_out, gy = _mlp_case(torch.float32, counts=(4, 0, 9, 3), k_major=k_major)
    outs = []
    for fn in (lambda: grouped_mlp(x, counts, w_in, w_out, "swiglu", act_impl=act, layout=layout),
               lambda: _mlp_ref(x, counts, w_in, w_out, "swiglu")):
        y = fn()
        outs.append((y, *torch.autograd.grad(y, (x, w_in, w_out), gy)))
    for u, v in zip(*outs):
        assert torch.allclose(u, v, atol=1e-4, rtol=1e-4), (u - v).abs().max()


def test_grouped_mlp_bad_arguments():
    counts, x, w_in, w_out, _ = _mlp_case(torch.float64)
    with pytest.raises(ValueError, match="layout"):
        grouped_mlp(x, counts, w_in, w_out, layout="t.t", gemm="loop")
    with pytest.raises(ValueError, match="gemm"):
        grouped_mlp(x, counts, w_in, w_out, gemm="cublas")
    # CPU fp32: the fused op's torch._grouped_mm path does not run here
    blk = MoEBlock(16, {"n_experts": 4, "top_k": 2, "d_ff": 24, "impl": "grouped"},
                   kernels=MoEKernels(mlp="fused"))
    with pytest.raises(ValueError, match="fused"):
        blk(torch.randn(1, 3, 16))


@requires_cuda
@pytest.mark.parametrize("layout,act_impl,gemm", [(lay, "triton", "torch") for lay in LAYOUTS] + [
    ("n.k", "torch", "torch"), ("n.k", "triton", "loop"), ("k.n", "torch", "loop")])
def test_fused_grouped_mlp_matches_loop_cuda_bf16(layout, act_impl, gemm):
    """The shipped CUDA path (fused expert MLP) for every layout, activation kernel and GEMM
    backend, with uneven token counts, against the loop reference and the autograd path."""
    torch.manual_seed(0)
    spec = {"n_experts": 8, "top_k": 2, "d_ff": 200}
    loop = MoEBlock(72, {**spec, "impl": "loop"}).cuda().bfloat16()
    x = torch.randn(3, 37, 72, device="cuda", dtype=torch.bfloat16)
    results = {"loop": _grads(loop, x)}
    for mlp in ("fused", "autograd"):
        blk = MoEBlock(72, {**spec, "impl": "grouped"}, kernels=MoEKernels(
            mlp=mlp, act=act_impl, layout=layout, gemm=gemm)).cuda().bfloat16()
        blk.load_state_dict(loop.state_dict())
        results[mlp] = _grads(blk, x)
    for other in ("fused", "autograd"):
        for k in results["loop"]:
            a, b = results["loop"][k].float(), results[other][k].float()
            err = (a - b).abs().max().item()
            assert err <= 0.02 * (a.abs().max().item() + 1e-6), (other, k, err)


@requires_cuda
@pytest.mark.parametrize("k_major", [False, True])
def test_fused_grouped_mlp_empty_experts_cuda(k_major):
    """torch._grouped_mm with empty groups (CUTLASS, 2D x 2D wgrad with K = 0 for them): their
    weight grads are exactly zero and the others match the fp32 reference, for weights stored N-
    or K-contiguous (the wgrad then runs transposed); grads keep their weight's strides."""
    counts, x, w_in, w_out, gy = _mlp_case(torch.float32, counts=(0, 40, 0, 24, 0), d=64, f=96, n_out=64,
                                           k_major=k_major)
    cast = lambda t: t.detach().cuda().bfloat16().requires_grad_(True)  # noqa: E731
    xb, wib, wob = cast(x), cast(w_in), cast(w_out)
    y = grouped_mlp(xb, counts.cuda(), wib, wob, "swiglu")
    grads = torch.autograd.grad(y, (xb, wib, wob), gy.cuda().bfloat16())
    y_ref = _mlp_ref(x, counts, w_in, w_out, "swiglu")
    ref = (y_ref, *torch.autograd.grad(y_ref, (x, w_in, w_out), gy))
    for u, v in zip((y, *grads), ref):
        v = v.cuda()
        assert (u.float() - v).abs().max().item() <= 0.02 * v.abs().max().item() + 1e-3
    for g in grads[1:]:
        assert (g[[0, 2, 4]] == 0).all()
    assert grads[1].stride() == wib.stride() and grads[2].stride() == wob.stride()
    assert (wib.stride(-2) == 1) == k_major


@requires_cuda
def test_shared_experts_fused_swiglu_cuda():
    """Shared experts on CUDA use the Triton SwiGLU: same output and grads as F.silu(g) * u."""
    torch.manual_seed(0)
    blk = MoEBlock(64, {"n_experts": 4, "top_k": 2, "d_ff": 96, "shared_experts": 1,
                        "shared_d_ff": 80}).cuda()
    x = torch.randn(2, 9, 64, device="cuda")
    got = _grads(blk, x)
    plain = MoEBlock(64, blk.spec, kernels=MoEKernels(act="torch")).cuda()  # the PyTorch formulas
    plain.load_state_dict(blk.state_dict())
    want = _grads(plain, x)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-5, rtol=1e-4), k
    g, u = (x.view(-1, 64) @ blk.shared_w_in).chunk(2, -1)
    ref = (torch.nn.functional.silu(g) * u) @ blk.shared_w_out
    with_shared = blk(x)
    blk.n_shared = 0
    assert torch.allclose(with_shared - blk(x), ref.view_as(x), atol=1e-5)


@pytest.mark.parametrize("e", [1, 7, 8, 64, 255, 511])
@pytest.mark.parametrize("s", [1, 63, 64, 65, 1000])
def test_sort_by_expert_triton_counting_sort_matches_stable_argsort(e, s):
    """The Triton counting sort (interpreter on CPU) gives the stable argsort's order, its inverse
    and the bin counts, dropped slots (value e) included; sizes around its 64-slot block."""
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(e * 1000 + s)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hi = e + 1 if s % 2 else min(e + 1, 3)  # odd s: all experts; even s: a few hot ones
    indices = torch.randint(0, hi, (s,), generator=g).to(dev).view(s, 1)
    indices[::5] = e
    order, counts, inv = sort_by_expert(indices, e, impl="triton")
    ref_order = torch.argsort(indices.view(-1).cpu(), stable=True)
    assert order.dtype == inv.dtype == counts.dtype == torch.int64
    assert torch.equal(order.cpu(), ref_order)
    assert torch.equal(inv.cpu()[ref_order], torch.arange(s))
    assert counts.tolist() == torch.bincount(indices.view(-1).cpu(), minlength=e + 1).tolist()


def test_sort_by_expert_triton_top_k_slots_and_empty(monkeypatch):
    pytest.importorskip("triton")
    from hybridseq.kernels.moe import sort_triton as moe_sort_triton

    monkeypatch.setattr(moe_sort_triton, "SCAN_BLOCK", 2)  # 7 blocks of 64 slots: 4 scan steps
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(3)
    indices = torch.stack([torch.randperm(6)[:3] for _ in range(130)]).to(dev)  # (130, 3), no repeats
    order, counts, inv = sort_by_expert(indices, 6, impl="triton")
    assert torch.equal(order.cpu(), torch.argsort(indices.view(-1).cpu(), stable=True))
    order, counts, inv = sort_by_expert(indices[:0], 6, impl="triton")
    assert order.numel() == inv.numel() == 0 and counts.tolist() == [0] * 7
