"""The block options the checkpoint families need (mamba ``inner_norms``; attention ``qk_norm``
per_head/full, ``clip_qkv``, ``rope_scaling``, ``partial_rotary``, ``softmax_scale``, ``bias:
qkv``; moe ``shared_expert_gate``, ``routed_scale``, ``activation: relu2``; the model's
multipliers): each against a plain reference, the sequence forward against the prefill + one-token
steps, every backend against the reference backend, and the config hashes: every shipped layout
and the legacy files keep theirs, and a new key changes the hash only away from its default."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import hybridseq as hs
from hybridseq.blocks import KINDS, build_block
from hybridseq.config import config_hash
from hybridseq.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the config hashes of the shipped layouts and the legacy model: adding block or model keys must
# leave every one of them as it is
HASHES = {
    "layouts/blackmamba.yaml": "997d48d209aaab04dcda67529779aa91600cd3c734f83bedb02488a22e236e15",
    "layouts/granite-4-h.yaml": "17ac3500a11829a484b215ad2ecc3b88407155ccec010707a30a3221f5a3af18",
    # jamba.yaml sets inner_norms and renormalize away from their defaults (the released Jamba's)
    "layouts/jamba.yaml": "24f540eb0ca4b80891fb0e40b4260cf5df12f869ec89bfd9d1e9fc08d31b5084",
    "layouts/mamba.yaml": "77bdf10d388fc7ef1489f08aee2d94544fa0b7586d75806fb36c669bbb9c8f58",
    "layouts/mamba2.yaml": "19a8b2b8ecc5d10e2cafd67201a011ce2824fcfc9a05194ae48790b67f8cb9b5",
    "layouts/moe-mamba.yaml": "68acefc8f4246d83bab7ad6eb94b54b71d33c7eac10d294c5ecf818c823fc8c2",
    "layouts/nemotron-h.yaml": "9e6df318b95b6c44fda21077a779f5184a631043a7c3f16bfca3da74899ff4c5",
    "layouts/paper/induction_heads/attention.yaml": "78760e76a88650348d032599524443be212115c63e27141729454ac9d8fbbc85",
    "layouts/paper/induction_heads/hybrid-nope.yaml": "f4c637a8e5e8d25cfd5b6e047c3c33861e000b943b1f4c5af7cc5cf7e5999162",
    "layouts/paper/induction_heads/hybrid.yaml": "4929c8a2c3085141a4454b4ef7941ddcb45a8063a1bd20409b17fd77b6d91d21",
    "layouts/paper/induction_heads/mamba.yaml": "7f90a3382eede9662a69a365373861297807c650211ac1626fc3d08c45e8eb90",
    "layouts/paper/mqar/attention.yaml": "78760e76a88650348d032599524443be212115c63e27141729454ac9d8fbbc85",
    "layouts/paper/mqar/hybrid.yaml": "4929c8a2c3085141a4454b4ef7941ddcb45a8063a1bd20409b17fd77b6d91d21",
    "layouts/paper/mqar/mamba.yaml": "7f90a3382eede9662a69a365373861297807c650211ac1626fc3d08c45e8eb90",
    "layouts/paper/selective_copy/attention.yaml": "78760e76a88650348d032599524443be212115c63e27141729454ac9d8fbbc85",
    "layouts/paper/selective_copy/hybrid.yaml": "4929c8a2c3085141a4454b4ef7941ddcb45a8063a1bd20409b17fd77b6d91d21",
    "layouts/paper/selective_copy/mamba.yaml": "7f90a3382eede9662a69a365373861297807c650211ac1626fc3d08c45e8eb90",
    "layouts/samba.yaml": "bced290c6026655b39f156bef1208023ade5d10724e84afd4126d40a7e4f78cb",
    "layouts/text-hybrid.yaml": "f81de540a21104080a643590a957c1dd97edf7c966c5a3e28b48eb89f6092352",
    "layouts/transformer.yaml": "78760e76a88650348d032599524443be212115c63e27141729454ac9d8fbbc85",
    "tests/data/layouts/hybrid.yaml": "a5c57741aa7153976ca8ff96c2a50e0b0f09bac3a325a19941536d29cf04b285",
    "tests/data/layouts/megatron.yaml": "1794f3c63ed4ee1c9bd3ff634d4cf7c03c553afdacfed1d87ba891de4e98b21b",
    "tests/data/legacy_v1/model/config.yaml": "cf8f4d0846c1d06e78659f34ba1f3591d5eb834b95b2be00feb060e1cf802fb3",
}


def _close(a, b, tol):
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-12)
    assert (a - b).abs().max().item() <= tol * scale, (a - b).abs().max().item() / scale


def _triton_runs() -> bool:
    from hybridseq import kernels

    return kernels.triton_available() and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


def _perturb(module, scale=0.2):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)


def _steps_equal_forward(blk, x, prefill=3, tol=1e-5):
    """The sequence forward equals a prefill of ``prefill`` tokens then one-token ``step``s."""
    y = blk(x)
    st = blk.new_state(x.shape[0], x.shape[1], dtype=x.dtype)
    outs = [blk(x[:, :prefill], st, 0)]
    for t in range(prefill, x.shape[1]):
        outs.append(blk.step(x[:, t:t + 1], st, torch.tensor(t)))
    _close(torch.cat(outs, 1), y, tol)
    return y


# ----------------------------------------------------------------------------------------------
# hashes
# ----------------------------------------------------------------------------------------------
def test_shipped_layouts_and_legacy_files_keep_their_hash():
    for path, want in HASHES.items():
        assert config_hash(hs.load_config(os.path.join(ROOT, path))) == want, path


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_new_keys_hash_only_away_from_their_default(kind):
    cls = KINDS[kind]
    base = {"d_state": 4} if kind == "mamba" else {}
    plain = cls.from_mapping(base, d_model=32).canonical(32)
    for key, default in cls.hash_optional.items():
        at_default = cls.from_mapping({**base, key: default}, d_model=32).canonical(32)
        assert at_default == plain and key not in plain, (kind, key)
    others = {"inner_norms": "rms", "inner_norm_eps": 1e-5, "qk_norm_eps": 1e-5, "clip_qkv": 2.0,
              "rope_scaling": {"type": "linear", "factor": 2.0}, "partial_rotary": 0.5, "softmax_scale": 0.1,
              "shared_expert_gate": True, "routed_scale": 2.0}
    for key in cls.hash_optional:
        extra = {"shared_experts": 1} if key == "shared_expert_gate" else {}
        changed = cls.from_mapping({**base, **extra, key: others[key]}, d_model=32).canonical(32)
        assert changed[key] is not None and changed != plain, (kind, key)


def test_model_multipliers_hash_only_away_from_one():
    base = {"model": {"d_model": 16, "vocab_size": 37}, "blocks": {"F": {"kind": "mlp"}}, "layout": "F"}
    h = config_hash(hs.load_config(base))
    for key in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
        at_one = {**base, "model": {**base["model"], key: 1.0}}
        assert config_hash(hs.load_config(at_one)) == h
        other = {**base, "model": {**base["model"], key: 2.0}}
        assert config_hash(hs.load_config(other)) != h


def test_qk_norm_booleans_keep_their_meaning_and_hash():
    spec = KINDS["attention"]
    on = spec.from_mapping({"qk_norm": True}, d_model=32)
    off = spec.from_mapping({"qk_norm": False}, d_model=32)
    assert on.qk_norm == "per_head" and off.qk_norm is None
    assert on.canonical(32)["qk_norm"] is True and off.canonical(32)["qk_norm"] is False
    assert spec.from_mapping({"qk_norm": "per_head"}, d_model=32).canonical(32) == on.canonical(32)
    assert spec.from_mapping({"qk_norm": "full"}, d_model=32).canonical(32)["qk_norm"] == "full"
    with pytest.raises(ConfigError, match="qk_norm"):
        spec.from_mapping({"qk_norm": "per_token"}, d_model=32, key="blocks.A")


@pytest.mark.parametrize("rs,match", [
    ({"type": "ntk", "factor": 2.0}, "rope_scaling.type"),
    ({"type": "llama3", "factor": 8.0}, "low_freq_factor"),
    ({"type": "linear", "factor": -1.0}, "rope_scaling.factor"),
    ({"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8, "beta": 3}, "rope_scaling.beta"),
])
def test_rope_scaling_is_checked(rs, match):
    with pytest.raises(ConfigError, match=match):
        KINDS["attention"].from_mapping({"rope_scaling": rs}, d_model=32, key="blocks.A")


def test_option_checks():
    with pytest.raises(ConfigError, match="shared_expert_gate"):
        KINDS["moe"].from_mapping({"shared_expert_gate": True}, d_model=32, key="blocks.E")
    with pytest.raises(ConfigError, match="partial_rotary"):
        KINDS["attention"].from_mapping({"n_heads": 4, "partial_rotary": 0.4}, d_model=32, key="blocks.A")
    with pytest.raises(ConfigError, match="inner_norms"):
        KINDS["mamba"].from_mapping({"inner_norms": "layer"}, d_model=32, key="blocks.M")


# ----------------------------------------------------------------------------------------------
# mamba inner_norms
# ----------------------------------------------------------------------------------------------
def _naive_mamba(blk, x):
    """Sequential float64 reference with the inner norms placed as Jamba and FalconMamba place
    them: on dt_in (before dt_proj), B and C."""
    f64 = lambda t: t.double()  # noqa: E731
    di, r, n, w = blk.d_inner, blk.dt_rank, blk.d_state, blk.d_conv
    b, L, _ = x.shape
    xz = F.linear(x.double(), f64(blk.in_proj.weight), None if blk.in_proj.bias is None else f64(blk.in_proj.bias))
    xs, z = xz[..., :di], xz[..., di:]
    pad = F.pad(xs.transpose(1, 2), (w - 1, 0))
    xc = F.silu(F.conv1d(pad, f64(blk.conv_weight).unsqueeze(1), f64(blk.conv_bias), groups=di).transpose(1, 2))
    dt_in, B, C = F.linear(xc, f64(blk.x_proj.weight)).split([r, n, n], -1)

    def rms(t, weight):
        y = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + blk.inner_eps)
        return y if weight is None else y * f64(weight)

    if blk.inner_norms == "rms":
        dt_in, B, C = rms(dt_in, blk.dt_norm.weight), rms(B, blk.b_norm.weight), rms(C, blk.c_norm.weight)
    else:
        dt_in, B, C = rms(dt_in, None), rms(B, None), rms(C, None)
    dt = F.softplus(F.linear(dt_in, f64(blk.dt_proj.weight), f64(blk.dt_proj.bias)))
    A = -torch.exp(f64(blk.A_log))
    h = xc.new_zeros(b, di, n)
    ys = []
    for t in range(L):
        h = torch.exp(dt[:, t, :, None] * A) * h + dt[:, t, :, None] * B[:, t, None, :] * xc[:, t, :, None]
        ys.append((h * C[:, t, None, :]).sum(-1) + f64(blk.D) * xc[:, t])
    return F.linear(torch.stack(ys, 1) * F.silu(z), f64(blk.out_proj.weight))


@pytest.mark.parametrize("inner", ["rms", "rms_weightless"])
def test_mamba_inner_norms_match_reference_and_steps(inner):
    blk = build_block("mamba", 16, {"d_state": 4, "dt_rank": 3, "inner_norms": inner, "inner_norm_eps": 1e-5,
                                    "impl": "torch"}).eval()
    _perturb(blk)
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        y = _steps_equal_forward(blk, x)
        _close(y.double(), _naive_mamba(blk, x), 1e-5)
    if inner == "rms":
        assert {"dt_norm.weight", "b_norm.weight", "c_norm.weight"} <= set(blk.state_dict())


@pytest.mark.parametrize("inner", ["rms", "rms_weightless"])
def test_mamba_inner_norms_on_triton_kernels(inner):
    """Forward (with gradients), and prefill + steps through the Triton kernels (interpreted
    without CUDA) equal the torch path."""
    if not _triton_runs():
        pytest.skip("Triton cannot run here")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    blk = build_block("mamba", 8, {"d_state": 4, "inner_norms": inner, "impl": "torch"}).to(dev)
    _perturb(blk)
    x = torch.randn(2, 6, 8, device=dev, requires_grad=True)
    y = blk(x)
    g = torch.autograd.grad(y.sum(), [x, blk.in_proj.weight])
    blk.impl = "triton"
    assert not blk._fused(x)  # the conv + projection fusion is left out with inner norms
    y2 = blk(x)
    g2 = torch.autograd.grad(y2.sum(), [x, blk.in_proj.weight])
    _close(y2, y, 1e-5)
    for a, b in zip(g2, g):
        _close(a, b, 1e-5)
    with torch.no_grad():
        _steps_equal_forward(blk, x.detach())


# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------
ATTN_CASES = {
    "full+clip+qkv": {"n_heads": 4, "n_kv_heads": 2, "qk_norm": "full", "qk_norm_eps": 1e-5, "clip_qkv": 0.6,
                      "bias": "qkv"},
    "per_head+scale": {"n_heads": 4, "n_kv_heads": 1, "qk_norm": "per_head", "softmax_scale": 0.3},
    "llama3": {"n_heads": 2, "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8}},
    "yarn+partial": {"n_heads": 2, "head_dim": 12, "partial_rotary": 0.5,
                     "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}},
    "linear+window": {"n_heads": 2, "window": 4, "rope_scaling": {"type": "linear", "factor": 2.0}},
}


def _naive_attention(blk, x):
    """Plain reference of the module docstring's order: projections, full norm, clip, per-head
    norm, RoPE (through the block's own tables), scaled causal softmax, o_proj."""
    from hybridseq.blocks.attention.rope import apply_rope, rope_tables

    b, L, _ = x.shape
    q, k, v = blk.q_proj(x), blk.k_proj(x), blk.v_proj(x)

    def rms(t, w, eps):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w

    eps = blk.spec.qk_norm_eps
    if blk.qk_norm == "full":
        q, k = rms(q, blk.q_norm.weight, eps), rms(k, blk.k_norm.weight, eps)
    if blk.clip_qkv:
        c = blk.clip_qkv
        q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
    H, hkv, hd = blk.n_heads, blk.n_kv_heads, blk.head_dim
    q, k, v = q.view(b, L, H, hd), k.view(b, L, hkv, hd), v.view(b, L, hkv, hd)
    if blk.qk_norm == "per_head":
        q, k = rms(q, blk.q_norm.weight, eps), rms(k, blk.k_norm.weight, eps)
    if blk.rope_theta is not None:
        cos, sin = rope_tables(torch.arange(L), blk.rope_dim, blk.rope_theta, blk.rope_scaling)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = k.repeat_interleave(H // hkv, 2), v.repeat_interleave(H // hkv, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * (blk.scale if blk.scale is not None else hd ** -0.5)
    i = torch.arange(L)
    mask = i[None, :] <= i[:, None]
    if blk.window:
        mask &= i[:, None] - i[None, :] < blk.window
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    o = torch.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, L, H * hd)
    return blk.o_proj(o)


@pytest.mark.parametrize("impl", ["torch", "sdpa", "flex"])
@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_attention_options_every_backend(case, impl):
    blk = build_block("attention", 24, {**ATTN_CASES[case], "impl": impl}).eval()
    _perturb(blk)
    x = torch.randn(2, 10, 24)
    with torch.no_grad():
        y = _steps_equal_forward(blk, x, prefill=4)
        _close(y, _naive_attention(blk, x), 1e-5)
    if case == "full+clip+qkv":
        assert blk.o_proj.bias is None and blk.q_proj.bias is not None
        assert blk.q_norm.weight.shape == (4 * 6,) and blk.k_norm.weight.shape == (2 * 6,)


def test_partial_rope_leaves_the_other_channels():
    from hybridseq.blocks.attention.rope import apply_rope, rope_tables

    x = torch.randn(1, 5, 2, 8)
    cos, sin = rope_tables(torch.arange(5), 4, 10000.0)
    y = apply_rope(x, cos, sin)
    assert torch.equal(y[..., 4:], x[..., 4:])
    full_cos, full_sin = rope_tables(torch.arange(5), 4, 10000.0)
    _close(y[..., :4], apply_rope(x[..., :4], full_cos, full_sin), 1e-7)


def test_rope_scaling_frequencies():
    """linear divides every frequency; llama3 keeps the high ones and divides the low ones;
    yarn's attention factor is 0.1 ln(factor) + 1."""
    from hybridseq.blocks.attention.rope import inv_freq_and_factor

    base, _ = inv_freq_and_factor(16, 10000.0)
    lin, f = inv_freq_and_factor(16, 10000.0, {"type": "linear", "factor": 4.0})
    _close(lin, base / 4, 1e-12)
    assert f == 1.0
    l3, _ = inv_freq_and_factor(16, 10000.0, {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    wavelen = 2 * math.pi / base
    assert torch.equal(l3[wavelen < 16], base[wavelen < 16])
    _close(l3[wavelen > 64], base[wavelen > 64] / 8, 1e-12)
    _, att = inv_freq_and_factor(16, 10000.0, {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8})
    assert att == pytest.approx(0.1 * math.log(4.0) + 1)


# ----------------------------------------------------------------------------------------------
# moe
# ----------------------------------------------------------------------------------------------
MOE_CASES = {
    "gated-shared": {"n_experts": 4, "top_k": 2, "d_ff": 12, "shared_experts": 1, "shared_d_ff": 8,
                     "shared_expert_gate": True, "routed_scale": 1.7, "renormalize": False},
    "relu2-sigmoid": {"n_experts": 4, "top_k": 2, "d_ff": 12, "activation": "relu2", "router": "sigmoid",
                      "shared_experts": 1, "routed_scale": 2.5},
}


def _naive_moe(blk, x):
    xf = x.reshape(-1, x.shape[-1])
    r = blk.router(xf)
    out = torch.zeros_like(xf)
    for n in range(xf.shape[0]):
        for j in range(blk.top_k):
            e = int(r.indices[n, j])
            h = xf[n] @ blk.w_in[e]
            h = F.silu(h[:blk.d_ff]) * h[blk.d_ff:] if blk.activation == "swiglu" else F.relu(h).square()
            out[n] += r.weights[n, j] * blk.routed_scale * (h @ blk.w_out[e])
    h = xf @ blk.shared_w_in
    h = F.silu(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1] if blk.activation == "swiglu" else F.relu(h).square()
    shared = h @ blk.shared_w_out
    if blk.shared_gate is not None:
        shared = torch.sigmoid(xf @ blk.shared_gate.weight.t()) * shared
    return (out + shared).view_as(x)


@pytest.mark.parametrize("impl", ["loop", "grouped"])
@pytest.mark.parametrize("case", list(MOE_CASES))
def test_moe_options_every_backend(case, impl):
    blk = build_block("moe", 16, {**MOE_CASES[case], "impl": impl}).eval()
    _perturb(blk)
    if blk.router.kind == "sigmoid":
        blk.router.expert_bias.copy_(torch.randn(4) * 0.1)
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        y = blk(x)
        _close(y, _naive_moe(blk, x), 1e-5)
        _close(blk.step(x[:, :1], None, torch.tensor(0)), y[:, :1], 1e-6)
    if case == "gated-shared":
        assert tuple(blk.shared_gate.weight.shape) == (1, 16)
    x.requires_grad_(True)
    blk.train()
    blk(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------------------------
# the model's multipliers
# ----------------------------------------------------------------------------------------------
def test_model_multipliers():
    blocks = {"A": {"kind": "attention", "n_heads": 2}, "F": {"kind": "mlp", "d_ff": 24}}
    base = {"model": {"d_model": 16, "vocab_size": 37, "tie_embeddings": False}, "blocks": blocks, "layout": "A F"}
    plain = hs.build_model(base).eval()
    scaled_cfg = {**base, "model": {**base["model"], "embedding_multiplier": 3.0, "residual_multiplier": 0.5,
                                    "logits_scaling": 4.0}}
    scaled = hs.build_model(scaled_cfg).eval()
    scaled.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 37, (2, 8))
    with torch.no_grad():
        h = plain.embed(ids) * 3.0
        for layer in plain.layers:
            h = h + 0.5 * layer.block(layer.norm(h))
        want = plain.lm_head(plain.norm_f(h)) / 4.0
        got = scaled(ids).logits
        _close(got, want, 1e-6)
        cache = scaled.new_cache(2, 8)
        steps = [scaled(ids[:, :3], cache=cache).logits] + [scaled(ids[:, t:t + 1], cache=cache).logits
                                                             for t in range(3, 8)]
        _close(torch.cat(steps, 1), got, 1e-5)
