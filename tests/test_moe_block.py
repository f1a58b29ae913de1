"""MoEBlock: accounting, dropless properties, capacity drops, shared experts, errors."""
import math

import pytest
import torch
import torch.nn.functional as F

from hybridseq.blocks.moe import MoEBlock, MoESpec, apply_capacity, capacity_of
from hybridseq.blocks.spec import ffn_dim
from hybridseq.errors import ConfigError


def _n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("spec", [
    {"n_experts": 4, "top_k": 2},
    {"n_experts": 6, "top_k": 1, "activation": "gelu", "d_ff": 40},
    {"n_experts": 8, "top_k": 3, "d_ff": 24, "shared_experts": 2, "shared_d_ff": 16},
    {"n_experts": 3, "top_k": 3, "activation": "gelu", "shared_experts": 1},
])
def test_param_count_and_flops_exact(spec):
    d = 32
    blk = MoEBlock(d, spec)
    total, active = MoESpec(**spec).param_count(d)
    assert total == _n_params(blk)
    e, k = spec["n_experts"], spec["top_k"]
    act = spec.get("activation", "swiglu")
    n_in = 2 if act == "swiglu" else 1
    f = spec.get("d_ff") or (int(math.ceil(8 * d / 3 / 8) * 8) if act == "swiglu" else 4 * d)
    sf = spec.get("shared_d_ff") or f
    s = spec.get("shared_experts", 0)
    per_expert = (n_in + 1) * d * f
    assert active == e * d + k * per_expert + s * (n_in + 1) * d * sf
    assert total == e * d + e * per_expert + s * (n_in + 1) * d * sf
    assert MoESpec(**spec).flops_per_token(d, 128) == 2 * active
    assert [p.shape for p in blk.residual_out_params()][0] == blk.w_out.shape
    assert blk.spec.state_bytes(d, 100) == 0 and blk.new_state(1, 10) is None


def test_ffn_dim_default_rule():
    assert ffn_dim(64, None, "swiglu") == 176  # round_up(170.67, 8)
    assert ffn_dim(64, None, "gelu") == 256
    assert ffn_dim(64, 100, "swiglu") == 100


def _block(**kw):
    spec = {"n_experts": 4, "top_k": 2, "d_ff": 24, "impl": "loop", **kw}
    return MoEBlock(16, spec)


def test_forward_matches_hand_written_swiglu_moe():
    torch.manual_seed(0)
    blk = _block(shared_experts=1, shared_d_ff=8)
    x = torch.randn(2, 3, 16)
    y = blk(x)
    xf = x.view(-1, 16)
    probs = torch.softmax(xf @ blk.router.weight.t(), -1)
    w, idx = probs.topk(2, -1)
    w = w / w.sum(-1, keepdim=True)
    want = torch.zeros_like(xf)
    for n in range(6):
        for j in range(2):
            e = idx[n, j]
            a = xf[n] @ blk.w_in[e]
            want[n] += w[n, j] * ((F.silu(a[:24]) * a[24:]) @ blk.w_out[e])
        a = xf[n] @ blk.shared_w_in
        want[n] += (F.silu(a[:8]) * a[8:]) @ blk.shared_w_out
    assert torch.allclose(y.view(-1, 16), want, atol=1e-6)


def test_shared_experts_are_a_sum_of_mlps():
    torch.manual_seed(0)
    blk = _block(shared_experts=3, shared_d_ff=8, activation="gelu")
    x = torch.randn(5, 16)
    with torch.no_grad():
        blk.w_out.zero_()  # routed part off: only the shared experts remain
        y = blk(x)
        want = sum(F.gelu(x @ blk.shared_w_in[:, 8 * s:8 * s + 8]) @ blk.shared_w_out[8 * s:8 * s + 8]
                   for s in range(3))
    assert torch.allclose(y, want, atol=1e-6)


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_dropless_batch_independent_and_causal(impl):
    torch.manual_seed(0)
    blk = _block(impl=impl, router="softmax")
    x = torch.randn(3, 9, 16)
    y = blk(x)
    y0 = blk(x[1:2])
    assert torch.allclose(y[1:2], y0, atol=1e-6)
    x2 = x.clone()
    x2[:, 5:] = torch.randn(3, 4, 16)
    y2 = blk(x2)
    assert torch.allclose(y[:, :5], y2[:, :5], atol=1e-6)
    assert not torch.allclose(y[:, 5:], y2[:, 5:])


