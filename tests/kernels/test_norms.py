"""Gated RMSNorm (Mamba-2): the reference against a hand-written formula, the Triton autograd op
(interpreter on CPU, compiled on CUDA) against the reference in the forward and every gradient,
the entry point's dispatch and checks."""
from __future__ import annotations

import pytest
import torch

import hybridseq.kernels as K
from hybridseq.kernels import rmsnorm_gated, rmsnorm_gated_ref

f64 = torch.float64


def formula(x, w, z, eps, gs, nbg):
    """Element by element in float64, from the definition."""
    x, w = x.double(), w.double()
    d = x.shape[-1]
    gs = gs or d
    silu = (lambda v: v * torch.sigmoid(v))
    u = x * silu(z.double()) if z is not None and not nbg else x
    out = torch.empty_like(u)
    for k in range(d // gs):
        sl = slice(k * gs, (k + 1) * gs)
        ms = (u[..., sl] ** 2).sum(-1, keepdim=True) / gs
        out[..., sl] = u[..., sl] / torch.sqrt(ms + eps) * w[sl]
    if z is not None and nbg:
        out = out * silu(z.double())
    return out


@pytest.mark.parametrize("gs", [None, 1, 3, 4])
@pytest.mark.parametrize("nbg", [False, True])
@pytest.mark.parametrize("with_z", [True, False])
def test_ref_matches_formula(gs, nbg, with_z):
    x, w = torch.randn(2, 5, 12, dtype=f64), torch.randn(12, dtype=f64)
    z = torch.randn(2, 5, 12, dtype=f64) if with_z else None
    y = rmsnorm_gated_ref(x, w, z, eps=1e-3, group_size=gs, norm_before_gate=nbg)
    torch.testing.assert_close(y, formula(x, w, z, 1e-3, gs, nbg), rtol=1e-13, atol=1e-13)


def test_ref_bf16_in_bf16_out():
    x, z = torch.randn(4, 64).bfloat16(), torch.randn(4, 64).bfloat16()
    w = torch.rand(64) + 0.5
    y = rmsnorm_gated_ref(x, w, z, group_size=16)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), formula(x, w, z, 1e-5, 16, False), rtol=8e-3,
                               atol=8e-3)


# ------------------------------------------------- Triton (interpreter on CPU, compiled on CUDA)

@pytest.fixture
def dev():
    d = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_default_device(d)
    yield d
    torch.set_default_device("cpu")


def run_both(x, w, z, upstream, **kw):
    """Outputs and (dx, dw, dz) of the Triton op and of the float64 reference."""
    outs = []
    for impl in ("triton", "ref"):
        xs = x.detach().clone().requires_grad_()
        ws = w.detach().clone().requires_grad_()
        zs = z.detach().clone().requires_grad_() if z is not None else None
        if impl == "ref":
            xs, ws = xs.double(), ws.double()
            zs = zs.double() if zs is not None else None
            y = rmsnorm_gated_ref(xs, ws, zs, **kw)
        else:
            y = rmsnorm_gated(xs, ws, zs, **kw, impl="triton")
        inputs = [t for t in (xs, ws, zs) if t is not None]
        grads = torch.autograd.grad(y, inputs, upstream.to(y.dtype))
        outs.append((y, *grads))
    return outs


def check(outs, rtol, names=("y", "dx", "dw", "dz")):
    tri, ref = outs
    assert len(tri) == len(ref)
    for name, a, r in zip(names, tri, ref):
        assert torch.isfinite(a).all(), name
        err = ((a.double() - r).norm() / r.norm().clamp_min(1e-30)).item()
        assert err < rtol, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("shape, gs", [((3, 7, 12), None), ((3, 7, 12), 4), ((5, 13), 13),
                                       ((37, 20), 5), ((2, 3, 96), 32), ((1, 1, 3), None),
                                       ((4, 6), 2)])
@pytest.mark.parametrize("nbg", [False, True])
def test_triton_fp32_matches_ref(dev, shape, gs, nbg):
    x, z = torch.randn(shape), torch.randn(shape)
    w = torch.randn(shape[-1])
    check(run_both(x, w, z, torch.randn(shape), eps=1e-5, group_size=gs, norm_before_gate=nbg),
          rtol=1e-5)


@pytest.mark.parametrize("gs", [None, 6])
def test_triton_without_gate(dev, gs):
    x, w = torch.randn(9, 18), torch.randn(18)
    check(run_both(x, w, None, torch.randn(9, 18), group_size=gs), rtol=1e-5,
          names=("y", "dx", "dw"))


