"""One-token SSD state update (the Mamba-2 decode step): the reference against a length-1
ssd_scan and against the whole scan step by step, its in-place contract, and the Triton kernel
(interpreter on CPU, compiled on CUDA) against the reference."""
from __future__ import annotations

import importlib

import pytest
import torch

from hybridseq.kernels import ssd_scan, ssd_scan_ref, ssd_state_update, ssd_state_update_ref

f64 = torch.float64


def make(b=2, h=4, p=3, g=2, n=5, dtype=torch.float32, D="h", z=True, dt_bias=True):
    return dict(
        state=torch.randn(b, h, p, n),
        x=torch.randn(b, h, p, dtype=dtype), dt=torch.randn(b, h, dtype=dtype),
        A=-torch.rand(h) * 2 - 0.1,
        B=torch.randn(b, g, n, dtype=dtype), C=torch.randn(b, g, n, dtype=dtype),
        D=torch.randn(h) if D == "h" else torch.randn(h, p) if D == "hp" else None,
        z=torch.randn(b, h, p, dtype=dtype) if z else None,
        dt_bias=torch.randn(h) * 0.5 if dt_bias else None)


def to64(inp):
    return {k: (v.double() if v is not None else None) for k, v in inp.items()}


def scan_one_step(inp, **run):
    """ssd_scan_ref on a length-1 sequence from the state: (y (b, h, p), final state)."""
    seq = {k: (inp[k][:, None] if inp[k] is not None else None) for k in ("x", "dt", "B", "C", "z")}
    y, hl = ssd_scan_ref(**seq, A=inp["A"], D=inp["D"], dt_bias=inp["dt_bias"],
                         initial_state=inp["state"], return_final_state=True, **run)
    return y[:, 0], hl


@pytest.mark.parametrize("g", [1, 2, 4])
@pytest.mark.parametrize("run", [dict(), dict(dt_softplus=True),
                                 dict(dt_softplus=True, dt_limit=(0.3, 0.8))])
@pytest.mark.parametrize("D", ["h", "hp"])
def test_ref_equals_length_one_scan(g, run, D):
    inp = to64(make(g=g, D=D))
    if not run:
        inp["dt"] = inp["dt"].abs()
    yr, hr = scan_one_step(inp, **run)
    state = inp["state"].clone()
    y = ssd_state_update_ref(**dict(inp, state=state), **run)
    torch.testing.assert_close(y, yr, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(state, hr, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("impl", ["torch", "auto", "ref"])
def test_entry_point_updates_in_place_like_a_length_one_scan(impl):
    inp = make(D="hp")
    state = inp["state"].clone()
    ptr = state.data_ptr()
    y = ssd_state_update(**dict(inp, state=state), dt_softplus=True, impl=impl)
    yr, hr = scan_one_step(to64(inp), dt_softplus=True)
    assert state.data_ptr() == ptr and state.dtype == torch.float32
    assert y.dtype == torch.float32 and y.shape == (2, 4, 3)
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.double(), hr, rtol=1e-5, atol=1e-5)


def test_steps_after_a_prefill_equal_the_whole_scan():
    """Prefill with the chunked scan, then decode one token at a time from its final state:
    every y and the last state equal one scan over the whole sequence."""
    b, l, h, p, g, n, l0 = 2, 11, 4, 3, 2, 5, 6
    x, dt, z = torch.randn(b, l, h, p), torch.randn(b, l, h), torch.randn(b, l, h, p)
    A, Dv, db = -torch.rand(h) - 0.1, torch.randn(h), torch.randn(h)
    B, C = torch.randn(b, l, g, n), torch.randn(b, l, g, n)
    run = dict(D=Dv, dt_bias=db, dt_softplus=True, dt_limit=(0.0, 2.0))
    full, hfull = ssd_scan_ref(x, dt, A, B, C, z=z, **run, return_final_state=True)
    _, state = ssd_scan(x[:, :l0], dt[:, :l0], A, B[:, :l0], C[:, :l0], z=z[:, :l0], **run,
                        return_final_state=True, chunk_size=4, impl="torch")
    for t in range(l0, l):
        y = ssd_state_update(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], z=z[:, t], **run)
        torch.testing.assert_close(y, full[:, t], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, hfull, rtol=1e-5, atol=1e-5)


