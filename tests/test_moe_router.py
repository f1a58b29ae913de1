"""MoE routers and losses: hand-computed values, gradients, bias updates, Sinkhorn balance."""
import math

import pytest
import torch

from hybridseq.blocks.moe import MoEBlock
from hybridseq.blocks.moe.router import Router, load_balancing_loss, routing_entropy, sinkhorn, z_loss

LOGITS = [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0], [1.0, -2.0, 0.5]]


def _softmax_row(row):
    m = max(row)
    ex = [math.exp(v - m) for v in row]
    s = sum(ex)
    return [v / s for v in ex]


def test_load_balancing_and_z_loss_hand_computed():
    logits = torch.tensor(LOGITS)
    probs = torch.softmax(logits, -1)
    # top-1 choices: 0, 1, 2, 0 -> f = (2/4, 1/4, 1/4)
    idx1 = torch.tensor([[0], [1], [2], [0]])
    p_rows = [_softmax_row(r) for r in LOGITS]
    p_mean = [sum(r[i] for r in p_rows) / 4 for i in range(3)]
    expected = 3 * (0.5 * p_mean[0] + 0.25 * p_mean[1] + 0.25 * p_mean[2])
    assert load_balancing_loss(probs, idx1, 3).item() == pytest.approx(expected, rel=1e-6)
    # top-2: slots (0,1), (1,0), (2,0), (0,2) -> counts (4, 2, 2) of 8
    idx2 = torch.tensor([[0, 1], [1, 0], [2, 0], [0, 2]])
    expected2 = 3 * (0.5 * p_mean[0] + 0.25 * p_mean[1] + 0.25 * p_mean[2])
    assert load_balancing_loss(probs, idx2, 3).item() == pytest.approx(expected2, rel=1e-6)
    lse = [max(r) + math.log(sum(math.exp(v - max(r)) for v in r)) for r in LOGITS]
    assert z_loss(logits).item() == pytest.approx(sum(v * v for v in lse) / 4, rel=1e-6)
    ent = -sum(sum(p * math.log(p) for p in r) for r in p_rows) / 4
    assert routing_entropy(probs).item() == pytest.approx(ent, rel=1e-6)


def test_balanced_and_collapsed_limits():
    e = 4
    uniform = torch.full((8, e), 1.0 / e)
    idx = torch.arange(8).remainder(e).view(8, 1)
    assert load_balancing_loss(uniform, idx, e).item() == pytest.approx(1.0)
    collapsed = torch.zeros(8, e)
    collapsed[:, 0] = 1
    assert load_balancing_loss(collapsed, torch.zeros(8, 1, dtype=torch.long), e).item() == pytest.approx(e)


def test_block_aux_loss_uses_coefficients():
    torch.manual_seed(1)
    blk = MoEBlock(16, {"n_experts": 3, "top_k": 1, "aux_loss_coef": 0.5, "z_loss_coef": 0.25, "impl": "loop"})
    x = torch.randn(1, 4, 16)
    blk(x)
    logits = x.view(4, 16) @ blk.router.weight.t()
    probs = torch.softmax(logits, -1)
    idx = probs.argmax(-1, keepdim=True)
    want = 0.5 * load_balancing_loss(probs, idx, 3) + 0.25 * z_loss(logits)
    assert blk.aux_loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert blk.metrics["aux_loss"].item() == pytest.approx(load_balancing_loss(probs, idx, 3).item(), rel=1e-5)
    assert blk.metrics["load"].sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "sinkhorn"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_router_gradients_nonzero(kind, top_k):
    torch.manual_seed(0)
    blk = MoEBlock(16, {"n_experts": 4, "top_k": top_k, "router": kind, "impl": "loop",
                        "aux_loss_coef": 0.0, "z_loss_coef": 0.0})
    x = torch.randn(2, 5, 16)
    blk(x).square().sum().backward()
    g = blk.router.weight.grad
    assert g is not None and g.abs().sum() > 0 and torch.isfinite(g).all()


def test_softmax_renormalize():
    r = Router(8, 4, 2, "softmax", renormalize=True)
    out = r(torch.randn(5, 8))
    assert torch.allclose(out.weights.sum(-1), torch.ones(5))
    r2 = Router(8, 4, 2, "softmax", renormalize=False)
    r2.load_state_dict(r.state_dict())
    out2 = r2(torch.randn(5, 8))
    assert (out2.weights.sum(-1) < 1).all()
    assert torch.equal(out2.weights, out2.probs.gather(1, out2.indices))


