"""The Mamba block's fused Triton path (``_ConvProjFn``: conv + x_proj + dt_proj as one autograd
node) against the plain torch path: forward and every gradient at odd sizes, partial
requires_grad, no_grad, autocast; and the backward's op budget (no slice_backward, no extra add).

Compiled Triton on CUDA, the interpreter on CPU (tiny shapes)."""
from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hybridseq import kernels
from hybridseq.blocks.mamba import block as mamba_mod
from hybridseq.blocks.mamba import MambaBlock

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(
    not kernels.triton_available() or (not CUDA and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="Triton cannot run here")


@pytest.fixture(autouse=True)
def _few_conv_tiles(monkeypatch):
    """Compiled runs: the conv autotunes over one tile per direction (fewer compiles)."""
    if CUDA:
        mod = mamba_mod._conv_triton()
        monkeypatch.setattr(mod._conv_fwd_tuned, "configs", mod.FWD_CONFIGS[:1])
        monkeypatch.setattr(mod._conv_bwd_tuned, "configs", mod.BWD_CONFIGS[:1])
        monkeypatch.setattr(mod, "_TUNED", {})


def _rel(a, b):
    """Relative error, with an absolute floor of 1e-12: a gradient that is exactly 0 in the
    reference (A_log at seqlen 1 without a state: h_{-1} = 0) comes out of the kernel as
    rounding noise (~1e-16 on an H100: a_t h_{t-1} is formed as h_t - b_t)."""
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm().clamp_min(1e-12 / 1e-5)).item()


def _pair(d_model, spec, dtype=torch.float32):
    """Two blocks with the same weights: torch path and triton path."""
    ref = MambaBlock(d_model, {**spec, "impl": "torch"}).to(DEV, dtype)
    with torch.no_grad():  # make the skip, the gate and the biases non-trivial
        ref.D.normal_()
        for m in (ref.in_proj, ref.out_proj):
            if m.bias is not None:
                m.bias.normal_()
    tri = MambaBlock(d_model, {**spec, "impl": "triton"}).to(DEV, dtype)
    tri.load_state_dict(ref.state_dict())
    return ref, tri