def test_ref_optional_terms_by_hand():
    inp = make(g=1, D=None, z=False, dt_bias=False)
    s0 = inp["state"].clone()
    y = ssd_state_update_ref(**inp)
    dt = inp["dt"][:, :, None, None]
    h_exp = torch.exp(dt * inp["A"][:, None, None]) * s0 + dt * inp["x"][..., None] \
        * inp["B"][:, :, None, :]
    torch.testing.assert_close(inp["state"], h_exp)
    torch.testing.assert_close(y, (h_exp * inp["C"][:, :, None, :]).sum(-1))


@pytest.mark.parametrize("change, exc, match", [
    (dict(state=torch.randn(2, 4, 3, 5).bfloat16()), TypeError, "state must be float32"),
    (dict(state=torch.randn(2, 4, 3, 6)), ValueError, r"ssd_state_update: state must have shape "
                                                      r"\(batch, nheads, headdim, dstate\)"),
    (dict(B=torch.randn(2, 3, 5)), ValueError, "B has 3 groups, which must divide nheads=4"),
    (dict(C=torch.randn(2, 2, 4)), ValueError, "C must have shape"),
    (dict(dt=torch.randn(2, 3)), ValueError, r"dt must have shape \(batch, nheads\)"),
    (dict(D=torch.randn(4, 4)), ValueError, "D must have shape"),
    (dict(z=torch.randn(2, 4, 2)), ValueError, "z must have shape"),
    (dict(dt_limit=(2.0, 1.0)), ValueError, "dt_limit"),
])
def test_argument_checks(change, exc, match):
    inp = make()
    inp.update(change)
    with pytest.raises(exc, match=match):
        ssd_state_update(**inp)


# ------------------------------------------------- Triton (interpreter on CPU, compiled on CUDA)

@pytest.fixture
def poisoned(monkeypatch):
    """The Triton module with y pre-filled with NaN (catches unwritten elements). Tensors made
    inside the test live on CUDA when there is one (compiled kernel), else on the CPU
    (interpreter, TRITON_INTERPRET=1 from conftest)."""
    mod = importlib.import_module("hybridseq.kernels.ssd.step_triton")
    monkeypatch.setattr(mod, "_alloc", lambda shape, dtype, device: torch.full(
        shape, float("nan"), dtype=dtype, device=device))
    torch.set_default_device("cuda" if torch.cuda.is_available() else "cpu")
    yield mod
    torch.set_default_device("cpu")


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values (unwritten output?)"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def triton_vs_ref(inp, **run):
    state = inp["state"].clone()
    ptr = state.data_ptr()
    y = ssd_state_update(**dict(inp, state=state), **run, impl="triton")
    ref_state = inp["state"].double()
    yr = ssd_state_update_ref(**dict(to64(inp), state=ref_state), **run)
    assert state.data_ptr() == ptr and state.dtype == torch.float32
    return y, state, yr, ref_state


@pytest.mark.parametrize("n", [1, 16, 128])
@pytest.mark.parametrize("g", [1, 2])
def test_triton_matches_ref_fp32(poisoned, n, g):
    # n = 128: 16 headdim rows per program, so headdim 20 takes two programs, the second masked
    inp = make(b=2, h=4, p=20, g=g, n=n, D="hp")
    y, s, yr, sr = triton_vs_ref(inp, dt_softplus=True, dt_limit=(0.05, 1.0))
    assert y.dtype == torch.float32 and y.shape == (2, 4, 20)
    assert rel(y, yr) < 1e-5 and rel(s, sr) < 1e-5