def test_capacity_mode_drops_exactly_the_expected_tokens():
    # 6 tokens, top-1, 2 experts, cf 1 -> capacity ceil(6/2) = 3 per expert
    indices = torch.tensor([[0], [0], [1], [0], [0], [1]])
    weights = torch.rand(6, 1)
    assert capacity_of(6, 1, 2, 1.0) == 3
    idx, w, keep = apply_capacity(indices, weights, 2, 3)
    assert keep.view(-1).tolist() == [True, True, True, True, False, True]  # the 4th expert-0 token
    assert idx.view(-1).tolist() == [0, 0, 1, 0, 2, 1] and w[4, 0] == 0
    # top-2: token-major slot order, expert 1 capacity 2
    indices = torch.tensor([[1, 0], [1, 2], [0, 1], [2, 0]])
    _, _, keep = apply_capacity(indices, torch.ones(4, 2), 3, 2)
    assert keep.tolist() == [[True, True], [True, True], [True, False], [True, False]]


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_capacity_block_zeroes_dropped_tokens(impl):
    torch.manual_seed(0)
    blk = _block(impl=impl, top_k=1, capacity_factor=1.0)
    with torch.no_grad():
        blk.router.weight.zero_()
        blk.router.weight[0] = 1.0  # inputs with a positive sum go to expert 0
    x = torch.rand(1, 8, 16) + 0.1  # all 8 tokens pick expert 0; capacity ceil(8/4) = 2
    y = blk(x)
    assert blk.metrics["dropped"].item() == 6
    assert (y[0, :2].abs().sum(-1) > 0).all() and (y[0, 2:] == 0).all()
    free = _block(impl=impl, top_k=1)
    free.load_state_dict(blk.state_dict())
    assert torch.allclose(free(x)[0, :2], y[0, :2], atol=1e-6)


def test_metrics_and_aux_loss_present():
    blk = _block()
    blk(torch.randn(2, 4, 16))
    m = blk.metrics
    assert m["load"].shape == (4,) and m["load"].sum().item() == pytest.approx(1.0)
    assert 0 < m["entropy"].item() <= math.log(4) + 1e-6
    assert m["dropped"].item() == 0 and blk.aux_loss.dim() == 0 and blk.aux_loss.requires_grad


def test_gelu_and_topk_equals_all_experts():
    torch.manual_seed(0)
    blk = _block(activation="gelu", top_k=4, renormalize=False)
    x = torch.randn(3, 16)
    probs = torch.softmax(x @ blk.router.weight.t(), -1)
    want = sum(probs[:, e:e + 1] * (F.gelu(x @ blk.w_in[e]) @ blk.w_out[e]) for e in range(4))
    assert torch.allclose(blk(x), want, atol=1e-6)


@pytest.mark.parametrize("bad,key", [
    ({"top_k": 5}, "moe.top_k"), ({"n_experts": 0}, "moe.n_experts"),
    ({"activation": "relu"}, "moe.activation"), ({"impl": "fast"}, "moe.impl"),
    ({"capacity_factor": -1.0}, "moe.capacity_factor"), ({"ep_size": 3}, "moe.ep_size"),
])
def test_config_errors(bad, key):
    with pytest.raises(ConfigError) as e:
        MoEBlock(16, {"n_experts": 4, "top_k": 2, **bad})
    assert e.value.key == key


def test_ep_size_builds_a_single_device_block():
    """``ep_size`` is for the distributed launcher, which shards a built block from outside: the
    block itself holds every expert and routes locally until ``shard_experts``."""
    blk = MoEBlock(16, {"n_experts": 4, "top_k": 2, "ep_size": 2})
    assert blk.w_in.shape[0] == 4 and blk.ep_group is None and blk.ep_size == 1
    assert blk(torch.randn(1, 3, 16)).shape == (1, 3, 16)


