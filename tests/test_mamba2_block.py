"""The Mamba-2 block (kind ``mamba2``): against a naive step-by-step float64 implementation written
from its parameters; prefill + one-token steps equal the full forward; packed documents equal
their documents run alone; the Triton path (interpreter on CPU) equals the torch path, forward
and gradients; fp32 parameters; closed forms; the config checks."""
import os

import pytest
import torch
import torch.nn.functional as F

import hybridseq as hs
from hybridseq.blocks import build_block
from hybridseq.blocks.mamba2 import Mamba2Block, Mamba2Spec
from hybridseq.errors import ConfigError

D = 16
SPECS = [
    {"d_state": 8, "headdim": 8, "chunk_size": 16},
    {"d_state": 6, "headdim": 4, "ngroups": 2, "chunk_size": 16, "D_has_hdim": True, "bias": True},
    {"d_state": 5, "headdim": 8, "rmsnorm": False, "conv_bias": False, "dt_limit": [0.01, 0.5],
     "d_conv": 3, "chunk_size": 16},
]


def naive_mamba2(blk: Mamba2Block, u: torch.Tensor, seq_idx=None) -> torch.Tensor:
    """The block written out token by token in float64: conv, per-head recurrence, gated norm."""
    f = lambda t: None if t is None else t.double()  # noqa: E731
    b, l, _ = u.shape
    s = blk.spec
    di, h, p, g, n = blk.d_inner, blk.nheads, blk.headdim, blk.ngroups, blk.d_state
    zxbcdt = F.linear(f(u), f(blk.in_proj.weight), f(blk.in_proj.bias))
    z, xBC, dt = zxbcdt.split([di, blk.conv_dim, h], -1)
    w = f(blk.conv_weight)
    conv = torch.zeros_like(xBC)
    for t in range(l):
        acc = torch.zeros(b, blk.conv_dim, dtype=torch.float64)
        for k in range(s.d_conv):
            src = t - (s.d_conv - 1) + k
            if src < 0:
                continue
            same = torch.ones(b, 1, dtype=torch.float64) if seq_idx is None else \
                (seq_idx[:, src] == seq_idx[:, t]).double()[:, None]
            acc = acc + w[:, k] * xBC[:, src] * same
        if blk.conv_bias is not None:
            acc = acc + f(blk.conv_bias)
        conv[:, t] = F.silu(acc)
    x, B, C = conv.split([di, g * n, g * n], -1)
    x, B, C = x.view(b, l, h, p), B.view(b, l, g, n), C.view(b, l, g, n)
    dt = F.softplus(dt + f(blk.dt_bias))
    if s.dt_limit is not None:
        dt = dt.clamp(s.dt_limit[0], s.dt_limit[1])
    A = -torch.exp(f(blk.A_log))
    Dv = f(blk.D).view(h, p) if s.D_has_hdim else f(blk.D)[:, None]
    state = torch.zeros(b, h, p, n, dtype=torch.float64)
    y = torch.zeros(b, l, h, p, dtype=torch.float64)
    grp = torch.arange(h) // (h // g)
    for t in range(l):
        if seq_idx is not None and t > 0:
            state = state * (seq_idx[:, t] == seq_idx[:, t - 1]).double()[:, None, None, None]
        decay = torch.exp(dt[:, t] * A)  # (b, h)
        Bt, Ct = B[:, t][:, grp], C[:, t][:, grp]  # (b, h, n)
        state = decay[..., None, None] * state + (dt[:, t][..., None, None] * x[:, t][..., None]) * Bt[:, :, None, :]
        y[:, t] = (state * Ct[:, :, None, :]).sum(-1) + Dv * x[:, t]
    y = y.reshape(b, l, di)
    if s.rmsnorm:
        yz = (y * F.silu(z)).view(b, l, g, di // g)
        yz = yz * torch.rsqrt(yz.pow(2).mean(-1, keepdim=True) + s.norm_eps)
        y = yz.view(b, l, di) * f(blk.norm_weight)
    else:
        y = y * F.silu(z)
    return F.linear(y, f(blk.out_proj.weight), f(blk.out_proj.bias))


def _block(spec, impl="torch"):
    torch.manual_seed(0)
    blk = build_block("mamba2", D, {**spec, "impl": impl})
    with torch.no_grad():  # away from the init's special values, so every term matters
        for prm in blk.parameters():
            prm.add_(0.1 * torch.randn_like(prm))
    return blk


@pytest.mark.parametrize("spec", SPECS)
def test_block_equals_naive_recurrence(spec):
    blk = _block(spec).double()
    u = torch.randn(2, 21, D, dtype=torch.float64)
    # A_log, D and dt_bias stay float32 in every precision (so -exp(A_log) is a float32 value):
    # agreement to float32 rounding of those terms, not float64's
    tol = dict(atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(blk(u), naive_mamba2(blk, u), **tol)
    seq_idx = torch.tensor([[0] * 4 + [1] + [2] * 16, [0] * 16 + [1] * 5])
    doc = blk(u, doc_ids=seq_idx)
    torch.testing.assert_close(doc, naive_mamba2(blk, u, seq_idx), **tol)
    assert (doc - blk(u)).abs().max() > 1e-3  # the documents do change the result


@pytest.mark.parametrize("spec", SPECS)
def test_prefill_and_steps_equal_full_forward(spec):
    blk = _block(spec).double()
    u = torch.randn(2, 19, D, dtype=torch.float64)
    full = blk(u)
    st = blk.new_state(2, 19, dtype=torch.float64)
    with torch.no_grad():
        outs = [blk(u[:, :7], st, 0), blk(u[:, 7:11], st, 7)]
        outs += [blk.step(u[:, t:t + 1], st, torch.tensor(t)) for t in range(11, 19)]
    # the decode state is float32 (as in every precision): rounding of the state only
    torch.testing.assert_close(torch.cat(outs, 1), full.detach(), atol=1e-6, rtol=1e-6)


def test_packed_documents_equal_documents_alone_in_a_model():
    cfg = {"name": "t", "model": {"d_model": D, "vocab_size": 40},
           "blocks": {"M": {"kind": "mamba2", "d_state": 8, "headdim": 8, "chunk_size": 16, "impl": "torch"},
                      "A": {"kind": "attention", "n_heads": 2}},
           "layout": "M A M"}
    torch.manual_seed(0)
    model = hs.build_model(hs.load_config(cfg)).double()
    lens = [1, 6, 16, 3]
    ids = torch.randint(0, 40, (1, sum(lens)))
    doc = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))[None]
    out = model(ids, doc_ids=doc).logits
    loss = out.sum()
    loss.backward()
    s = 0
    for n in lens:
        torch.testing.assert_close(out[:, s:s + n], model(ids[:, s:s + n]).logits, atol=1e-9, rtol=1e-9)
        s += n


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton cannot run here")
@pytest.mark.parametrize("spec", SPECS[:2])
def test_triton_path_equals_torch_path(spec):
    pytest.importorskip("triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ref = _block(spec, "torch").to(dev)
    tri = _block(spec, "triton").to(dev)
    tri.load_state_dict(ref.state_dict())
    u = torch.randn(2, 20, D, device=dev, requires_grad=True)
    doc = torch.tensor([[0] * 9 + [1] * 11, [0] * 20], device=dev)
    outs = []
    for blk in (ref, tri):
        y = blk(u, doc_ids=doc)
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, D, device=dev)).sum(),
                                    [u, *blk.parameters()])
        outs.append((y, grads))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=2e-4, rtol=2e-4)
    for a, b in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(a, b, atol=5e-4, rtol=5e-4)