def test_router_math_fp32_under_bf16():
    blk = MoEBlock(16, {"n_experts": 4, "top_k": 2}).to(torch.bfloat16)
    assert blk.router.weight.dtype == torch.float32 and blk.w_in.dtype == torch.bfloat16
    out = blk.router(torch.randn(3, 16, dtype=torch.bfloat16))
    assert out.logits.dtype == torch.float32 and out.weights.dtype == torch.float32


def test_sigmoid_bias_update_direction_and_timing():
    torch.manual_seed(0)
    blk = MoEBlock(16, {"n_experts": 4, "top_k": 1, "router": "sigmoid", "bias_update_rate": 0.1,
                        "impl": "loop"})
    with torch.no_grad():
        blk.router.weight.zero_()
        blk.router.weight[2] = 1.0  # expert 2 wins for inputs with a positive sum
    x = torch.rand(2, 6, 16) + 0.1
    y = blk(x)
    assert torch.equal(blk.router.expert_bias, torch.zeros(4))  # not before the backward
    y.sum().backward()
    assert torch.allclose(blk.router.expert_bias, torch.tensor([0.1, 0.1, -0.1, 0.1]))
    blk.eval()
    blk(x).sum().backward()  # eval mode: no update
    with torch.no_grad():
        blk.train()
        blk(x)  # no grad: no update
    assert torch.allclose(blk.router.expert_bias, torch.tensor([0.1, 0.1, -0.1, 0.1]))
    # the bias steers selection only: enough bias moves tokens off expert 2, weights stay sigmoid
    blk.router.expert_bias.copy_(torch.tensor([0.0, 0.0, -10.0, 0.0]))
    out = blk.router(x.view(-1, 16))
    assert (out.indices != 2).all()
    assert torch.allclose(out.weights, torch.sigmoid(out.logits).gather(1, out.indices))
    assert "expert_bias" in blk.state_dict().keys().__str__()


def test_update_bias_rule():
    r = Router(4, 3, 1, "sigmoid", bias_update_rate=0.5)
    r.update_bias(torch.tensor([10.0, 1.0, 1.0]))  # mean 4: expert 0 overloaded
    assert torch.allclose(r.expert_bias, torch.tensor([-0.5, 0.5, 0.5]))


def test_sinkhorn_balances_adversarial_logits():
    torch.manual_seed(0)
    n, e = 256, 8
    logits = torch.randn(n, e) * 0.5
    logits[:, 0] += 6.0  # every token prefers expert 0
    log_p = sinkhorn(logits)
    p = log_p.exp()
    assert torch.allclose(p.sum(1), torch.ones(n), atol=1e-4)
    assert torch.allclose(p.sum(0), torch.full((e,), n / e), rtol=1e-2)
    r = Router(4, e, 1, "sinkhorn")
    r.logits_and_input = lambda x: (logits, x)  # route these logits
    load_train = torch.bincount(r(torch.zeros(n, 4)).indices.view(-1), minlength=e).float() / n
    r.eval()
    load_eval = torch.bincount(r(torch.zeros(n, 4)).indices.view(-1), minlength=e).float() / n
    assert load_eval[0] == 1.0  # plain top-1 at inference: total collapse
    assert load_train.max() < 0.25 and load_train.min() > 0.05  # balanced: 1/8 = 0.125 each


def test_sigmoid_bias_updates_once_under_activation_checkpointing():
    from torch.utils.checkpoint import checkpoint

    spec = {"n_experts": 4, "top_k": 1, "router": "sigmoid", "bias_update_rate": 0.1, "impl": "grouped"}
    torch.manual_seed(0)
    ckpt = MoEBlock(16, spec)
    torch.manual_seed(0)
    plain = MoEBlock(16, spec)
    x = torch.randn(2, 6, 16)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = checkpoint(ckpt, xa, use_reentrant=False)
    (y.sum() + ckpt.aux_loss).backward()  # recomputation must route exactly as the forward did
    (plain(xb).sum() + plain.aux_loss).backward()
    assert torch.equal(ckpt.router.expert_bias, plain.router.expert_bias)
    assert ckpt.router.expert_bias.abs().sum() > 0  # moved once, by one rate step per expert
    assert torch.allclose(ckpt.router.expert_bias.abs(), torch.full((4,), 0.1))
    assert torch.allclose(xa.grad, xb.grad) and torch.allclose(ckpt.router.weight.grad, plain.router.weight.grad)


