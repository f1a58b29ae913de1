"""Triton SSD scan (kernels/ssd/triton_*.py) against the sequential reference ``ssd_scan_ref``.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1): sizes
stay tiny, the chunk is 16 or 32 steps and every block of the kernels 16 (``TUNING``), so that
short sequences span several chunks, several blocks per chunk and several (p, n) blocks. The
reference runs in float64 on float64 copies of the same inputs; each check compares the forward
(y, h_last) and the gradient of every tensor input, from random upstream gradients on y and
h_last, by the relative norm of the difference.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from hybridseq.kernels.ssd.ref import ssd_scan_ref

tssd = importlib.import_module("hybridseq.kernels.ssd.triton_ssd")
ssd_scan_triton = tssd.ssd_scan_triton
DEV = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")
SMALL = {"state_fwd": (16, 16, 16, 1, 1), "state_bwd": (16, 16, 16, 1, 1),
         "scan_fwd": (16, 16, 16, 1, 1), "col_bwd": (16, 1, 1), "row_bwd": (16, 16, 1, 1),
         "dt_bwd": (16, 1)}


@pytest.fixture
def tuning():
    """Small blocks for the interpreter (SMALL) plus any overrides; restored afterwards."""
    saved = dict(tssd.TUNING)

    def set_(**over):
        tssd.TUNING.update({k: None for k in tssd.TUNING})
        tssd.TUNING["fp32_dot"] = "ieee"
        if DEV == "cpu":
            tssd.TUNING.update(SMALL)
        tssd.TUNING.update(over)

    set_()
    yield set_
    tssd.TUNING.clear()
    tssd.TUNING.update(saved)


@pytest.fixture
def poison(monkeypatch):
    monkeypatch.setattr(tssd, "POISON_OUTPUTS", True)


def make(b, l, h, p, g, n, dtype=torch.float32, z=True, D="h", bias=True, h0=True,
         device=DEV):
    """Fresh random inputs (a dict of leaf tensors that require grad). D: None, "h" (nheads,)
    or "hp" (nheads, headdim)."""
    t = {
        "x": torch.randn(b, l, h, p, device=device).to(dtype),
        "dt": (0.5 * torch.randn(b, l, h, device=device)).to(dtype),
        "A": -(0.2 + torch.rand(h, device=device)),
        "B": torch.randn(b, l, g, n, device=device).to(dtype),
        "C": torch.randn(b, l, g, n, device=device).to(dtype),
        "D": (None if D is None else torch.randn(h, device=device) if D == "h"
              else torch.randn(h, p, device=device)),
        "z": torch.randn(b, l, h, p, device=device).to(dtype) if z else None,
        "dt_bias": 0.3 * torch.randn(h, device=device) if bias else None,
        "initial_state": torch.randn(b, h, p, n, device=device) if h0 else None,
    }
    return {k: (v.requires_grad_() if v is not None else None) for k, v in t.items()}


def rel(x, ref):
    x, ref = x.detach().double(), ref.detach().double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def run_both(t, chunk_size=16, final=True, **kw):
    """Forward + backward of the Triton scan and of the float64 reference on the same inputs:
    {name: (triton, reference)} for y, h_last and the gradient of every given input."""
    kw.setdefault("dt_softplus", True)
    t64 = {k: (v.detach().double().requires_grad_() if v is not None else None)
           for k, v in t.items()}
    outs = {}
    for impl, inp in (("tri", t), ("ref", t64)):
        args = [inp[k] for k in ("x", "dt", "A", "B", "C")]
        extra = dict(D=inp["D"], z=inp["z"], dt_bias=inp["dt_bias"],
                     initial_state=inp["initial_state"], return_final_state=final, **kw)
        if impl == "tri":
            res = ssd_scan_triton(*args, chunk_size=chunk_size, **extra)
        else:
            res = ssd_scan_ref(*args, **extra)
        outs[impl] = res if final else (res, None)
    gen = torch.Generator(device="cpu").manual_seed(1)
    gy = torch.randn(outs["ref"][0].shape, dtype=torch.float64, generator=gen).to(DEV)
    gh = (torch.randn(outs["ref"][1].shape, dtype=torch.float64, generator=gen).to(DEV)
          if final else None)
    res = {"y": (outs["tri"][0], outs["ref"][0])}
    if final:
        res["h_last"] = (outs["tri"][1], outs["ref"][1])
    names = [k for k in NAMES if t[k] is not None]
    grads = {}
    for impl, inp in (("tri", t), ("ref", t64)):
        y, h = outs[impl]
        loss = (y.double() * gy).sum()
        if final:
            loss = loss + (h.double() * gh).sum()
        grads[impl] = torch.autograd.grad(loss, [inp[k] for k in names])
    for k, a, r in zip(names, grads["tri"], grads["ref"]):
        res["d" + k] = (a, r)
    return res


def check(res, tol):
    for k, (a, r) in res.items():
        assert a.shape == r.shape, (k, a.shape, r.shape)
        assert torch.isfinite(a).all(), f"{k}: non-finite values"
        err = rel(a, r)
        assert err < tol, f"{k}: relative error {err:.3g} >= {tol}"


# ------------------------------------------------------------------------------ fp32, shapes
@pytest.mark.parametrize("l", [1, 15, 16, 17, 40])
def test_seqlens_around_the_chunk(l, tuning, poison):
    """seqlen 1, chunk - 1, chunk, chunk + 1, not a multiple: chunk 16, 2 groups of 2 heads,
    headdim 6 and dstate 12 (not powers of two), D per (head, p), z, initial_state."""
    t = make(2, l, 4, 6, 2, 12, D="hp")
    check(run_both(t, chunk_size=16), 1e-4)


def test_blocks_smaller_than_the_chunk(tuning, poison):
    """Chunk 32 with every block 16: two sub-blocks per chunk in the state walks, two target /
    source blocks in the chunk kernels (diagonal and off-diagonal tiles, two d cs slices);
    headdim 20 and dstate 20 over two (p, n) blocks of the state kernels; ngroups 1."""
    t = make(2, 45, 3, 20, 1, 20, D="h")
    check(run_both(t, chunk_size=32, dt_limit=(0.05, 1.5)), 1e-4)


def test_head_split_and_groups(tuning, poison):
    """The backward chunk kernels with the heads of each group cut into splits (dB / dC
    partials summed on the host), 2 groups of 3 heads (the last split ragged)."""
    tuning(head_split=2)
    t = make(1, 33, 6, 8, 2, 16)
    check(run_both(t, chunk_size=16), 1e-4)


@pytest.mark.parametrize("opts", [
    dict(z=False, D=None, bias=False, h0=False),
    dict(z=True, D="h", bias=False, h0=False),
    dict(z=False, D="hp", bias=True, h0=True),
])
def test_optional_inputs(opts, tuning):
    t = make(2, 21, 2, 16, 1, 16, **opts)
    check(run_both(t, chunk_size=16, dt_softplus=opts["bias"]), 1e-4)


def test_no_softplus_with_limit_and_no_final_state(tuning):
    """dt used as given (plus bias, clamped: some steps hit each bound), y only."""
    t = make(1, 19, 2, 8, 2, 8)
    with torch.no_grad():
        t["dt"].abs_()
    check(run_both(t, chunk_size=16, final=False, dt_softplus=False, dt_limit=(0.1, 0.6)),
          1e-4)


# ------------------------------------------------------------------------------ documents
def _seq(rows):
    return torch.tensor(rows, dtype=torch.int32, device=DEV)


def test_seq_idx_short_documents_and_chunk_edges(tuning, poison):
    """Documents of length 1, boundaries exactly at chunk edges (16, 32), one inside a chunk,
    initial_state (first document only), chunk 16 with 16-step blocks."""
    l = 40
    r0 = [0] * 16 + [1] * 16 + [2] + [3] + [4] * 6
    r1 = [0] + [1] * 14 + [2] * 2 + [3] * 22 + [9]
    t = make(2, l, 2, 8, 1, 16)
    check(run_both(t, chunk_size=16, seq_idx=_seq([r0, r1])), 1e-4)


def test_seq_idx_with_sub_blocks(tuning, poison):
    """Documents with chunk 32 and 16-step blocks: a boundary at a block edge inside a chunk,
    one at a chunk edge, one-step documents, int64 seq_idx, two groups."""
    r0 = [0] * 16 + [1] * 16 + [2] * 5 + [3] + [4] * 12
    r1 = [5] * 3 + [6] + [7] * 40 + [8] * 6
    t = make(2, 50, 4, 12, 2, 8, D="hp")
    seq = _seq([r0, r1]).long()
    check(run_both(t, chunk_size=32, seq_idx=seq, dt_limit=(0.0, 2.0)), 1e-4)


def test_seq_idx_all_one_step_documents(tuning):
    t = make(1, 18, 2, 8, 1, 8)
    check(run_both(t, chunk_size=16, seq_idx=_seq([list(range(18))])), 1e-4)


# ------------------------------------------------------------------------------ layouts, dtypes
def test_strided_views_of_one_projection(tuning):
    """x, z, B, C, dt as views into one (b, l, width) projection output (the Mamba-2 block's
    in_proj): strided along every axis, never copied by the kernels."""
    b, l, h, p, g, n = 2, 23, 2, 8, 1, 16
    sizes = (h * p, h * p, g * n, g * n, h)  # z, x, B, C, dt
    proj = torch.randn(b, l, sum(sizes), device=DEV)
    with torch.no_grad():
        proj[..., -h:] *= 0.5
    proj.requires_grad_()
    A = -(0.2 + torch.rand(h, device=DEV))
    kw = dict(D=torch.randn(h, device=DEV), dt_bias=torch.randn(h, device=DEV),
              dt_softplus=True, return_final_state=True)

    def views(t):
        z, x, B, C, dt = torch.split(t, sizes, dim=-1)
        return (x.view(b, l, h, p), dt, B.view(b, l, g, n), C.view(b, l, g, n),
                z.view(b, l, h, p))

    x, dt, B, C, z = views(proj)
    assert not x.is_contiguous() and not z.is_contiguous() and not dt.is_contiguous()
    y, hl = ssd_scan_triton(x, dt, A, B, C, z=z, chunk_size=16, **kw)
    gy, gh = torch.randn_like(y), torch.randn_like(hl)
    (gp,) = torch.autograd.grad((y * gy).sum() + (hl * gh).sum(), [proj])
    p64 = proj.detach().double().requires_grad_()
    x, dt, B, C, z = views(p64)
    kw64 = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
    yr, hr = ssd_scan_ref(x, dt, A.double(), B, C, z=z, **kw64)
    (gr,) = torch.autograd.grad((yr * gy.double()).sum() + (hr * gh.double()).sum(), [p64])
    assert rel(y, yr) < 1e-4 and rel(hl, hr) < 1e-4 and rel(gp, gr) < 1e-4


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 1e-2)])
def test_16bit_inputs(dtype, tol, tuning):
    """16-bit x, dt, B, C, z: tensor-core products of that type with float32 accumulation; the
    reference sees the same rounded inputs in float64 (measured here: bfloat16 errors 1e-3 to
    9e-3, float16 2e-4 to 4e-3)."""
    t = make(2, 37, 4, 16, 2, 16, dtype=dtype, D="hp")
    res = run_both(t, chunk_size=32)
    assert res["y"][0].dtype == dtype and res["dx"][0].dtype == dtype
    assert res["h_last"][0].dtype == torch.float32
    check(res, tol)


def test_chunk_size_changes_nothing(tuning):
    """chunk 16, 32 and a non-power-of-two request (24 -> 16) agree to rounding."""
    t = make(1, 40, 2, 8, 1, 8)
    outs = []
    for cs in (16, 32, 24):
        y, h = ssd_scan_triton(t["x"], t["dt"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"],
                               dt_bias=t["dt_bias"], dt_softplus=True,
                               initial_state=t["initial_state"], return_final_state=True,
                               chunk_size=cs)
        outs.append((y.detach(), h.detach()))
    assert tssd.chunk_length(24, 40) == 16 and tssd.chunk_length(1000, 40) == 64
    for y, h in outs[1:]:
        assert rel(y, outs[0][0]) < 1e-5 and rel(h, outs[0][1]) < 1e-5


def test_no_grad_and_empty(tuning):
    t = make(1, 9, 2, 8, 1, 8)
    with torch.no_grad():
        y = ssd_scan_triton(t["x"], t["dt"], t["A"], t["B"], t["C"], z=t["z"], chunk_size=16)
        yr = ssd_scan_ref(t["x"], t["dt"], t["A"], t["B"], t["C"], z=t["z"])
    assert rel(y, yr) < 1e-4
    e = make(1, 0, 2, 8, 1, 8)
    y, h = ssd_scan_triton(e["x"], e["dt"], e["A"], e["B"], e["C"],
                           initial_state=e["initial_state"], return_final_state=True)
    assert y.shape == (1, 0, 2, 8) and torch.equal(h, e["initial_state"].float())


def test_limits_raise():
    t = make(1, 4, 1, 300, 1, 8)
    with pytest.raises(ValueError, match="headdim"):
        ssd_scan_triton(t["x"], t["dt"], t["A"], t["B"], t["C"])
    t = make(1, 4, 1, 8, 1, 257)
    with pytest.raises(ValueError, match="dstate"):
        ssd_scan_triton(t["x"], t["dt"], t["A"], t["B"], t["C"])
    t = make(1, 4, 1, 8, 1, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        ssd_scan_triton(t["x"], t["dt"], t["A"], t["B"], t["C"])


# ------------------------------------------------------------------------------ slow (interpreter)
@pytest.mark.slow
@pytest.mark.parametrize("case", ["long", "many_groups", "docs_bf16"])
def test_slow_cases(case, tuning, poison):
    if case == "long":  # many chunks, chunk 64 with 16-step blocks (4 x 4 tiles per chunk)
        t = make(1, 150, 2, 16, 1, 32)
        check(run_both(t, chunk_size=64, dt_limit=(0.01, 3.0)), 1e-4)
    elif case == "many_groups":  # ngroups == nheads
        t = make(2, 35, 4, 10, 4, 6, D="hp")
        check(run_both(t, chunk_size=16), 1e-4)
    else:
        t = make(2, 48, 2, 16, 1, 16, dtype=torch.bfloat16)
        seq = _seq([[0] * 16 + [1] * 32, [0] * 3 + [1] * 29 + [2] * 16])
        check(run_both(t, chunk_size=32, seq_idx=seq), 2e-2)


# ------------------------------------------------------------------------------ compiler
_COMPILE_SM90 = r"""
import inspect, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hybridseq.kernels.ssd import (triton_state as st, triton_chunk_scan as cs,
                                   triton_bwd_chunk as bc, triton_bwd_dt as bd,
                                   triton_ssd as T)