def test_fp32_parameters_and_no_weight_decay():
    blk = _block(SPECS[0]).bfloat16()
    for name in ("A_log", "D", "dt_bias"):
        prm = getattr(blk, name)
        assert prm.dtype == torch.float32 and prm._no_weight_decay, name
    assert blk.in_proj.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("spec", SPECS)
def test_closed_forms_match_the_module(spec):
    blk = _block(spec)
    s = blk.spec
    assert s.param_count(D) == (sum(p.numel() for p in blk.parameters()),) * 2
    st = blk.new_state(3, 10, dtype=torch.bfloat16)
    assert sum(t.numel() * t.element_size() for t in st.values()) == 3 * s.state_bytes(D, 10, 2)


@pytest.mark.parametrize("bad,key,hint", [
    ({"headdim": 24}, "blocks.M.headdim", "headdim values that divide it: "),
    ({"headdim": 8, "ngroups": 3}, "blocks.M.ngroups", "ngroups values that divide it: "),
    ({"dt_limit": [0.5, 0.1]}, "blocks.M.dt_limit", "0 <= lo < hi"),
    ({"A_init_range": [0, 16]}, "blocks.M.A_init_range", "0 < lo <= hi"),
    ({"chunk_size": 48}, "blocks.M.chunk_size", "power of two"),
    ({"d_state": 0}, "blocks.M.d_state", "1 <= d_state <= 256"),
])
def test_config_checks_name_the_key(bad, key, hint):
    cfg = {"model": {"d_model": 32}, "blocks": {"M": {"kind": "mamba2", **bad}}, "layout": "M"}
    with pytest.raises(ConfigError) as e:
        hs.load_config(cfg)
    assert e.value.key == key and hint in str(e.value), str(e.value)


def test_megatron_M_can_be_mamba2_and_spec_defaults_match_mamba_ssm():
    cfg = hs.load_config({"model": {"d_model": 32}, "blocks": {"M": {"kind": "mamba2", "headdim": 16}},
                          "layout": {"megatron": "M-M*"}})
    assert [s.kind for _, s in cfg.layers()] == ["mamba2", "mlp", "mamba2", "attention"]
    s = Mamba2Spec()
    assert (s.d_state, s.d_conv, s.expand, s.headdim, s.ngroups, s.chunk_size) == (128, 4, 2, 64, 1, 256)
    assert (s.dt_min, s.dt_max, s.dt_init_floor, s.A_init_range, s.rmsnorm) == (0.001, 0.1, 1e-4, [1.0, 16.0], True)