def test_triton_many_rows_loop_and_deterministic_dw(dev):
    """More row blocks than backward programs (each program loops over several, the last block
    partly masked); dw is bitwise the same on a second run."""
    x, z, w = torch.randn(301, 24), torch.randn(301, 24), torch.randn(24)
    up = torch.randn(301, 24)
    check(run_both(x, w, z, up, group_size=8), rtol=1e-5)
    dws = []
    for _ in range(2):
        ws = w.clone().requires_grad_()
        y = rmsnorm_gated(x, ws, z, group_size=8, impl="triton")
        (dw,) = torch.autograd.grad(y, [ws], up)
        dws.append(dw)
    assert torch.equal(dws[0], dws[1])


@pytest.mark.parametrize("nbg", [False, True])
def test_triton_bf16(dev, nbg):
    x, z = torch.randn(6, 40).bfloat16(), torch.randn(6, 40).bfloat16()
    w = (torch.rand(40) + 0.5).float()  # an fp32 weight with bf16 activations, as in training
    outs = run_both(x, w, z, torch.randn(6, 40), group_size=20, norm_before_gate=nbg)
    y, dx, dw, dz = outs[0]
    assert y.dtype == dx.dtype == dz.dtype == torch.bfloat16 and dw.dtype == torch.float32
    check(outs, rtol=1e-2)


def test_triton_strided_rows(dev):
    """x and z as the two halves of one wider tensor (rows strided, columns contiguous)."""
    xz = torch.randn(4, 5, 32)
    x, z = xz[..., :16], xz[..., 16:]
    check(run_both(x, torch.randn(16), z, torch.randn(4, 5, 16), group_size=8), rtol=1e-5)