LOWP = ("x_ptr", "dt_ptr", "B_ptr", "C_ptr", "z_ptr", "dy_ptr", "y_ptr", "ypre_ptr", "dx_ptr",
        "dz_ptr", "ddt_out_ptr")
UNIT = ("s_x_p", "s_z_p", "s_dy_p", "s_dz_p", "s_y_p", "s_B_n", "s_C_n", "s_seq_l", "s_dt_h",
        "s_do_h")

def build(kernel, consts, num_warps=4, num_stages=2):
    names = list(inspect.signature(kernel.fn).parameters)
    consts = dict(consts, **{p: 1 for p in names if p in UNIT})  # unit strides, as at run time
    sig = {}
    for p in names:
        if p in consts:
            sig[p] = "constexpr"
        elif p.endswith("_ptr"):
            sig[p] = "*i32" if p == "seq_ptr" else ("*bf16" if p in LOWP else "*fp32")
        else:
            sig[p] = "fp32" if p in ("lo", "hi") else "i32"
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts)
    triton.compile(src, target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": num_warps, "num_stages": num_stages})

D = T._DEFAULTS  # the block shapes that run by default, at P64 N128 chunk 256
for dot in map(int, sys.argv[1:]):
    o = dict(HAS_SEQ=dot == 1, DOT=dot, CHUNK=256)
    for kern, kind, opts in ((st._ssd_state_fwd_kernel, "state_fwd", dict(HAS_BIAS=True,
                              SOFTPLUS=True, HAS_LIMIT=True, HAS_H0=True)),
                             (st._ssd_state_bwd_kernel, "state_bwd", dict(HAS_Z=True,
                              HAS_DHLAST=True, STORE_DH0=True))):
        bl, bp, bn, nw, ns = D[kind]
        build(kern, dict(BLOCK_L=bl, BLOCK_P=bp, BLOCK_N=bn, **opts, **o), nw, ns)
    bm, bk, bp, nw, ns = D["scan_fwd"]
    build(cs._ssd_chunk_scan_fwd_kernel, dict(HAS_D=True, D_PER_P=False, HAS_Z=True,
          STORE_YPRE=True, BLOCK_M=bm, BLOCK_K=bk, BLOCK_P=bp, BLOCK_N=128, **o), nw, ns)
    bs, nw, ns = D["col_bwd"]
    build(bc._ssd_bwd_col_kernel, dict(HAS_D=True, D_PER_P=True, HAS_Z=True, BLOCK_S=bs,
          BLOCK_P=64, BLOCK_N=128, **o), nw, ns)
    bm, bk, nw, ns = D["row_bwd"]
    build(bc._ssd_bwd_row_kernel, dict(HAS_Z=True, BLOCK_M=bm, BLOCK_K=bk, BLOCK_P=64,
          BLOCK_N=128, **o), nw, ns)
bh, nw = D["dt_bwd"]
build(bd._ssd_bwd_dt_kernel, dict(HAS_BIAS=True, SOFTPLUS=True, HAS_LIMIT=True, CHUNK=256,
      NSB=256 // D["col_bwd"][0], BLOCK_H=bh), nw)
print("compiled")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernels")
@pytest.mark.parametrize("dot", [pytest.param(1, id="bf16"),
                                 pytest.param(0, id="fp32", marks=pytest.mark.slow)])
def test_kernels_compile_for_sm90(dot):
    """Every SSD kernel through Triton's real compiler (frontend, LLVM, ptxas) for an H100, with
    bfloat16 products (and seq_idx) or IEEE float32 products (the slow case: about 30 s more),
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
    res = subprocess.run([sys.executable, "-c", _COMPILE_SM90, str(dot)], env=env, cwd=root,
                         capture_output=True, text=True, timeout=500)
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr.lower():
        pytest.skip("Triton's bundled ptxas is missing")
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]


# ------------------------------------------------------------------------------ GPU, real size
@pytest.mark.gpu
def test_gpu_real_size_bf16(tuning, poison):
    """B2 L1024 H8 P64 N128 bf16 with the default blocks and chunk 256, every buffer
    NaN-poisoned, against the float64 reference; then the same inputs in float32 (IEEE
    products) at float32 tolerance."""
    t = make(2, 1024, 8, 64, 1, 128, dtype=torch.bfloat16, D="h")
    with torch.no_grad():
        t["dt_bias"].sub_(2.0)  # Mamba-like dt ~ softplus(-2)
    check(run_both(t, chunk_size=256, dt_limit=(0.0, float("inf"))), 2e-2)
    t32 = {k: (v.detach().float().requires_grad_() if v is not None else None)
           for k, v in t.items()}
    check(run_both(t32, chunk_size=256), 1e-4)
