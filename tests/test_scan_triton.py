"""Triton selective scan (kernels/selective_scan_triton*.py) against the sequential reference.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), whose
``tl.associative_scan`` costs about a millisecond per tile element: shapes stay tiny and small
block shapes (``TUNING``) make short sequences span several chunks and dim blocks.
The reference runs in float64 on float64 copies of the same inputs.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from hybridseq.kernels.selective_scan_ref import selective_scan_ref

sst = importlib.import_module("hybridseq.kernels.selective_scan_triton")
selective_scan_triton = sst.selective_scan_triton
DEV = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


@pytest.fixture
def tuning():
    """Set TUNING block shapes for one test; restore the heuristic afterwards."""
    saved = dict(sst.TUNING)

    def set_(fwd=None, bwd=None, ckpt=None):
        sst.TUNING.update(fwd=fwd, bwd=bwd, ckpt=ckpt)

    yield set_
    sst.TUNING.clear()
    sst.TUNING.update(saved)


def make(b, l, d, n, groups=None, dtype=torch.float32, z=True, D=True, bias=True, h0=True,
         device=DEV):
    """Fresh random inputs, as a dict of leaf tensors that require grad."""
    bc = (b, l, n) if groups is None else (b, l, groups, n)
    t = {
        "u": torch.randn(b, l, d, device=device).to(dtype),
        "delta": (0.5 * torch.randn(b, l, d, device=device)).to(dtype),
        "A": -(0.1 + 2 * torch.rand(d, n, device=device)),
        "B": torch.randn(*bc, device=device).to(dtype),
        "C": torch.randn(*bc, device=device).to(dtype),
        "D": torch.randn(d, device=device) if D else None,
        "z": torch.randn(b, l, d, device=device).to(dtype) if z else None,
        "delta_bias": (0.3 * torch.randn(d, device=device)) if bias else None,
        "initial_state": torch.randn(b, d, n, device=device) if h0 else None,
    }
    return {k: (v.requires_grad_() if v is not None else None) for k, v in t.items()}


def rel(x, ref):
    x, ref = x.detach().double(), ref.detach().double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def run_both(t, softplus=True, final=True, ref_fn=selective_scan_ref, loss_on=("y", "h")):
    """Forward + backward of the Triton scan and the float64 reference on the same inputs.
    Returns {name: (triton value, reference value)} for y, h_last and every gradient."""
    t64 = {k: (v.detach().double().requires_grad_() if v is not None else None)
           for k, v in t.items()}
    outs = {}
    for impl, inp in (("tri", t), ("ref", t64)):
        fn = selective_scan_triton if impl == "tri" else ref_fn
        args = [inp[k] for k in ("u", "delta", "A", "B", "C")]
        res = fn(*args, D=inp["D"], z=inp["z"], delta_bias=inp["delta_bias"],
                 delta_softplus=softplus, initial_state=inp["initial_state"],
                 return_final_state=final)
        y, h = res if final else (res, None)
        outs[impl] = (y, h)
    torch.manual_seed(1)
    gy = torch.randn(outs["ref"][0].shape, dtype=torch.float64, device=t["u"].device)
    gh = torch.randn(outs["ref"][1].shape, dtype=torch.float64, device=gy.device) if final else None
    for impl in ("tri", "ref"):
        y, h = outs[impl]
        loss = 0
        if "y" in loss_on:
            loss = loss + (y.double() * gy).sum()
        if final and "h" in loss_on:
            loss = loss + (h.double() * gh).sum()
        loss.backward()
    res = {"y": (outs["tri"][0], outs["ref"][0])}
    if final:
        res["h_last"] = (outs["tri"][1], outs["ref"][1])
    for k in NAMES:
        if t[k] is not None:
            res["d" + k] = (t[k].grad, t64[k].grad)
    return res


def check(res, tol):
    for name, (x, ref) in res.items():
        assert x is not None, f"no gradient for {name}"
        if ref is None:  # not in the reference's graph (e.g. D when the loss is on h_last only)
            assert torch.count_nonzero(x) == 0, f"{name}: expected a zero gradient"
            continue
        assert x.shape == ref.shape, f"{name}: shape {tuple(x.shape)} vs {tuple(ref.shape)}"
        assert torch.isfinite(x).all(), f"{name}: NaN/inf"
        err = rel(x, ref)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


# (b, l, d, n, groups, fwd tuning, bwd tuning, checkpoint steps): odd sizes, several chunks,
# checkpoint segments and dim blocks, forward and backward chunks of different lengths
CASES = {
    "seqlen1": (2, 1, 4, 4, None, None, None, None),
    "seqlen7_dstate3": (2, 7, 5, 3, None, (8, 4, 2, 4), (4, 2, 2, 4), None),
    "seqlen33_dstate16": (1, 33, 2, 16, None, (8, 2, 4, 4), (4, 1, 16, 4), 8),
    "dstate1_chunks": (2, 21, 6, 1, None, (2, 4, 2, 4), (4, 8, 2, 4), 8),
    "grouped": (1, 19, 8, 3, 2, (8, 4, 1, 4), (8, 2, 4, 4), 16),
    "grouped_odd_group_width": (1, 9, 6, 2, 2, (4, 4, 2, 4), (4, 4, 2, 4), None),
    "default_blocks": (1, 37, 3, 5, None, None, None, None),
    "dstate64_default_blocks": (1, 9, 2, 64, None, None, None, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_forward_and_grads(case, tuning):
    b, l, d, n, g, tf, tb, ck = CASES[case]
    tuning(tf, tb, ck)
    check(run_both(make(b, l, d, n, g)), 1e-5)


def test_options_off_no_softplus(tuning):
    """No z, D, delta_bias, initial_state; raw delta as dt; y only."""
    tuning((4, 4, 2, 4), (4, 4, 2, 4))
    t = make(2, 10, 5, 4, z=False, D=False, bias=False, h0=False)
    with torch.no_grad():
        t["delta"].abs_()  # dt > 0 without softplus
    check(run_both(t, softplus=False, final=False), 1e-5)


def test_grad_through_final_state_only(tuning):
    """Loss on h_last alone: the gradient must flow back through every step, into h0 too."""
    tuning((4, 4, 2, 4), (4, 4, 2, 4))
    check(run_both(make(1, 11, 4, 3), loss_on=("h",)), 1e-5)


def test_b_and_c_grouped_differently(tuning):
    """B shared by all channels, C in 2 groups."""
    tuning((4, 4, 2, 4), (4, 4, 2, 4))
    t = make(1, 6, 4, 2, groups=2)
    t["B"] = torch.randn(1, 6, 2, device=DEV).requires_grad_()
    check(run_both(t), 1e-5)


def test_strided_inputs(tuning):
    """B, C sliced out of one projection and u, delta transposed views: any strides work."""
    tuning((4, 4, 2, 4), (4, 2, 2, 4))
    b, l, d, n = 2, 9, 4, 3
    t = make(b, l, d, n)
    proj = torch.randn(b, l, 2 * n + 3, device=DEV)
    t["B"] = proj[..., 1:1 + n].detach().requires_grad_()
    t["C"] = proj[..., 1 + n:1 + 2 * n].detach().requires_grad_()
    t["u"] = torch.randn(b, d, l, device=DEV).transpose(1, 2).detach().requires_grad_()
    # leaf views of bigger storages: build the leaves first, then take strided views for the call
    Bbig = torch.randn(b, l, 2 * n + 3, device=DEV, requires_grad=True)
    ubig = torch.randn(b, d, l, device=DEV, requires_grad=True)
    Bv, uv = Bbig[..., 1:1 + n], ubig.transpose(1, 2)
    assert not Bv.is_contiguous() and not uv.is_contiguous()
    kw = dict(D=t["D"], z=t["z"], delta_bias=t["delta_bias"], delta_softplus=True)
    y = selective_scan_triton(uv, t["delta"], t["A"], Bv, t["C"], **kw)
    Bd, ud = Bv.detach().double().requires_grad_(), uv.detach().double().requires_grad_()
    y_ref = selective_scan_ref(ud, t["delta"].double(), t["A"].double(), Bd, t["C"].double(),
                               D=t["D"].double(), z=t["z"].double(),
                               delta_bias=t["delta_bias"].double(), delta_softplus=True)
    assert rel(y, y_ref) < 1e-5
    gy = torch.randn_like(y_ref)
    (y.double() * gy).sum().backward()
    (y_ref * gy).sum().backward()
    assert rel(Bbig.grad[..., 1:1 + n], Bd.grad) < 1e-5
    assert rel(ubig.grad.transpose(1, 2), ud.grad) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype, tuning):
    tuning((8, 4, 2, 4), (8, 4, 2, 4))
    res = run_both(make(2, 13, 4, 4, dtype=dtype))
    assert res["y"][0].dtype == dtype and res["h_last"][0].dtype == torch.float32
    assert res["du"][0].dtype == dtype and res["dB"][0].dtype == dtype
    check(res, 1e-2)


def test_no_nan_extreme_dt(tuning):
    """Huge dt (decay underflows to 0) and tiny dt (decay 1) give finite outputs and gradients."""
    tuning((4, 4, 2, 4), (4, 4, 2, 4))
    t = make(1, 9, 4, 3)
    with torch.no_grad():
        t["delta"].mul_(40.0)  # softplus(+-20): dt from ~2e-9 to ~20
    res = run_both(t)
    for name, (x, _) in res.items():
        assert torch.isfinite(x).all(), name
    check({k: res[k] for k in ("y", "h_last", "du", "dz", "dC")}, 1e-5)


def test_dispatcher_uses_triton():
    from hybridseq.kernels import selective_scan

    t = make(1, 5, 3, 2, z=False, bias=False, h0=False)
    args = [t[k].detach() for k in ("u", "delta", "A", "B", "C")]
    y = selective_scan(*args, D=t["D"].detach(), impl="triton")
    y_ref = selective_scan_ref(*[a.double() for a in args], D=t["D"].detach().double())
    assert rel(y, y_ref) < 1e-5


def test_bad_arguments_raise():
    t = make(1, 4, 3, 2, h0=False)
    with pytest.raises(ValueError, match="delta"):
        selective_scan_triton(t["u"], t["delta"][:, :2], t["A"], t["B"], t["C"])
    with pytest.raises(ValueError, match="groups"):
        selective_scan_triton(t["u"], t["delta"], t["A"], t["B"][:, :, None].expand(-1, -1, 2, -1),
                              t["C"])


# ----------------------------------------------------------------------------- GPU, real shapes
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 2048, 2048, 16, torch.bfloat16),
                                   (1, 128, 65536, 16, torch.float32)])
def test_gpu_real_shapes_poisoned(shape, monkeypatch):
    """Real sizes on the GPU, every output buffer NaN-poisoned before the kernels run; the
    reference is the chunked PyTorch path in float64 (tested against selective_scan_ref
    elsewhere), fast enough at these sizes."""
    from hybridseq.kernels.selective_scan_chunked import selective_scan_chunked

    monkeypatch.setattr(sst, "POISON_OUTPUTS", True)
    b, d, l, n, dtype = shape
    t = make(b, l, d, n, dtype=dtype, device="cuda")
    with torch.no_grad():
        t["delta_bias"].sub_(3.0)  # Mamba-like dt ~ softplus(-3)
    res = run_both(t, ref_fn=selective_scan_chunked)
    check(res, 1e-2 if dtype == torch.bfloat16 else 1e-4)


def test_bench_scan_helpers_on_tiny_cpu_shape():
    """`hybridseq bench scan` pieces: shape parsing, the fewest-bytes model, and one timed row
    per implementation (on CPU the timings mean nothing; this checks the plumbing)."""
    import argparse

    from hybridseq.bench import scan

    assert scan.parse_shape("8x2048x2048x16") == (8, 2048, 2048, 16)
    with pytest.raises(ValueError, match="BxDxLxN"):
        scan.parse_shape("8x2048")
    # forward: u, delta, z read + y written (2 bytes each), B and C read, A, D, delta_bias read
    b, d, l, n = 2, 8, 4, 3
    assert scan.fewest_bytes(b, d, l, n, torch.bfloat16) == \
        4 * b * l * d * 2 + 2 * b * l * n * 2 + d * n * 4 + 2 * d * 4
    parser = argparse.ArgumentParser()
    scan.add_arguments(parser)
    args = parser.parse_args(["--dtype", "fp32", "--iters", "1", "--warmup", "0"])
    for impl in ("triton", "torch"):
        row = scan._time_shape((1, 4, 5, 2), impl, args, DEV)
        assert row["impl"] == impl and row["fwd_ms"] > 0 and row["fwdbwd_ms"] > 0


def test_checkpoint_spacing_keeps_saved_states_small():
    """The forward saves the state every CK steps: at most 4 floats per (b, l, d) element for
    any dstate up to 256, CK a multiple of both chunk lengths."""
    for n in (1, 3, 16, 64, 256):
        fwd, bwd, ck = sst._plan(4096, 64, n, 64, 64)
        assert ck % fwd[0] == 0 and ck % bwd[0] == 0
        assert sst._next_pow2(n) / ck <= 4, (n, ck)
    # dstate 16 by default: a checkpoint at every backward chunk (no recompute pass)
    _, bwd, ck = sst._plan(4096, 64, 16, 64, 64)
    assert ck == bwd[0]
