"""torch.compile of whole models: every shipped layout traces its forward and backward with
``fullgraph=True`` (no graph break) and gives the uncompiled model's loss, logits and gradients;
with the Triton kernels (Triton's interpreter on CPU) the compiled graph holds them as the
``hybridseq::`` custom ops; the engine's ``train.compile`` path trains. Backend ``aot_eager``
(AOTAutograd traces the backward through the ops' registered autograd) keeps CPU time down;
one inductor run is marked slow."""
from __future__ import annotations

import glob
import os

import pytest
import torch

import hybridseq as hs
from hybridseq.train.trainer import lm_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = sorted(glob.glob(os.path.join(ROOT, "layouts", "*.yaml")))
SSM_KINDS = ("mamba", "mamba2")


def build(cfg_source, overrides=(), triton=False, seed=0):
    """A training-mode model; ``triton``: the Mamba blocks' ``impl`` and the MoE blocks' kernels
    on Triton (the interpreter on CPU)."""
    cfg = hs.load_config(cfg_source, overrides=list(overrides))
    if triton:
        extra = [f"blocks.{s}.impl=triton" for s, spec in cfg.blocks.items()
                 if spec.kind in SSM_KINDS]
        cfg = hs.load_config(cfg_source, overrides=list(overrides) + extra)
    torch.manual_seed(seed)
    model = hs.build_model(cfg).train()
    if triton:
        from hybridseq.blocks.moe.block import MoEKernels

        for layer in model.layers:
            blk = layer.block
            if hasattr(blk, "router"):  # the MoE blocks
                blk.kernels = MoEKernels(permute="triton", act="triton",
                                         router_logits="triton", router_topk="triton")
                blk.router.logits_impl = blk.router.topk_impl = "triton"
    return model


def step(fn, model, x, y):
    """(loss, logits, {name: grad}) of one forward+backward of ``fn`` (the model or its
    compiled form)."""
    model.zero_grad(set_to_none=True)
    out = fn(x)
    loss = lm_loss(out.logits, y) + out.aux_loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), out.logits.detach(), grads


class Recorder:
    """A torch.compile backend that records the graphs' call targets and runs them through
    aot_eager."""

    def __init__(self, aot=True):
        self.targets: list[str] = []
        self.graphs = 0
        self.aot = aot

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.debugging import aot_eager

        self.graphs += 1
        self.targets += [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        return aot_eager(gm, example_inputs) if self.aot else gm.forward


def compare(model, batch=2, seq=16, rtol=1e-5, atol=1e-6, aot=True):
    """Compile ``model`` with fullgraph=True and check one step against eager; returns the
    recorder. ``aot``: AOTAutograd traces the backward too (else dynamo's graph runs eagerly and
    autograd differentiates it)."""
    torch._dynamo.reset()
    rec = Recorder(aot)
    compiled = torch.compile(model, fullgraph=True, backend=rec)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, model.vocab_size_unpadded, (batch, seq), generator=g)
    y = torch.randint(0, model.vocab_size_unpadded, (batch, seq), generator=g)
    want = step(model, model, x, y)
    got = step(compiled, model, x, y)
    assert rec.graphs == 1  # one graph: no break (fullgraph would have raised), no recompile
    torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(got[1], want[1], rtol=rtol, atol=atol)
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=rtol, atol=atol, msg=name)
    return rec


def _name(path):
    return os.path.basename(path)[:-5]


@pytest.mark.parametrize("path", PRESETS, ids=_name)
def test_every_preset_compiles_fullgraph(path):
    """The default kernels (the PyTorch paths on CPU), each shipped layout at its own size:
    dynamo traces the whole forward as one graph (its backward differentiated by autograd)."""
    compare(build(path), aot=False)


AOT_FAST = ("mamba2", "samba")  # the chunked SSD; sliding-window attention + Mamba + MLP


@pytest.mark.parametrize("path", [p for p in PRESETS if _name(p) in AOT_FAST], ids=_name)
def test_preset_forward_and_backward_trace(path):
    """AOTAutograd traces the backward as well (the compiled graph holds both)."""
    compare(build(path))


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in PRESETS if _name(p) not in AOT_FAST], ids=_name)
def test_preset_forward_and_backward_trace_all(path):
    compare(build(path))


# ---------------------------------------------------------------- the Triton kernels (custom ops)

MIXED = {
    "model": {"d_model": 16, "vocab_size": 23},
    "blocks": {
        "M": {"kind": "mamba", "d_state": 4},
        "S": {"kind": "mamba2", "d_state": 8, "headdim": 8, "ngroups": 2, "chunk_size": 16},
        "A": {"kind": "attention", "n_heads": 2, "n_kv_heads": 1},
        "E": {"kind": "moe", "n_experts": 4, "top_k": 2, "d_ff": 16, "shared_experts": 1},
        "F": {"kind": "mlp", "d_ff": 32},
    },
    "layout": "M E S A F",
}


def test_triton_kernels_trace_as_custom_ops():
    """Every kind in one small model with the Triton kernels: one graph, the kernels as
    hybridseq:: custom ops (forward and, through AOTAutograd, backward), the eager result."""
    rec = compare(build(MIXED, triton=True), batch=1, seq=12)
    ops = {t.split(".")[1] for t in rec.targets if t.startswith("hybridseq.")}
    # (on CPU the blocks sort the experts and run SwiGLU on torch: their ops are checked below)
    assert {"causal_conv1d_fwd", "selective_scan_fwd", "ssd_scan_fwd", "rmsnorm_gated_fwd",
            "router_logits_fwd", "softmax_topk_fwd", "moe_permute", "moe_unpermute"} <= ops, \
        sorted(ops)