def test_triton_bf16_no_optionals(poisoned):
    inp = make(b=3, h=6, p=8, g=3, n=8, dtype=torch.bfloat16, D=None, z=False, dt_bias=False)
    inp["dt"] = inp["dt"].abs() * 0.5  # no softplus: keep dt positive
    y, s, yr, sr = triton_vs_ref(inp)
    assert y.dtype == torch.bfloat16
    assert rel(y, yr) < 1e-2 and rel(s, sr) < 1e-5


def test_triton_softplus_extremes(poisoned):
    """softplus at large |dt| (exp overflow / log1p underflow) stays finite and exact."""
    inp = make(b=1, h=8, p=4, g=1, n=4, dt_bias=False)
    inp["dt"] = torch.tensor([[-90.0, -30.0, -8.0, -1e-3, 0.0, 2.0, 25.0, 90.0]])
    inp["A"] = -torch.rand(8) * 0.01
    y, s, yr, sr = triton_vs_ref(inp, dt_softplus=True)
    assert rel(s, sr) < 1e-6 and rel(y, yr) < 1e-6


def test_triton_strided_inputs(poisoned):
    """x, z, dt, B, C as slices of one wider projection, as a Mamba-2 block produces them."""
    b, h, p, g, n = 2, 4, 6, 2, 8
    zxbcdt = torch.randn(b, 2 * h * p + 2 * g * n + h)
    cut = torch.cumsum(torch.tensor([0, h * p, h * p, g * n, g * n, h]), 0).tolist()
    z, x, B, C, dt = (zxbcdt[:, cut[i]:cut[i + 1]] for i in range(5))
    inp = dict(make(b, h, p, g, n), z=z.view(b, h, p), x=x.view(b, h, p), B=B.view(b, g, n),
               C=C.view(b, g, n), dt=dt)
    assert not inp["x"].is_contiguous()
    y, s, yr, sr = triton_vs_ref(inp, dt_softplus=True)
    assert rel(y, yr) < 1e-5 and rel(s, sr) < 1e-5


def test_triton_state_slice_of_a_cache(poisoned):
    """The state a non-contiguous view (one layer of a (b, layers, h, p, n) cache): only that
    layer changes, as the reference says."""
    b, h, p, g, n = 2, 4, 5, 2, 8
    cache = torch.randn(b, 3, h, p, n)
    before = cache.clone()
    inp = make(b, h, p, g, n)
    y = ssd_state_update(**dict(inp, state=cache[:, 1]), dt_softplus=True, impl="triton")
    s_ref = before[:, 1].double()
    yr = ssd_state_update_ref(**dict(to64(inp), state=s_ref), dt_softplus=True)
    assert rel(y, yr) < 1e-5 and rel(cache[:, 1], s_ref) < 1e-5
    assert torch.equal(cache[:, 0], before[:, 0]) and torch.equal(cache[:, 2], before[:, 2])


def test_triton_entry_point_names_bad_arguments(poisoned):
    inp = make()
    inp["B"] = torch.randn(2, 2, 6)
    with pytest.raises(ValueError, match="ssd_state_update_triton: C must have shape"):
        poisoned.ssd_state_update_triton(**inp)


@pytest.mark.gpu
def test_triton_step_in_a_cuda_graph():
    """Captured once, replayed: the state buffer advances in place at every replay."""
    torch.set_default_device("cuda")
    try:
        inp = make(b=2, h=8, p=64, g=2, n=64, D="h")
        state = inp["state"].clone()
        kw = dict(inp, state=state)
        ssd_state_update(**kw, dt_softplus=True, impl="triton")  # compile outside the capture
        ref_state = state.double()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = ssd_state_update(**kw, dt_softplus=True, impl="triton")
        state.copy_(ref_state)
        for _ in range(3):
            graph.replay()
            yr = ssd_state_update_ref(**dict(to64(inp), state=ref_state), dt_softplus=True)
            assert rel(y, yr) < 1e-5 and rel(state, ref_state) < 1e-5
    finally:
        torch.set_default_device("cpu")