def test_bench_moe_rows_and_variants_cpu(monkeypatch):
    """`hybridseq bench moe` at toy sizes on CPU: variant rows labelled, a fused-only variant
    reported as an error row (not raised); each MoE row's ratio is taken against the dense
    timings just before and after it (default), or against the mean of the first and last dense
    timings of the run (--no-bracket). The dense fwd+bwd timer is replaced by a counter (1, 2, ...
    ms in call order), so the expected ratios are exact."""
    import argparse
    import itertools

    from hybridseq.bench import moe as bench

    argv = ["--device", "cpu", "--dtype", "fp32", "--tokens", "16", "--d-model", "16",
            "--d-ff", "8", "--configs", "4x2", "--routings", "balanced", "--impls",
            "grouped", "--warmup", "0", "--iters", "1", "--variant-rows", "4x2:skewed",
            "--variants", "mlp=autograd,permute=torch; mlp=fused@4x2:balanced"]
    for extra, want in (([], [1.5, 2.5]), (["--no-bracket"], [1.5, 1.5])):
        parser = argparse.ArgumentParser()
        bench.add_arguments(parser)
        args = parser.parse_args(argv + extra)
        ticks = itertools.count(1)
        monkeypatch.setattr(bench, "_dense_fwd_bwd_ms", lambda *a, **k: float(next(ticks)))
        rows = bench.run(args)
        dense = [r for r in rows if r["what"].startswith("dense swiglu")]
        assert [r["fwd_bwd_ms"] for r in dense] == ([1.0, 4.0] if not extra else [1.0, 2.0])
        moe = [r for r in rows if r["what"].startswith("moe") and r.get("fwd_bwd_ms")]
        assert [r["what"].endswith("[mlp=autograd,permute=torch]") for r in moe] == [False, True]
        for r, ref in zip(moe, want):
            assert r["dense_ms"] == ref
            assert r["vs_dense"] == pytest.approx(ref / r["fwd_bwd_ms"]) == r["vs_dense_torch"]
        (err,) = [r for r in rows if r.get("error")]
        assert "[mlp=fused]" in err["what"] and "fused" in err["error"]
    with pytest.raises(ValueError, match="bad item"):
        bench.parse_variant("layout")


def test_bench_forced_routing_counts_its_own_indices():
    """``bench moe``'s forced routing reports the load (and load-balancing loss) of the forced
    indices, not of the router's own top-k choice."""
    from hybridseq.bench.moe import fixed_assignment, force_routing
    from hybridseq.blocks.moe.router import load_balancing_loss

    torch.manual_seed(0)
    blk = MoEBlock(16, {"n_experts": 4, "top_k": 2, "d_ff": 8})
    idx = fixed_assignment("skewed", 24, 4, 2, torch.device("cpu"))
    force_routing(blk, idx)
    x = torch.randn(1, 24, 16)
    blk(x)
    want = torch.bincount(idx.view(-1), minlength=4).float() / idx.numel()
    assert torch.allclose(blk.metrics["load"], want)
    probs = torch.softmax(torch.nn.functional.linear(x.view(24, 16), blk.router.weight), -1)
    assert torch.allclose(blk.metrics["aux_loss"], load_balancing_loss(probs, idx, 4), atol=1e-6)


def test_bench_moe_preheats_before_the_first_dense_timing(monkeypatch):
    """``--preheat S`` runs the dense fwd+bwd for S seconds before the first timing (default 0 on
    CPU); ``bench.common.preheat`` calls its function until the time is up."""
    import argparse
    import time

    from hybridseq.bench import common
    from hybridseq.bench import moe as bench

    calls = []
    assert common.preheat(lambda: calls.append(1), 0.0) == 0 and not calls
    t0 = time.perf_counter()
    n = common.preheat(lambda: calls.append(1), 0.05, "cpu")
    assert n == len(calls) > 0 and time.perf_counter() - t0 >= 0.05

    events = []
    monkeypatch.setattr(bench, "preheat", lambda fn, s, dev: events.append(("heat", s, fn())))
    monkeypatch.setattr(bench, "_dense_fwd_bwd_ms", lambda *a, **k: events.append(("time",)) or 1.0)
    argv = ["--device", "cpu", "--dtype", "fp32", "--tokens", "8", "--d-model", "16", "--d-ff", "8",
            "--configs", "4x2", "--routings", "balanced", "--impls", "grouped", "--warmup", "0",
            "--iters", "1", "--dense-acts", "torch"]
    for extra, want in (([], 0.0), (["--preheat", "0.25"], 0.25)):
        events.clear()
        parser = argparse.ArgumentParser()
        bench.add_arguments(parser)
        bench.run(parser.parse_args(argv + extra))
        assert events[0][:2] == ("heat", want) and events[1] == ("time",)