def test_other_triton_ops_trace_as_custom_ops():
    """The ops a CPU model does not reach with the Triton kernels (SwiGLU, the expert sort, the
    fused norm and loss) and the decoding steps, compiled with fullgraph=True: custom ops in
    the graph, the eager results and gradients."""
    import hybridseq.kernels as K
    from hybridseq.kernels.activations import silu_mul, swiglu
    from hybridseq.kernels.moe.permute import sort_by_expert

    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731

    def train_fn(h, a, b, x, res, w, emb, labels, idx):
        order, counts, inv = sort_by_expert(idx, 4, impl="triton")
        y = swiglu(h, "triton") + silu_mul(a, b, "triton")
        normed, res2 = K.add_rmsnorm(x, res, w, impl="triton")
        loss = K.linear_cross_entropy(normed, emb, labels, chunk_size=3, impl="triton")
        return (y * y).sum() + res2.sum() + loss + (order * counts[0] + inv).sum()

    def decode_fn(q, kc, vc, pos, st, xs, dts, A1, Bs, Cs, cs, xc, wc, s2, x2, dt2, A2, B2, C2):
        o = K.decode_attention(q, kc, vc, pos, impl="triton")
        y1, h1 = K.selective_state_update(st, xs, dts, A1, Bs, Cs, dt_softplus=True,
                                          impl="triton")
        y2, cs2 = K.causal_conv1d_update(xc, cs, wc, activation="silu", impl="triton")
        s2 = s2.clone()
        y3 = K.ssd_state_update(s2, x2, dt2, A2, B2, C2, dt_softplus=True, impl="triton")
        return o, y1, h1, y2, cs2, y3, s2

    train_args = [r(5, 12), r(5, 6), r(5, 6), r(5, 8), r(5, 8), r(8), r(11, 8),
                  torch.randint(0, 11, (5,), generator=g), torch.randint(0, 4, (5, 2), generator=g)]
    decode_args = [r(2, 4, 8), r(2, 2, 6, 8), r(2, 2, 6, 8), torch.tensor(3),
                   r(2, 6, 4), r(2, 6), r(2, 6), -torch.rand(6, 4, generator=g), r(2, 4), r(2, 4),
                   r(2, 3, 6), r(2, 6), r(6, 4),
                   r(2, 2, 4, 4), r(2, 2, 4), r(2, 2), -torch.rand(2, generator=g), r(2, 1, 4),
                   r(2, 1, 4)]
    for fn, args, grad in ((train_fn, train_args, True), (decode_fn, decode_args, False)):
        torch._dynamo.reset()
        rec = Recorder()
        compiled = torch.compile(fn, fullgraph=True, backend=rec)
        results = []
        for f in (fn, compiled):
            a = [t.clone().requires_grad_(grad and t.is_floating_point()) for t in args]
            out = f(*a)
            if grad:
                diff = [t for t in a if t.requires_grad]
                out = (out, *torch.autograd.grad(out, diff))
            results.append(out)
        ops = {t.split(".")[1] for t in rec.targets if t.startswith("hybridseq.")}
        want = ({"moe_sort_by_bin", "swiglu_fwd", "silu_mul_fwd", "add_rmsnorm_fwd",
                 "linear_cross_entropy_fwd"} if grad else
                {"decode_attention", "selective_state_update", "causal_conv1d_update",
                 "ssd_state_update"})
        assert want <= ops, sorted(ops)
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


TRITON_PRESETS = [p for p in PRESETS
                  if any(spec.kind in SSM_KINDS + ("moe",)
                         for spec in hs.load_config(p).blocks.values())]


@pytest.mark.slow
@pytest.mark.parametrize("path", TRITON_PRESETS, ids=_name)
def test_every_preset_compiles_fullgraph_with_triton(path):
    """Each shipped layout with the Triton kernels, in the interpreter (slow: up to a minute
    or two each)."""
    compare(build(path, triton=True), batch=1, seq=8)


# ---------------------------------------------------------------------- the engine's compile path

def _engine(path, compile_):
    from hybridseq.train.engine import LocalEngine

    cfg = hs.load_config(path, overrides=[f"train.compile={str(compile_).lower()}"])
    torch.manual_seed(0)
    model = hs.build_model(cfg).train()
    return LocalEngine(model, cfg.train.to_dict(), cfg=model.cfg, device="cpu")


def _train(engine, steps=2):
    g = torch.Generator().manual_seed(3)
    losses = []
    vocab = engine.model.vocab_size_unpadded
    for _ in range(steps):
        x = torch.randint(0, vocab, (2, 16), generator=g)
        y = torch.randint(0, vocab, (2, 16), generator=g)
        out = engine.forward(x)
        loss = lm_loss(out.logits, y) + out.aux_loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return losses


def test_engine_train_compile_path(monkeypatch):
    """``train.compile: true``: LocalEngine compiles the model, and training steps through it
    give the eager steps' losses (torch.compile made fullgraph on aot_eager here, so a graph
    break would fail)."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda model, **kw: real(model, fullgraph=True, backend="aot_eager"))
    path = os.path.join(ROOT, "layouts", "moe-mamba.yaml")
    torch._dynamo.reset()
    compiled = _engine(path, True)
    assert compiled._forward is not compiled.model
    got = _train(compiled)
    want = _train(_engine(path, False))
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.slow
def test_engine_train_compile_inductor():
    """The real default (inductor, C++ on CPU): a few steps of a small Mamba model train."""
    torch._dynamo.reset()
    path = os.path.join(ROOT, "layouts", "mamba.yaml")
    got = _train(_engine(path, True), steps=3)
    want = _train(_engine(path, False), steps=3)
    assert got == pytest.approx(want, rel=1e-3)
