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

from hybridseq.kernels.scan.ref import selective_scan_ref

sst = importlib.import_module("hybridseq.kernels.scan.triton_scan")
selective_scan_triton = sst.selective_scan_triton
DEV = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


@pytest.fixture
def tuning():
    """Set TUNING block shapes for one test; restore the heuristic afterwards."""
    saved = dict(sst.TUNING)

    def set_(fwd=None, bwd=None, ckpt=None, **more):
        """fwd / bwd / ckpt and any other TUNING key (split, carry, ...); the rest: None."""
        sst.TUNING.update({k: None for k in sst.TUNING})
        sst.TUNING.update(fwd=fwd, bwd=bwd, ckpt=ckpt, **more)

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


# Sequence split forced: (b, l, d, n, groups, fwd, bwd, bwd carry tuning, ckpt steps, S asked
# (forward, backward), carry pieces per segment M, S expected (forward, backward)). Segments are
# whole checkpoint segments, the last one ragged; the carry passes may use other chunk lengths
# than the main kernels, and their pieces may be shorter than a chunk, or empty.
SPLIT_CASES = {
    "s2_ragged_empty_pieces": (1, 11, 5, 3, None, (4, 4, 2, 4), (4, 4, 2, 4), None, None,
                               (2, 2), 3, (2, 2)),
    "s3_ckpt_recompute_grouped": (1, 19, 8, 3, 2, (8, 4, 2, 4), (4, 2, 2, 4), (8, 2, 2, 4), 8,
                                  (3, 3), 2, (3, 3)),
    "bwd_only_s3_dstate1_carry_blocks": (2, 10, 6, 1, None, (2, 4, 2, 4), (4, 8, 2, 4),
                                         (2, 2, 1, 4), None, (1, 3), 2, (1, 3)),
    "fwd_only_s3": (1, 11, 4, 2, None, (2, 4, 2, 4), (4, 4, 2, 4), None, None, (3, 1), None,
                    (3, 1)),
    "seqlen1_clamped": (2, 1, 4, 4, None, None, None, None, None, (2, 2), None, (1, 1)),
    "dstate64_default_blocks": (1, 19, 2, 64, None, None, None, None, None, (2, 2), None,
                                (2, 2)),
}


@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_split_fp32(case, tuning):
    b, l, d, n, g, tf, tb, tc, ck, (sf, sb), m, want = SPLIT_CASES[case]
    tuning(tf, tb, ck, carry=tc, split=sb, fwd_split=sf, carry_pieces=m,
           fwd_carry=(2, 2, 2, 4) if tf is not None else None)
    t = make(b, l, d, n, g)
    assert (sst.fwd_split(t["u"], t["A"], t["B"], t["C"]),
            sst.bwd_split(t["u"], t["A"], t["B"], t["C"])) == want
    check(run_both(t), 1e-5)


def test_split_backward_no_options_hlast_only(tuning):
    """Split with no z / D / delta_bias / initial state, raw dt, loss on h_last alone: the carry
    from g(h_last) must cross every segment."""
    tuning((4, 4, 2, 4), (4, 4, 2, 4), split=3, fwd_split=2)
    t = make(1, 12, 4, 2, z=False, D=False, bias=False, h0=False)
    with torch.no_grad():
        t["delta"].abs_()
    assert sst.bwd_split(t["u"], t["A"], t["B"], t["C"]) == 3
    assert sst.fwd_split(t["u"], t["A"], t["B"], t["C"]) == 2
    check(run_both(t, softplus=False, loss_on=("h",)), 1e-5)


def test_split_choice(monkeypatch, tuning):
    """The automatic S: 1 where batch x dim blocks programs fill the SMs, more for few programs
    and long sequences; HYBRIDSEQ_SCAN_BWD_SPLIT and TUNING["split"] override it. The forward
    splits by the same rule."""
    monkeypatch.setattr(sst, "_sm_count", lambda device: 132)
    monkeypatch.delenv(sst.SPLIT_ENV, raising=False)
    tuning()
    split = lambda b, d, l: sst._bwd_split(b, l, d, 16, d, d, "cuda")[0]  # noqa: E731
    assert split(8, 2048, 2048) == 1  # 1024 one-warp programs: a full wave
    assert split(2, 4096, 8192) == 2
    assert split(1, 1024, 65536) == 8
    assert split(1, 1024, 600) == 1  # too short to cut
    fsplit = lambda b, d, l: sst._split("fwd", b, l, d, 16, d, d, "cuda")[0]  # noqa: E731
    assert fsplit(8, 2048, 2048) == 1  # the forward splits the same way (measured: B2 1.47 -> 1.22 ms)
    assert fsplit(2, 4096, 8192) == 2
    u, BC = torch.empty(1, 65536, 64, device="meta"), torch.empty(1, 65536, 16, device="meta")
    assert sst.fwd_split(u, torch.empty(64, 16), BC, BC) > 1  # few programs, a long sequence
    # resident warps from the registers per thread (ptxas counts; a maxnreg cap when set)
    def warps():
        return sst._resident_warps("bwd", sst._config("bwd", 4096, 4096, 16, 4096, 4096))

    assert warps() == 8
    tuning(bwd=(2, 16, 4, 1))
    assert warps() == 12
    tuning(bwd=(4, 16, 4, 1, 224))
    assert warps() == 9
    tuning()
    monkeypatch.setenv(sst.SPLIT_ENV, "4")
    assert split(8, 2048, 2048) == 4
    tuning(split=2)  # TUNING wins over the environment
    assert split(8, 2048, 2048) == 2
    tuning()
    monkeypatch.setenv(sst.SPLIT_ENV, "four")
    with pytest.raises(ValueError, match=sst.SPLIT_ENV):
        split(8, 2048, 2048)
    monkeypatch.setattr(sst, "_sm_count", lambda device: 0)  # CPU: no split unless asked
    monkeypatch.setenv(sst.SPLIT_ENV, "auto")
    assert split(1, 64, 65536) == 1