def test_triton_only_some_inputs_need_grad(dev):
    x, z, w = torch.randn(5, 8), torch.randn(5, 8), torch.randn(8)
    ws = w.clone().requires_grad_()
    y = rmsnorm_gated(x, ws, z, impl="triton")
    (dw,) = torch.autograd.grad(y.sum(), [ws])
    wr = w.double().requires_grad_()
    (dwr,) = torch.autograd.grad(rmsnorm_gated_ref(x.double(), wr, z.double()).sum(), [wr])
    torch.testing.assert_close(dw.double(), dwr, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------- the entry point: dispatch, checks

@pytest.mark.parametrize("impl", ["auto", "torch", "ref"])
def test_cpu_impls_are_the_reference(monkeypatch, impl):
    import hybridseq.kernels.norms as norms

    calls = []
    monkeypatch.setattr(norms, "rmsnorm_gated_ref",
                        lambda *a, **k: calls.append(1) or rmsnorm_gated_ref(*a, **k))
    x, w, z = torch.randn(3, 8), torch.randn(8), torch.randn(3, 8)
    y = rmsnorm_gated(x, w, z, group_size=4, impl=impl)
    assert calls == [1]
    torch.testing.assert_close(y.double(), formula(x, w, z, 1e-5, 4, False))


def test_exports():
    assert K.rmsnorm_gated is rmsnorm_gated and K.rmsnorm_gated_ref is rmsnorm_gated_ref


@pytest.mark.parametrize("kw, exc, match", [
    (dict(weight=torch.randn(7)), ValueError, r"rmsnorm_gated: weight must have shape \(d,\) = "
                                              r"\(8,\), got \(7\)"),
    (dict(z=torch.randn(3, 7)), ValueError, r"rmsnorm_gated: z must have shape \(3, 8\)"),
    (dict(group_size=3), ValueError, "group_size must be None or a positive divisor of d=8"),
    (dict(group_size=0), ValueError, "group_size"),
    (dict(eps=-1.0), ValueError, "eps must be a number >= 0"),
    (dict(x=torch.randn(3, 8).long()), TypeError, "rmsnorm_gated: x must be float16"),
    (dict(impl="cuda"), ValueError, "rmsnorm_gated impl must be one of"),
])
def test_argument_checks(kw, exc, match):
    args = dict(x=torch.randn(3, 8), weight=torch.randn(8), z=None)
    args.update(kw)
    with pytest.raises(exc, match=match):
        rmsnorm_gated(**args)


def test_triton_group_limit_is_a_clear_error(monkeypatch):
    if not K.triton_available():
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(1, 16385)
    with pytest.raises(ValueError, match="group_size <= 16384"):
        rmsnorm_gated(x, torch.ones(16385), impl="triton")
    # auto stays on the torch path (CPU) whatever the size
    assert rmsnorm_gated(x, torch.ones(16385)).shape == x.shape


# ================================================================ fused residual add + RMSNorm

from hybridseq.kernels.norms import add_rmsnorm, add_rmsnorm_ref  # noqa: E402


def add_formula(x, r, w, eps):
    """new residual and normed output by the definition, in float64."""
    h = x.double() if r is None else x.double() + r.double()
    ms = (h ** 2).sum(-1, keepdim=True) / h.shape[-1]
    return h / torch.sqrt(ms + eps) * w.double(), h


@pytest.mark.parametrize("with_res", [True, False])
def test_add_ref_matches_formula(with_res):
    x, w = torch.randn(2, 5, 12, dtype=f64), torch.randn(12, dtype=f64)
    r = torch.randn(2, 5, 12, dtype=f64) if with_res else None
    y, h = add_rmsnorm_ref(x, r, w, eps=1e-3)
    yf, hf = add_formula(x, r, w, 1e-3)
    torch.testing.assert_close(h, hf, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(y, yf, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("x_dt, r_dt, fp32, out, want_y, want_h", [
    (torch.bfloat16, torch.float32, False, None, torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16, False, None, torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16, True, None, torch.bfloat16, torch.float32),
    (torch.bfloat16, None, False, None, torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, None, True, torch.float32, torch.float32, torch.float32),
])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_add_dtypes(x_dt, r_dt, fp32, out, want_y, want_h, impl):
    x = torch.randn(3, 16).to(x_dt)
    r = torch.randn(3, 16).to(r_dt) if r_dt is not None else None
    y, h = add_rmsnorm(x, r, torch.rand(16) + 0.5, impl=impl, residual_in_fp32=fp32,
                       out_dtype=out)
    assert (y.dtype, h.dtype) == (want_y, want_h)
    hf = x.float() + (r.float() if r is not None else 0)
    # Triton's interpreter rounds float32 -> bfloat16 toward zero (compiled kernels round to
    # nearest even, as torch): allow one bf16 ulp there
    tol = dict(rtol=8e-3, atol=0) if impl == "triton" and want_h == torch.bfloat16 else {}
    torch.testing.assert_close(h.float(), hf.to(want_h).float(), **tol)


def run_add_both(x, r, w, dy, dh, **kw):
    """Outputs and gradients (dx, dr, dw) of the Triton op and of the reference run in the same
    dtypes (the same rounding points); ``dh`` None: the new residual gets no gradient."""
    outs = []
    for impl in ("triton", "torch"):
        xs = x.detach().clone().requires_grad_()
        rs = r.detach().clone().requires_grad_() if r is not None else None
        ws = w.detach().clone().requires_grad_()
        y, h = add_rmsnorm(xs, rs, ws, impl=impl, **kw)
        loss = (y.double() * dy).sum() + ((h.double() * dh).sum() if dh is not None else 0)
        inputs = [t for t in (xs, rs, ws) if t is not None]
        outs.append((y, h, *torch.autograd.grad(loss, inputs)))
    return outs


def check_add(outs, rtol):
    tri, ref = outs
    for name, a, b in zip(("y", "h", "dx", "dr", "dw"), tri, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        err = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
        assert err < rtol, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("shape", [(3, 7, 12), (5, 13), (37, 20), (1, 1, 3), (301, 24), (2, 1)])
@pytest.mark.parametrize("with_res", [True, False])
def test_add_triton_fp32_matches_ref(dev, shape, with_res):
    x, w = torch.randn(shape), torch.randn(shape[-1])
    r = torch.randn(shape) if with_res else None
    check_add(run_add_both(x, r, w, torch.randn(shape, dtype=f64), torch.randn(shape, dtype=f64)),
              rtol=1e-5)


def test_add_triton_fp32_against_float64(dev):
    """The fp32 kernel against the float64 definition (not only the fp32 reference)."""
    x, r, w = torch.randn(9, 33), torch.randn(9, 33), torch.randn(33)
    dy, dh = torch.randn(9, 33, dtype=f64), torch.randn(9, 33, dtype=f64)
    (y, h, dx, dr, dw), _ = run_add_both(x, r, w, dy, dh)
    xs, rs, ws = (t.double().requires_grad_() for t in (x, r, w))
    yr, hr = add_rmsnorm_ref(xs, rs, ws)
    gr = torch.autograd.grad((yr * dy).sum() + (hr * dh).sum(), [xs, rs, ws])
    for a, b in zip((y, h, dx, dr, dw), (yr, hr, *gr)):
        torch.testing.assert_close(a.double(), b.detach(), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("r_dtype", [torch.bfloat16, torch.float32])
def test_add_triton_bf16(dev, r_dtype):
    """bf16 sublayer output into a bf16 or fp32 residual stream, fp32 weight (training)."""
    shape = (4, 9, 40)
    x, r = torch.randn(shape).bfloat16(), torch.randn(shape).to(r_dtype)
    w = torch.rand(40) + 0.5
    outs = run_add_both(x, r, w, torch.randn(shape, dtype=f64), torch.randn(shape, dtype=f64))
    y, h, dx, dr, dw = outs[0]
    assert (y.dtype, h.dtype, dx.dtype, dr.dtype, dw.dtype) == \
        (torch.bfloat16, r_dtype, torch.bfloat16, r_dtype, torch.float32)
    check_add(outs, rtol=1e-2)


def test_add_triton_residual_unused_and_fp32_stream(dev):
    """Only the normed output is used (the last sublayer's residual feeds nothing else), with
    the residual kept in fp32 and a bf16 output."""
    x, r = torch.randn(7, 18).bfloat16(), torch.randn(7, 18).bfloat16()
    outs = run_add_both(x, r, torch.rand(18) + 0.5, torch.randn(7, 18, dtype=f64), None,
                        residual_in_fp32=True)
    assert outs[0][1].dtype == torch.float32
    check_add(outs, rtol=1e-2)


def test_add_triton_strided_and_deterministic_dw(dev):
    """x a strided half of a wider tensor; dw bitwise equal over two runs."""
    xz = torch.randn(301, 48)
    x, r, w = xz[:, :24], torch.randn(301, 24), torch.randn(24)
    dy = torch.randn(301, 24, dtype=f64)
    check_add(run_add_both(x, r, w, dy, dy), rtol=1e-5)
    dws = []
    for _ in range(2):
        ws = w.clone().requires_grad_()
        y, h = add_rmsnorm(x, r, ws, impl="triton")
        dws.append(torch.autograd.grad(y.sum() + h.sum(), [ws])[0])
    assert torch.equal(dws[0], dws[1])


@pytest.mark.parametrize("kw, exc, match", [
    (dict(residual=torch.randn(3, 7)), ValueError, r"add_rmsnorm: residual must have shape"),
    (dict(weight=torch.randn(7)), ValueError, r"add_rmsnorm: weight must have shape"),
    (dict(eps=-1.0), ValueError, "eps must be a number >= 0"),
    (dict(out_dtype=torch.int32), TypeError, "out_dtype must be None or a float dtype"),
    (dict(impl="cuda"), ValueError, "add_rmsnorm impl must be one of"),
])
def test_add_argument_checks(kw, exc, match):
    args = dict(x=torch.randn(3, 8), residual=torch.randn(3, 8), weight=torch.randn(8))
    args.update(kw)
    with pytest.raises(exc, match=match):
        add_rmsnorm(**args)


def test_add_exports_and_cpu_default():
    assert K.add_rmsnorm is add_rmsnorm and K.add_rmsnorm_ref is add_rmsnorm_ref
    x, r, w = torch.randn(3, 8), torch.randn(3, 8), torch.randn(8)
    for a, b in zip(add_rmsnorm(x, r, w), add_rmsnorm_ref(x, r, w)):
        assert torch.equal(a, b)


# ============================================= the custom ops (torch.compile) of both norm ops

def test_custom_ops_opcheck(dev):
    """Schema, fake (shape) functions and autograd registration of the four ops."""
    from hybridseq.kernels.norms import triton_add_norm, triton_norm

    g = dict(requires_grad=True)
    x, r, w = torch.randn(3, 5, 12, **g), torch.randn(3, 5, 12, **g), torch.randn(12, **g)
    torch.library.opcheck(triton_add_norm._fwd_op, (x, r, w, 1e-5, torch.float32, torch.float32))
    xb = torch.randn(4, 12).bfloat16().requires_grad_()
    torch.library.opcheck(triton_add_norm._fwd_op,
                          (xb, None, w, 1e-5, torch.float32, torch.bfloat16))
    z = torch.randn(3, 5, 12, **g)
    torch.library.opcheck(triton_norm._fwd_op, (x, w, z, 1e-5, 4, False))
    torch.library.opcheck(triton_norm._fwd_op, (x, w, None, 1e-5, 12, True))


def test_compiled_graph_holds_the_custom_ops(dev):
    """torch.compile(fullgraph=True) of a function calling both ops (impl triton) traces them as
    custom ops, and the compiled forward and backward equal the eager (autograd.Function) ones."""
    def fn(x, r, w, z, w2):
        y, h = add_rmsnorm(x, r, w, impl="triton")
        return rmsnorm_gated(y, w2, z, group_size=4, impl="triton"), h

    torch._dynamo.reset()
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)

    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    args = [torch.randn(3, 5, 12), torch.randn(3, 5, 12), torch.randn(12), torch.randn(3, 5, 12),
            torch.randn(12)]
    grads = []
    for f in (fn, compiled):
        a = [t.clone().requires_grad_() for t in args]
        y, h = f(*a)
        grads.append((y, h, *torch.autograd.grad((y * y).sum() + h.sum(), a)))
    assert any("add_rmsnorm_fwd" in s for s in seen) and any("rmsnorm_gated_fwd" in s for s in seen)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
