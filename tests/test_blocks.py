"""Blocks: closed-form accounting, causality, batch independence, the Mamba block against a naive
sequential implementation, init, fp32 parameters, norms, RoPE, the registry."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from hybridseq.blocks import KINDS, build_block
from hybridseq.blocks.norm import make_norm
from hybridseq.blocks.attention import AttentionBlock
from hybridseq.blocks.mamba import MambaBlock
from hybridseq.blocks.mlp import MLPBlock
from hybridseq.blocks.norm import LayerNorm, RMSNorm
from hybridseq.blocks.attention.rope import apply_rope, rope_tables
from hybridseq.errors import ConfigError

D = 24

SPECS = [
    ("mamba", {}),
    ("mamba", {"d_state": 8, "d_conv": 3, "expand": 1, "dt_rank": 5, "bias": True, "conv_bias": False}),
    ("attention", {"n_heads": 4}),
    ("attention", {"n_heads": 6, "n_kv_heads": 2, "head_dim": 6, "qk_norm": True, "bias": True,
                   "rope_theta": None}),
    ("attention", {"n_heads": 4, "n_kv_heads": 1, "window": 4}),
    ("mamba2", {"d_state": 8, "headdim": 8, "chunk_size": 16, "impl": "torch"}),
    ("mamba2", {"d_state": 4, "headdim": 6, "ngroups": 2, "rmsnorm": False, "impl": "torch",
                "chunk_size": 16}),
    ("mlp", {}),
    ("mlp", {"activation": "gelu", "d_ff": 40, "bias": True}),
    ("mlp", {"activation": "relu2", "d_ff": 40}),
    ("moe", {"n_experts": 4, "top_k": 2, "d_ff": 16}),
    ("moe", {"n_experts": 4, "top_k": 1, "d_ff": 16, "shared_experts": 1, "activation": "gelu"}),
    ("mamba", {"d_state": 4, "dt_rank": 3, "inner_norms": "rms"}),
    ("mamba", {"d_state": 4, "inner_norms": "rms_weightless", "inner_norm_eps": 1e-5}),
    ("attention", {"n_heads": 4, "n_kv_heads": 2, "qk_norm": "full", "clip_qkv": 0.5, "bias": "qkv"}),
    ("attention", {"n_heads": 2, "head_dim": 8, "partial_rotary": 0.5, "softmax_scale": 0.2,
                   "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}}),
    ("moe", {"n_experts": 4, "top_k": 2, "d_ff": 16, "shared_experts": 1, "shared_d_ff": 8,
             "shared_expert_gate": True, "routed_scale": 2.0}),
    ("moe", {"n_experts": 4, "top_k": 2, "d_ff": 16, "activation": "relu2", "router": "sigmoid",
             "shared_experts": 1}),
]
IDS = [f"{k}{i}" for i, (k, _) in enumerate(SPECS)]


def _block(kind, spec, d=D):
    return build_block(kind, d, spec)


def _close(a, b, tol):
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-12)
    assert (a - b).abs().max().item() <= tol * scale, (a - b).abs().max().item() / scale


@pytest.mark.parametrize("kind,spec", SPECS, ids=IDS)
def test_param_count_closed_form(kind, spec):
    blk = _block(kind, spec)
    total, active = blk.spec.param_count(D)
    assert total == sum(p.numel() for p in blk.parameters())
    if kind == "moe":
        s = blk.spec
        n_in = 2 if s["activation"] == "swiglu" else 1
        per_expert = (n_in + 1) * D * s["d_ff"]
        assert total - active == (s["n_experts"] - s["top_k"]) * per_expert
    else:
        assert active == total


@pytest.mark.parametrize("kind,spec", SPECS, ids=IDS)
def test_block_causal_and_batch_independent(kind, spec):
    blk = _block(kind, spec).eval()
    L, t = 11, 5
    x = torch.randn(3, L, D)
    y = blk(x)
    assert y.shape == x.shape
    x2 = x.clone()
    x2[:, t + 1:] = torch.randn(3, L - t - 1, D)
    y2 = blk(x2)
    torch.testing.assert_close(y2[:, :t + 1], y[:, :t + 1], atol=1e-6, rtol=1e-5)
    assert (y2[:, t + 1:] - y[:, t + 1:]).abs().max() > 1e-4  # later outputs do depend on them
    y_one = blk(x[1:2])
    torch.testing.assert_close(y_one, y[1:2], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind,spec", SPECS, ids=IDS)
def test_state_bytes_match_new_state(kind, spec):
    blk = _block(kind, spec)
    for L in (3, 9):
        st = blk.new_state(2, L, device="cpu", dtype=torch.bfloat16)
        real = 0 if st is None else sum(t.numel() * t.element_size() for t in st.values())
        assert real == 2 * blk.spec.state_bytes(D, L, dtype_bytes=2)


def test_residual_out_params_are_output_projections():
    m = _block("mamba", {})
    assert m.residual_out_params() == [m.out_proj.weight]
    a = _block("attention", {"n_heads": 4})
    assert a.residual_out_params() == [a.o_proj.weight]
    f = _block("mlp", {})
    assert f.residual_out_params() == [f.down_proj.weight]


@pytest.mark.parametrize("bias", [False, True])
def test_mlp_swiglu_is_one_gate_up_projection_and_loads_old_checkpoints(bias):
    """The fused gate|up projection computes down(silu(gate x) * up x) with the gate rows first,
    and a state dict with the earlier separate gate_proj / up_proj loads into it."""
    torch.manual_seed(0)
    blk = MLPBlock(D, {"d_ff": 24, "bias": bias}).double()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    w_g, w_u = blk.gate_up_proj.weight[:24], blk.gate_up_proj.weight[24:]
    b_g, b_u = (blk.gate_up_proj.bias[:24], blk.gate_up_proj.bias[24:]) if bias else (None, None)
    want = blk.down_proj(F.silu(F.linear(x, w_g, b_g)) * F.linear(x, w_u, b_u))
    torch.testing.assert_close(blk(x), want)
    old = {k: v for k, v in blk.state_dict().items() if not k.startswith("gate_up_proj")}
    old["gate_proj.weight"], old["up_proj.weight"] = w_g.detach().clone(), w_u.detach().clone()
    if bias:
        old["gate_proj.bias"], old["up_proj.bias"] = b_g.detach().clone(), b_u.detach().clone()
    fresh = MLPBlock(D, {"d_ff": 24, "bias": bias}).double()
    fresh.load_state_dict(old)
    torch.testing.assert_close(fresh(x), want)
    with pytest.raises(RuntimeError, match="Missing key"):
        MLPBlock(D, {"d_ff": 24, "bias": bias}).load_state_dict(
            {"down_proj.weight": old["down_proj.weight"]})


def test_mlp_flops_match_counted_matmuls():
    for spec in ({}, {"activation": "gelu", "d_ff": 40}):
        blk = _block("mlp", spec)
        x = torch.randn(1, 7, D)
        with FlopCounterMode(display=False) as fc:
            blk(x)
        assert fc.get_total_flops() == 7 * blk.spec.flops_per_token(D, 7)


def test_attention_flops_projections_and_context():
    spec = {"n_heads": 6, "n_kv_heads": 2, "head_dim": 6}
    blk = _block("attention", spec)
    x = torch.randn(1, 5, D)
    with FlopCounterMode(display=False) as fc:
        for proj in (blk.q_proj, blk.k_proj, blk.v_proj):
            proj(x)
        blk.o_proj(torch.randn(1, 5, 36))
    full = blk.spec.replace(window=None)
    L = 10
    per_tok = full.flops_per_token(D, L)
    ctx = per_tok - fc.get_total_flops() / 5
    assert ctx == pytest.approx(4 * 6 * 6 * (L + 1) / 2)
    # with a window: the mean number of visible keys, counted by brute force
    w = 3
    pairs = sum(min(i + 1, w) for i in range(L))
    per_tok_w = full.replace(window=w).flops_per_token(D, L)
    assert per_tok_w - fc.get_total_flops() / 5 == pytest.approx(4 * 6 * 6 * pairs / L)


def test_mamba_flops_projection_part():
    blk = _block("mamba", {"d_state": 8})
    di, n, r, w = blk.d_inner, blk.d_state, blk.dt_rank, blk.d_conv
    x = torch.randn(1, 4, D)
    with FlopCounterMode(display=False) as fc:
        blk.in_proj(x)
        xc = torch.randn(1, 4, di)
        blk.x_proj(xc)
        F.linear(torch.randn(1, 4, r), blk.dt_proj.weight)
        blk.out_proj(xc)
    assert blk.spec.flops_per_token(D, 4) == fc.get_total_flops() / 4 + 2 * di * w + 9 * di * n


# --- Mamba against a naive sequential implementation --------------------------------------------
def naive_mamba(blk: MambaBlock, x: torch.Tensor) -> torch.Tensor:
    """The Mamba block written out step by step in float64 (no kernels)."""
    di, r, n, w = blk.d_inner, blk.dt_rank, blk.d_state, blk.d_conv
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    xz = F.linear(x, f64(blk.in_proj.weight), f64(blk.in_proj.bias))
    xs, z = xz[..., :di], xz[..., di:]
    b, L, _ = x.shape
    pad = torch.cat([xs.new_zeros(b, w - 1, di), xs], dim=1)
    cw = f64(blk.conv_weight)
    conv = []
    for t in range(L):
        acc = sum(pad[:, t + k] * cw[:, k] for k in range(w))
        if blk.conv_bias is not None:
            acc = acc + f64(blk.conv_bias)
        conv.append(acc)
    xc = F.silu(torch.stack(conv, dim=1))
    x_dbl = F.linear(xc, f64(blk.x_proj.weight))
    dt_in, B, C = x_dbl[..., :r], x_dbl[..., r:r + n], x_dbl[..., r + n:]
    dt = F.softplus(F.linear(dt_in, f64(blk.dt_proj.weight), f64(blk.dt_proj.bias)))
    A = -torch.exp(f64(blk.A_log))
    h = x.new_zeros(b, di, n)
    ys = []
    for t in range(L):
        h = torch.exp(dt[:, t, :, None] * A) * h + dt[:, t, :, None] * B[:, t, None, :] * xc[:, t, :, None]
        ys.append((h * C[:, t, None, :]).sum(-1) + f64(blk.D) * xc[:, t])
    y = torch.stack(ys, dim=1) * F.silu(z)
    return F.linear(y, f64(blk.out_proj.weight), f64(blk.out_proj.bias))


@pytest.mark.parametrize("spec,L", [({}, 1), ({"d_state": 4, "d_conv": 3, "bias": True}, 7),
                                    ({"expand": 1, "dt_rank": 3, "conv_bias": False}, 37)])
def test_mamba_torch_path_matches_naive(spec, L):
    blk = MambaBlock(16, {**spec, "impl": "torch"}).double()
    with torch.no_grad():  # make the gate and skip non-trivial
        blk.D.normal_()
        blk.out_proj.weight.mul_(3)
    x = torch.randn(2, L, 16, dtype=torch.float64, requires_grad=True)
    y = blk(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = naive_mamba(blk, x_ref)
    _close(y, y_ref, 1e-10)
    g = torch.randn_like(y)
    params = [blk.in_proj.weight, blk.A_log, blk.dt_proj.bias, blk.conv_weight, blk.D]
    grads = torch.autograd.grad(y, [x, *params], g)
    grads_ref = torch.autograd.grad(y_ref, [x_ref, *params], g)
    for a, b, p in zip(grads, grads_ref, [x, *params]):
        _close(a, b, 1e-6 if p.dtype == torch.float32 else 1e-9)  # fp32-kept params: fp32 grads


def test_mamba_state_continuation_matches_one_pass():
    """Prefill in two chunks, then single steps: equal to one pass over the sequence."""
    blk = MambaBlock(16, {"impl": "torch", "d_conv": 4}).eval()
    x = torch.randn(2, 12, 16)
    y = blk(x)
    st = blk.new_state(2, 12, dtype=torch.float32)
    outs = [blk(x[:, :2], st, 0), blk(x[:, 2:7], st, 2)]
    for t in range(7, 12):
        outs.append(blk(x[:, t:t + 1], st, t))
    _close(torch.cat(outs, 1), y, 1e-5)


def test_mamba_init():
    spec = {"d_state": 6, "dt_min": 0.01, "dt_max": 0.05, "dt_scale": 2.0, "dt_rank": 4}
    blk = MambaBlock(32, spec)
    A = -torch.exp(blk.A_log)
    torch.testing.assert_close(A, -torch.arange(1, 7.0).repeat(blk.d_inner, 1))
    assert torch.equal(blk.D, torch.ones(blk.d_inner))
    dt = F.softplus(blk.dt_proj.bias)
    assert dt.min() >= 0.01 * (1 - 1e-4) and dt.max() <= 0.05 * (1 + 1e-4)
    assert dt.std() > 0  # drawn, not constant
    bound = 4 ** -0.5 * 2.0
    assert blk.dt_proj.weight.abs().max() <= bound and blk.dt_proj.weight.abs().max() > bound / 2
    const = MambaBlock(32, {**spec, "dt_init": "constant"})
    assert torch.all(const.dt_proj.weight == bound)
    for p in (blk.A_log, blk.D, blk.dt_proj.bias):
        assert p._keep_fp32 and p._no_weight_decay and p.dtype == torch.float32
    assert not getattr(blk.in_proj.weight, "_no_weight_decay", False)


def test_fp32_params_survive_bfloat16_and_block_runs():
    blk = MambaBlock(16, {"impl": "torch"}).bfloat16()
    assert blk.A_log.dtype == blk.D.dtype == blk.dt_proj.bias.dtype == torch.float32
    assert blk.in_proj.weight.dtype == torch.bfloat16
    y = blk(torch.randn(2, 5, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    st = blk.new_state(2, 8)
    assert st["conv"].dtype == torch.bfloat16 and st["ssm"].dtype == torch.float32


# --- attention --------------------------------------------------------------------------------
@pytest.mark.parametrize("rope", [10000.0, None])
def test_sliding_window_attention_sees_only_its_window(rope):
    w, L = 4, 12
    blk = _block("attention", {"n_heads": 4, "n_kv_heads": 2, "window": w, "rope_theta": rope}).eval()
    x = torch.randn(1, L, D)
    y = blk(x)
    t = 9
    far = x.clone()
    far[:, : t - w + 1] = torch.randn(1, t - w + 1, D)  # positions <= t - w: outside t's window
    torch.testing.assert_close(blk(far)[:, t], y[:, t], atol=1e-6, rtol=1e-5)
    near = x.clone()
    near[:, t - w + 1] = torch.randn(D)  # the oldest position inside the window
    assert (blk(near)[:, t] - y[:, t]).abs().max() > 1e-4


def test_rope_is_relative():
    hd = 8
    q, k = torch.randn(1, 1, 1, hd), torch.randn(1, 1, 1, hd)

    def score(pq, pk):
        cq, sq = rope_tables(torch.tensor([pq]), hd, 10000.0)
        ck, sk = rope_tables(torch.tensor([pk]), hd, 10000.0)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(7, 3), score(104, 100))
    assert abs(score(7, 3) - score(7, 4)) > 1e-4
    cos, sin = rope_tables(torch.arange(5), hd, 10000.0)
    assert cos.dtype == torch.float32 and cos.shape == (5, hd // 2)
    torch.testing.assert_close(apply_rope(q, cos[:1], sin[:1]), q)  # position 0: identity


def test_attention_rejects_bad_heads():
    with pytest.raises(ConfigError, match="n_kv_heads"):
        _block("attention", {"n_heads": 4, "n_kv_heads": 3})
    with pytest.raises(ConfigError, match="n_heads"):
        _block("attention", {"n_heads": 5})


# --- norms and registry -----------------------------------------------------------------------
def test_norms():
    x = torch.randn(3, 5, 16, dtype=torch.bfloat16)
    rms = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        rms.weight.normal_()
    xf = x.float()
    ref = xf / torch.sqrt((xf * xf).mean(-1, keepdim=True) + 1e-5) * rms.weight
    y = rms(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=1e-2)
    ln = make_norm("layernorm", 16, 1e-5)
    assert isinstance(ln, LayerNorm)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    ref = F.layer_norm(xf, (16,), ln.weight, ln.bias, 1e-5)
    torch.testing.assert_close(ln(x).float(), ref, atol=2e-2, rtol=1e-2)
    assert sum(p.numel() for p in ln.parameters()) == 32
    with pytest.raises(ConfigError, match="model.norm"):
        make_norm("batchnorm", 16)


def test_registry():
    assert set(KINDS) == {"mamba", "mamba2", "attention", "moe", "mlp"}
    for kind, cls in KINDS.items():
        assert cls.kind == kind
    blk = build_block("mlp", 8, {"kind": "mlp"}, layer_idx=2, n_layers=5)
    assert blk.d_ff == 24 and blk.layer_idx == 2 and blk.n_layers == 5  # round_up(8/3*8, 8)
    with pytest.raises(ConfigError, match="unknown block kind"):
        build_block("conv", 8, {})


def test_mamba_triton_impl_matches_torch_impl():
    """The block through the Triton kernels (compiled on CUDA, interpreted on CPU) equals the torch
    path: forward, gradients, and prefill + one-token steps (fused decode kernels)."""
    import os

    from hybridseq import kernels

    if not kernels.triton_available() or (not torch.cuda.is_available()
                                          and os.environ.get("TRITON_INTERPRET") != "1"):
        pytest.skip("Triton cannot run here")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    blk = MambaBlock(8, {"impl": "torch", "d_state": 4}).to(dev)
    x = torch.randn(2, 6, 8, device=dev, requires_grad=True)
    y = blk(x)
    g = torch.autograd.grad(y.sum(), [x, blk.A_log, blk.in_proj.weight])
    blk.impl = "triton"
    y2 = blk(x)
    g2 = torch.autograd.grad(y2.sum(), [x, blk.A_log, blk.in_proj.weight])
    _close(y2, y, 1e-5)
    for a, b in zip(g2, g):
        _close(a, b, 1e-5)
    st = blk.new_state(2, 8, device=dev)
    with torch.no_grad():
        steps = [blk(x[:, :3], st, 0)] + [blk(x[:, t:t + 1], st, t) for t in range(3, 6)]
    _close(torch.cat(steps, 1), y.detach(), 1e-5)


def test_bench_block_runs_on_cpu():
    import argparse

    from hybridseq.bench import block as bench

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    rows = bench.run(p.parse_args(["--d-model", "16", "--batch", "1", "--seqlen", "8", "--dtype", "fp32",
                                   "--iters", "1", "--mamba-impls", "torch", "--heads", "2",
                                   "--experts", "2", "--top-k", "1"]))
    assert [r["block"] for r in rows] == ["mamba", "attention", "moe", "mlp"]
    assert all(r["status"] == "ok" and r["fwd_bwd_ms"] > 0 for r in rows)