def test_options_off_no_softplus(tuning):
    """No z, D, delta_bias, initial_state; raw delta as dt; y only; a register cap."""
    tuning((4, 4, 2, 4), (4, 4, 2, 4, 128))
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


# Compiled for sm_90 without a GPU (Triton's CUDA backend and its bundled ptxas): catches what
# the interpreter lets through, e.g. a loop-carried variable that changes type.
_COMPILE_SM90 = r"""
import inspect, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hybridseq.kernels.scan import (triton_bwd as bwd, triton_fwd as fwd,
                               triton_bwd_carry as bc,
                               triton_fwd_carry as fc)

def build(kernel, bf16_ptrs, consts, num_warps=1):
    for seq in (False, True):  # without and with packed documents (seq_idx int32)
        c = dict(consts, HAS_SEQ_IDX=seq)
        sig = {}
        for p in inspect.signature(kernel.fn).parameters:
            ptr = ("*i32" if p in ("seq_ptr", "rst_ptr") else
                   "*bf16" if p in bf16_ptrs else "*fp32")
            sig[p] = "constexpr" if p in c else (ptr if p.endswith("_ptr") else "i32")
        src = ASTSource(fn=kernel, signature=sig, constexprs=c)
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})

io = ("u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "dout_ptr", "ypre_ptr", "y_ptr", "du_ptr",
      "ddelta_ptr", "dz_ptr")
opt = dict(HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True)
build(fwd._scan_fwd_kernel, io, dict(HAS_D=True, HAS_H0=True, STORE_HLAST=True, STORE_CKPT=True,
      CK_R=1, STORE_YPRE=True, BLOCK_T=4, BLOCK_D=8, NI=4, NO=4, **opt))
build(bwd._scan_bwd_kernel, io, dict(HAS_D=True, HAS_DHLAST=True, STORE_DH0=True, BLOCK_T=4,
      BLOCK_D=16, NI=4, NO=4, CK_R=2, BC_ATOMIC=False, UNIT_LD=False, UNIT_Z=False, DZ_LIKE_Z=False,
      **opt))
build(bwd._scan_bwd_kernel, io, dict(HAS_D=True, HAS_DHLAST=True, STORE_DH0=True, BLOCK_T=4,
      BLOCK_D=16, NI=4, NO=4, CK_R=1, BC_ATOMIC=False, UNIT_LD=True, UNIT_Z=False, DZ_LIKE_Z=True,
      **opt))
build(bc._scan_bwd_carry_kernel, io, dict(BLOCK_T=4, BLOCK_D=16, NI=4, NO=4, **opt))
build(fc._scan_fwd_carry_kernel, io, dict(HAS_BIAS=True, SOFTPLUS=True, BLOCK_T=4, BLOCK_D=8,
      NI=4, NO=4))
print("compiled")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernels")
def test_kernels_compile_for_sm90():
    """Every scan kernel through Triton's real compiler (frontend, LLVM, ptxas) for an H100,
    in a subprocess without TRITON_INTERPRET; skipped where Triton has no CUDA backend."""
    import os
    import subprocess
    import sys

    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as e:  # a Triton build without the CUDA backend
        pytest.skip(f"no Triton CUDA backend: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", _COMPILE_SM90], env=env, cwd=root,
                         capture_output=True, text=True, timeout=300)
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr.lower():
        pytest.skip("Triton's bundled ptxas is missing")
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]


# ----------------------------------------------------------------------------- GPU, real shapes
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 2048, 2048, 16, torch.bfloat16, None),
                                   (8, 2048, 2048, 16, torch.bfloat16, 3),
                                   (1, 128, 65536, 16, torch.float32, None)])
def test_gpu_real_shapes_poisoned(shape, monkeypatch, tuning):
    """Real sizes on the GPU, every output buffer NaN-poisoned before the kernels run; the
    reference is the chunked PyTorch path in float64 (tested against selective_scan_ref
    elsewhere), fast enough at these sizes. The sequence splits: automatic (None; the L=65536
    backward splits on its own) or forced (forward and backward)."""
    from hybridseq.kernels.scan.chunked import selective_scan_chunked

    monkeypatch.setattr(sst, "POISON_OUTPUTS", True)
    b, d, l, n, dtype, split = shape
    tuning(split=split, fwd_split=split)
    t = make(b, l, d, n, dtype=dtype, device="cuda")
    with torch.no_grad():
        t["delta_bias"].sub_(3.0)  # Mamba-like dt ~ softplus(-3)
    res = run_both(t, ref_fn=selective_scan_chunked)
    check(res, 1e-2 if dtype == torch.bfloat16 else 1e-4)


@pytest.mark.gpu
def test_gpu_split_matches_unsplit_b2_d4096_l8192(monkeypatch, tuning):
    """B2 D4096 L8192 N16 (the low-parallelism benchmark shape), fp32 inputs, grouped C: the
    forward / backward with S = 2, 4, 8 segments (and the automatic choice) give the outputs and
    gradients of S = 1 up to float32 rounding, with every output NaN-poisoned."""
    monkeypatch.setattr(sst, "POISON_OUTPUTS", True)
    b, d, l, n = 2, 4096, 8192, 16
    t = make(b, l, d, n, device="cuda")
    t["C"] = torch.randn(b, l, 4, n, device="cuda").requires_grad_()
    with torch.no_grad():
        t["delta_bias"].sub_(3.0)
    gy = torch.randn(b, l, d, device="cuda")
    gh = torch.randn(b, d, n, device="cuda")

    def grads(fwd_split, split):
        tuning(split=split, fwd_split=fwd_split)
        for v in t.values():
            v.grad = None
        y, h = selective_scan_triton(t["u"], t["delta"], t["A"], t["B"], t["C"], D=t["D"],
                                     z=t["z"], delta_bias=t["delta_bias"], delta_softplus=True,
                                     initial_state=t["initial_state"], return_final_state=True)
        ((y * gy).sum() + (h * gh).sum()).backward()
        return {"y": y.detach(), "h_last": h.detach(), **{k: v.grad.clone() for k, v in t.items()}}

    base = grads(1, 1)
    for splits in ((1, 2), (1, 4), (1, 8), (None, None), (2, 1), (4, 4)):
        got = grads(*splits)
        for k in base:
            assert torch.isfinite(got[k]).all(), (splits, k)
            assert rel(got[k], base[k]) < 1e-5, (splits, k, rel(got[k], base[k]))


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
    assert scan.parse_splits(["auto", "1", "4"]) == [None, 1, 4]
    for bad in ("0", "two"):
        with pytest.raises(ValueError, match="--bwd-split"):
            scan.parse_splits([bad])
    with scan._tuning(split=2, fwd_split=2):  # --bwd-split / --fwd-split: the row says which ran
        row = scan._time_shape((1, 4, 5, 2), "triton", args, DEV)
        assert (row["fwd_split"], row["split"]) == (2, 2)
    # --docs: the row says how many documents it ran with; seq_idx splits each row evenly
    row = scan._time_shape((1, 4, 5, 2), "triton", args, DEV, docs=2)
    assert row["docs"] == 2 and row["fwdbwd_ms"] > 0
    assert scan.make_seq_idx(2, 5, 2, "cpu").tolist() == [[0, 0, 0, 1, 1]] * 2
    assert parser.parse_args(["--docs", "0", "4"]).docs == [0, 4]


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


def test_dz_written_into_a_buffer_shaped_like_z_base():
    """z as the strided second half of a (b, l, 2d) projection (the Mamba block's layout): dz comes
    back as the same half of a new buffer shaped like that base (so the block takes the buffer
    without a copy), with the reference's values; a contiguous z gets a contiguous dz."""
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    b, l, d, n = 2, 19, 8, 4
    f64 = dict(dtype=torch.float64, device=dev)
    xz = torch.randn(b, l, 2 * d, **f64)
    u, delta = torch.randn(b, l, d, **f64), 0.5 * torch.randn(b, l, d, **f64)
    A = -torch.rand(d, n, **f64) - 0.5
    B, C = torch.randn(b, l, n, **f64), torch.randn(b, l, n, **f64)
    gy = torch.randn(b, l, d, dtype=torch.float32, device=dev)
    from hybridseq.kernels import selective_scan

    res = {}
    for name, zsrc in (("strided", xz.float()), ("contiguous", xz[..., d:].float().contiguous())):
        zbase = zsrc.clone().requires_grad_(True)
        z = zbase[..., d:] if name == "strided" else zbase
        args = [t.float() for t in (u, delta, A, B, C)]
        y = selective_scan(*args, z=z, delta_softplus=True, impl="triton")
        (dz,) = torch.autograd.grad(y, z, gy)
        res[name] = dz
        if name == "strided":
            assert dz._base is not None and dz._base.shape == (b, l, 2 * d)
            assert dz.stride() == z.stride() and dz.storage_offset() == d
        else:
            assert dz.is_contiguous()
        zr = z.detach().double().requires_grad_(True)
        yr = selective_scan_ref(u, delta, A, B, C, z=zr, delta_softplus=True)
        (dzr,) = torch.autograd.grad(yr, zr, gy.double())
        assert torch.allclose(dz.double(), dzr, atol=1e-5, rtol=1e-4)
    assert torch.allclose(res["strided"], res["contiguous"])