@pytest.mark.parametrize("n,d,e,dtype", [(1, 16, 4, torch.float32), (37, 100, 8, torch.float32),
                                         (70, 130, 64, torch.bfloat16), (200, 64, 3, torch.float32)])
def test_router_logits_triton_matches_ref(n, d, e, dtype):
    """Triton fp32 logits from x in its own dtype (interpreter on CPU): forward, dx (x's dtype),
    dW (fp32, summed over token chunks), at sizes that are not multiples of the blocks."""
    pytest.importorskip("triton")
    from hybridseq.kernels.moe.router_logits import router_logits

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    x0 = torch.randn(n, d, device=dev).to(dtype)
    w0 = torch.randn(e, d, device=dev) * 0.1
    g = torch.randn(n, e, device=dev)
    outs = []
    for impl in ("triton", "torch"):
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        y = router_logits(x, w, impl)
        outs.append((y, *torch.autograd.grad(y, (x, w), g)))
    (y, dx, dw), (y_r, dx_r, dw_r) = outs
    assert y.dtype == torch.float32 and dx.dtype == dtype and dw.dtype == torch.float32
    assert torch.allclose(y, y_r, atol=1e-5, rtol=1e-5)
    assert torch.allclose(dw, dw_r, atol=1e-4, rtol=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(dx.float(), dx_r.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", ["both", "logits_only", "tap_only"])
def test_router_logits_tap_adds_the_other_gradient_into_dx(dtype, which):
    """router_logits_tap: x's gradient through the logits and through the tapped view (another
    consumer, like the experts) is one dx, against autograd's sum on the reference; either
    gradient alone works too; x without requires_grad gives x itself back."""
    pytest.importorskip("triton")
    from hybridseq.kernels.moe.router_logits import router_logits_ref, router_logits_tap

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    n, d, e = 45, 70, 6  # off the blocks
    x0 = torch.randn(n, d, device=dev).to(dtype)
    w0 = torch.randn(e, d, device=dev) * 0.1
    g = torch.randn(n, e, device=dev)
    gx = torch.randn(n, d, device=dev).to(dtype)
    outs = []
    for impl in ("triton", "torch"):
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        logits, x_tap = router_logits_tap(x, w, impl)
        terms = {"both": (logits * g).sum() + (x_tap.float() * gx.float()).sum(),
                 "logits_only": (logits * g).sum(),
                 "tap_only": (x_tap.float() * gx.float()).sum() + 0 * logits.sum()}[which]
        outs.append((logits, *torch.autograd.grad(terms, (x, w))))
    (y, dx, dw), (y_r, dx_r, dw_r) = outs
    assert torch.allclose(y, y_r, atol=1e-5, rtol=1e-5)
    assert dx.dtype == dtype and dw.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(dx.float(), dx_r.float(), atol=tol, rtol=tol)
    assert torch.allclose(dw, dw_r, atol=1e-4, rtol=1e-5)
    if which == "both":  # the Triton dx really holds both terms
        want = (g @ w0 + gx.float()).to(dtype)
        assert torch.allclose(dx.float(), want.float(), atol=tol, rtol=tol)
    x = x0.clone()
    logits, x_tap = router_logits_tap(x, w0.clone().requires_grad_(True), "triton")
    assert x_tap is x and torch.allclose(logits, router_logits_ref(x0, w0), atol=1e-5, rtol=1e-5)


def test_router_with_triton_logits_matches_torch():
    pytest.importorskip("triton")
    from hybridseq.kernels.moe.router_logits import router_logits

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    r = Router(24, 6, 2).to(dev)
    x = torch.randn(11, 24, device=dev)
    outs = []
    for impl in ("triton", "torch"):
        r.logits_impl = impl
        xi = x.clone().requires_grad_(True)
        o = r(xi)
        loss = (o.weights * torch.arange(1.0, 3.0, device=dev)).sum() + o.logits.pow(2).mean()
        outs.append((o.indices, o.weights, *torch.autograd.grad(loss, (xi, r.weight))))
    assert torch.equal(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1:], outs[1][1:]):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    with pytest.raises(ValueError, match="router logits impl"):
        router_logits(x, r.weight, "fast")
    assert torch.equal(router_logits(x.cpu(), r.weight.cpu(), "auto"), router_logits(x.cpu(), r.weight.cpu(), "torch"))


@pytest.mark.parametrize("n,e,k,renorm", [(1, 8, 2, True), (37, 8, 2, True), (33, 64, 8, True),
                                          (50, 7, 3, False), (20, 5, 1, True), (17, 256, 4, True),
                                          (5, 3, 3, True)])
def test_softmax_topk_triton_matches_ref(n, e, k, renorm):
    """The fused softmax/top-k/logsumexp kernel (interpreter on CPU) against torch: probs, weights,
    indices, lse and the logits' gradient through all three outputs, at sizes off the blocks."""
    pytest.importorskip("triton")
    from hybridseq.kernels.moe.router_topk import softmax_topk

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(n * 1000 + e)
    l0 = (torch.randn(n, e, generator=g) * 2).to(dev)
    gp, gw, gl = (torch.randn(n, e, generator=g).to(dev), torch.randn(n, k, generator=g).to(dev),
                  torch.randn(n, generator=g).to(dev))
    outs = []
    for impl in ("triton", "torch"):
        logits = l0.clone().requires_grad_(True)
        p, w, i, lse = softmax_topk(logits, k, renorm, impl=impl)
        (dl,) = torch.autograd.grad((p * gp).sum() + (w * gw).sum() + (lse * gl).sum(), logits)
        outs.append((p, w, i, lse, dl))
    (p, w, i, lse, dl), (p_r, w_r, i_r, lse_r, dl_r) = outs
    assert torch.equal(i, i_r) and i.dtype == torch.int64
    for a, b in ((p, p_r), (w, w_r), (lse, lse_r), (dl, dl_r)):
        assert a.dtype == torch.float32 and torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    if renorm and k > 1:
        assert torch.allclose(w.sum(-1), torch.ones(n, device=dev))


@pytest.mark.parametrize("used", ["weights", "probs", "lse"])
def test_softmax_topk_triton_partial_gradients(used):
    """Only one output reaches the loss (the others get no gradient): the backward must still be
    the reference's."""
    pytest.importorskip("triton")
    from hybridseq.kernels.moe.router_topk import softmax_topk

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(3)
    l0 = torch.randn(19, 6, device=dev)
    grads = []
    for impl in ("triton", "torch"):
        logits = l0.clone().requires_grad_(True)
        p, w, _, lse = softmax_topk(logits, 2, True, impl=impl)
        out = {"weights": w, "probs": p, "lse": lse}[used]
        (g,) = torch.autograd.grad((out * torch.arange(out.numel(), device=dev).view_as(out)).sum(),
                                   logits)
        grads.append(g)
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-5)