class _Spy:
    """Counts _ConvProjFn.forward calls (is the fused path taken?)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        orig = mamba_mod._ConvProjFn.forward

        def fwd(ctx, *a):
            self.calls += 1
            return orig(ctx, *a)

        monkeypatch.setattr(mamba_mod._ConvProjFn, "forward", staticmethod(fwd))


# (d_model, spec, batch, seqlen): seqlen 1, odd, longer than the interpreter's conv tile (32 rows)
CASES = [
    (8, {"d_state": 4}, 2, 1),
    (8, {"d_state": 4, "d_conv": 3, "bias": True}, 2, 7),
    (9, {"d_state": 5, "expand": 1, "dt_rank": 3, "conv_bias": False}, 1, 33),  # d_inner 9: odd
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_fused_path_matches_torch_path(monkeypatch, case):
    d_model, spec, b, L = CASES[case]
    spy = _Spy(monkeypatch)
    ref, tri = _pair(d_model, spec)
    x = torch.randn(b, L, d_model, device=DEV, requires_grad=True)
    g = torch.randn(b, L, d_model, device=DEV)
    outs = []
    for blk in (ref, tri):
        y = blk(x)
        params = [p for _, p in sorted(blk.named_parameters())]
        outs.append((y, torch.autograd.grad(y, [x, *params], g)))
    assert spy.calls == 1  # the triton block took the fused path, the torch block did not
    (y0, g0), (y1, g1) = outs
    assert _rel(y1, y0) < 1e-5
    names = ["x"] + [n for n, _ in sorted(tri.named_parameters())]
    for n, a, b in zip(names, g1, g0):
        assert a.dtype == b.dtype and a.shape == b.shape, n
        assert _rel(a, b) < 1e-5, n


def test_fused_path_partial_grads_and_no_grad(monkeypatch):
    """Frozen projections and an input without grad; then a no_grad forward (inference)."""
    ref, tri = _pair(8, {"d_state": 4})
    for blk in (ref, tri):
        for p in (blk.x_proj.weight, blk.dt_proj.weight, blk.conv_weight):
            p.requires_grad_(False)
    x = torch.randn(2, 9, 8, device=DEV)
    ws = lambda blk: [blk.in_proj.weight, blk.A_log, blk.conv_bias]  # noqa: E731
    g0 = torch.autograd.grad(ref(x).square().sum(), ws(ref))
    g1 = torch.autograd.grad(tri(x).square().sum(), ws(tri))
    for a, b in zip(g1, g0):
        assert _rel(a, b) < 1e-5
    spy = _Spy(monkeypatch)
    with torch.no_grad():
        y = tri(x)
    assert spy.calls == 1 and not y.requires_grad
    assert _rel(y, ref(x).detach()) < 1e-5


def test_fused_path_bf16_autocast():
    """fp32 weights under bf16 autocast: bf16 activations, fp32 gradients, close to torch."""
    ref, tri = _pair(8, {"d_state": 4})
    x = torch.randn(2, 11, 8, device=DEV, requires_grad=True)
    res = []
    for blk in (ref, tri):
        with torch.autocast(DEV, dtype=torch.bfloat16):
            y = blk(x)
        assert y.dtype == torch.bfloat16
        params = [blk.in_proj.weight, blk.conv_weight, blk.x_proj.weight, blk.dt_proj.weight,
                  blk.A_log, blk.D, blk.dt_proj.bias]
        gr = torch.autograd.grad(y.float().sum(), [x, *params])
        assert all(gp.dtype == torch.float32 for gp in gr)
        res.append((y, gr))
    assert _rel(res[1][0], res[0][0]) < 2e-2
    for a, b in zip(res[1][1], res[0][1]):
        assert _rel(a, b) < 5e-2


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((str(func), [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]))
        return out


def test_backward_makes_no_extra_pass():
    """The byte budget of the backward around the scan: d(xz) is assembled without
    slice_backward/zeros/add or a copy (the conv backward writes its half, the scan's backward
    the other), and the two
    gradients of xc meet in one addmm, not a separate add."""
    _, tri = _pair(8, {"d_state": 4})
    x = torch.randn(2, 5, 8, device=DEV, requires_grad=True)
    y = tri(x)
    mode = _Ops()
    with mode:
        torch.autograd.grad(y, [x, *tri.parameters()], torch.ones_like(y))
    names = [n for n, _ in mode.ops]
    assert not any("slice_backward" in n for n in names), names
    di = tri.d_inner
    big_adds = [s for n, s in mode.ops
                if n.split(".")[1] in ("add", "add_") and any(di in t for t in s)]
    assert big_adds == [], big_adds
    assert sum(n.startswith("aten.addmm") for n in names) >= 1
    # no copy of a (b, l, d_inner) tensor: the scan writes dz into the z half of a buffer shaped
    # like xz, which becomes d(xz) (the interpreter's own copies of kernel arguments are flat)
    assert sum(n.startswith("aten.copy_") and (2, 5, di) in s for n, s in mode.ops) == 0


def test_conv_bwd_writes_into_given_buffer(monkeypatch):
    """causal_conv1d_bwd(dx_out=...) fills a strided half of a wider buffer and leaves the other
    half alone; it equals the autograd gradient."""
    conv = mamba_mod._conv_triton()
    xz = torch.randn(2, 7, 12, device=DEV)
    x = xz[..., :6]
    w, b = torch.randn(6, 4, device=DEV), torch.randn(6, device=DEV)
    dy = torch.randn(2, 7, 6, device=DEV)
    buf = torch.full((2, 7, 12), 7.0, device=DEV)
    dx, dw, db = conv.causal_conv1d_bwd(x, w, b, dy, silu=True, dx_out=buf[..., :6])
    assert dx.data_ptr() == buf.data_ptr()
    assert torch.all(buf[..., 6:] == 7.0)
    ins = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = kernels.causal_conv1d_ref(ins[0], ins[1], ins[2], "silu")
    gr = torch.autograd.grad(ref, ins, dy.double())
    for a, r in zip((buf[..., :6], dw, db), gr):
        assert _rel(a, r) < 1e-5
    with pytest.raises(ValueError, match="dx_out"):
        conv.causal_conv1d_bwd(x, w, b, dy, silu=True, dx_out=buf[..., :5])