def test_softmax_topk_ties_and_errors():
    pytest.importorskip("triton")
    from hybridseq.kernels.moe.router_topk import softmax_topk

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    logits = torch.zeros(3, 4, device=dev)  # all tied: the lower expert index wins
    _, w, i, _ = softmax_topk(logits, 2, True, impl="triton")
    assert i.tolist() == [[0, 1]] * 3 and torch.allclose(w, torch.full_like(w, 0.5))
    with pytest.raises(ValueError, match="k must be"):
        softmax_topk(logits, 5)
    with pytest.raises(ValueError, match="impl must be"):
        softmax_topk(logits, 1, impl="cuda")


def test_router_fused_topk_matches_torch_topk_and_losses():
    """A softmax Router with the fused kernel gives the torch path's outputs, z-loss (from lse)
    and gradients of the logits' weight."""
    pytest.importorskip("triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    r = Router(24, 6, 2).to(dev)
    x = torch.randn(11, 24, device=dev)
    res = []
    for impl in ("triton", "torch"):
        r.topk_impl = impl
        r.zero_grad()
        o = r(x)
        loss = (o.weights.sum() + z_loss(o.logits, o.lse)
                + load_balancing_loss(o.probs, o.indices, 6))
        loss.backward()
        res.append((o.indices, o.weights.detach(), z_loss(o.logits, o.lse).detach(), r.weight.grad.clone()))
    assert torch.equal(res[0][0], res[1][0])
    for a, b in zip(res[0][1:], res[1][1:]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n,e,k", [(1, 3, 1), (15, 8, 2), (17, 8, 2), (100, 64, 8), (33, 5, 5)])
def test_softmax_topk_stats_triton_matches_ref(n, e, k):
    """The routing sums from the fused kernel's per-block partials (interpreter on CPU) against
    torch: prob sums, lse^2 sum, slot counts, entropy, and the logits' gradient through a loss on
    the differentiable sums and the weights."""
    pytest.importorskip("triton")
    from hybridseq.kernels.moe.router_topk import softmax_topk_stats

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(n * 100 + e)
    l0 = (torch.randn(n, e, generator=g) * 2).to(dev)
    l0[0, 0] = -1e4  # a probability that underflows to 0: its entropy term is 0, not nan (one
    # only: ties between zeros would make the top-k order implementation-defined)
    gs, gw = torch.randn(e, generator=g).to(dev), torch.randn(n, k, generator=g).to(dev)
    outs = []
    for impl in ("triton", "torch"):
        logits = l0.clone().requires_grad_(True)
        p, w, i, lse, st = softmax_topk_stats(logits, k, True, impl=impl)
        loss = (st.prob_sum * gs).sum() + 0.37 * st.lse_sq_sum + (w * gw).sum()
        (dl,) = torch.autograd.grad(loss, logits)
        outs.append((i, st.counts, st.prob_sum.detach(), st.lse_sq_sum.detach(), st.entropy_sum, dl))
    (i, c, ps, lsq, ent, dl), (i_r, c_r, ps_r, lsq_r, ent_r, dl_r) = outs
    assert torch.equal(i, i_r) and torch.equal(c, c_r) and c.dtype == torch.int64
    assert c.sum().item() == n * k and torch.isfinite(ent)
    for a, b in ((ps, ps_r), (lsq, lsq_r), (ent, ent_r), (dl, dl_r)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a, b)


def test_moe_block_losses_from_router_sums_match_torch_path():
    """A MoE block whose softmax router returns the fused sums (Triton, interpreter on CPU) has the
    torch path's aux loss, metrics and gradients."""
    pytest.importorskip("triton")
    from hybridseq.blocks.moe import MoEBlock

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    blk = MoEBlock(16, {"n_experts": 6, "top_k": 2, "d_ff": 8, "aux_loss_coef": 0.3,
                        "z_loss_coef": 0.01}).to(dev)
    x = torch.randn(2, 9, 16, device=dev)
    res = []
    for impl in ("triton", "torch"):
        blk.router.topk_impl = impl
        blk.zero_grad()
        y = blk(x)
        assert (blk.router(x.view(-1, 16)).stats is not None)
        (y.square().sum() + blk.aux_loss).backward()
        m = blk.metrics
        res.append([blk.aux_loss.detach(), m["load"], m["entropy"], m["aux_loss"], m["z_loss"],
                    blk.router.weight.grad.clone(), blk.w_in.grad.clone()])
    for a, b in zip(*res):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a, b)


def test_softmax_topk_stats_beyond_fp32_exact_counts_uses_torch_sums(monkeypatch):
    """Past ``STATS_MAX_SLOTS`` token-slots the Triton op runs without its sums and torch computes
    them from its outputs: the same values and gradients."""
    pytest.importorskip("triton")
    from hybridseq.kernels.moe import router_topk

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(5)
    l0 = torch.randn(21, 7, device=dev)
    res = []
    for limit in (2 ** 24, 10):
        monkeypatch.setattr(router_topk, "STATS_MAX_SLOTS", limit)
        logits = l0.clone().requires_grad_(True)
        _, w, _, _, st = router_topk.softmax_topk_stats(logits, 3, True, impl="triton")
        (g,) = torch.autograd.grad(st.prob_sum.square().sum() + st.lse_sq_sum + w[:, 0].sum(), logits)
        res.append((st.counts, st.prob_sum.detach(), st.lse_sq_sum.detach(), st.entropy_sum, g))
    for a, b in zip(*res):
        assert torch.allclose(a.double(), b.double(), atol=1e-5, rtol=1e-5)
