"""One-token selective-state update (decode step): the reference against one step of the
sequential selective scan, and the Triton kernel (interpreter on CPU) against the reference."""
from __future__ import annotations

import importlib

import pytest
import torch

from hybridseq.kernels import selective_scan_ref, selective_state_update, selective_state_update_ref


def make_inputs(b, d, n, g=None, dtype=torch.float32, D=True, z=True, dt_bias=True):
    bc_shape = (b, n) if g is None else (b, g, n)
    return dict(
        state=torch.randn(b, d, n),
        x=torch.randn(b, d, dtype=dtype),
        dt=torch.randn(b, d, dtype=dtype),
        A=-torch.rand(d, n) * 2 - 0.1,
        B=torch.randn(*bc_shape, dtype=dtype),
        C=torch.randn(*bc_shape, dtype=dtype),
        D=torch.randn(d) if D else None,
        z=torch.randn(b, d, dtype=dtype) if z else None,
        dt_bias=torch.randn(d) * 0.5 if dt_bias else None,
    )


def scan_one_step(inp, softplus):
    """selective_scan_ref on a length-1 sequence starting from the state."""
    y, h = selective_scan_ref(
        inp["x"][:, None], inp["dt"][:, None], inp["A"], inp["B"][:, None], inp["C"][:, None],
        D=inp["D"], z=None if inp["z"] is None else inp["z"][:, None], delta_bias=inp["dt_bias"],
        delta_softplus=softplus, initial_state=inp["state"], return_final_state=True)
    return y[:, 0], h


def to64(inp):
    return {k: (v.double() if v is not None else None) for k, v in inp.items()}


@pytest.mark.parametrize("g", [None, 1, 3])
@pytest.mark.parametrize("softplus", [False, True])
def test_ref_equals_one_scan_step(g, softplus):
    inp = to64(make_inputs(2, 6, 5, g))
    y, h = selective_state_update_ref(**inp, dt_softplus=softplus)
    yr, hr = scan_one_step(inp, softplus)
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(h, hr)


def test_ref_steps_equal_scan():
    """Several update steps from a prefilled state equal the scan over the whole sequence."""
    b, l, d, n, l0 = 2, 7, 4, 3, 3
    u, delta, z = torch.randn(b, l, d), torch.randn(b, l, d), torch.randn(b, l, d)
    A, B, C = -torch.rand(d, n), torch.randn(b, l, n), torch.randn(b, l, n)
    Dv, db = torch.randn(d), torch.randn(d)
    full = selective_scan_ref(u, delta, A, B, C, Dv, z, db, True)
    _, h = selective_scan_ref(u[:, :l0], delta[:, :l0], A, B[:, :l0], C[:, :l0], Dv, z[:, :l0],
                              db, True, return_final_state=True)
    for t in range(l0, l):
        y, h = selective_state_update_ref(h, u[:, t], delta[:, t], A, B[:, t], C[:, t], Dv,
                                          z[:, t], db, True)
        torch.testing.assert_close(y, full[:, t], rtol=1e-5, atol=1e-5)


def test_ref_optional_terms_and_functional():
    inp = make_inputs(2, 4, 3, D=False, z=False, dt_bias=False)
    keep = inp["state"].clone()
    y, h = selective_state_update_ref(**inp)
    dt = inp["dt"][:, :, None]
    h_exp = torch.exp(dt * inp["A"]) * keep + dt * inp["B"][:, None] * inp["x"][:, :, None]
    torch.testing.assert_close(h, h_exp)
    torch.testing.assert_close(y, (h_exp * inp["C"][:, None]).sum(-1))
    torch.testing.assert_close(inp["state"], keep, rtol=0, atol=0)


# ------------------------------------------------- Triton (interpreter on CPU, compiled on CUDA)

@pytest.fixture
def poisoned(monkeypatch):
    """The Triton module with outputs pre-filled with NaN (catches unwritten elements). Tensors
    made inside the test live on CUDA when there is one (compiled kernels), else on the CPU
    (interpreter, TRITON_INTERPRET=1 from conftest)."""
    mod = importlib.import_module("hybridseq.kernels.scan.step_triton")
    monkeypatch.setattr(mod, "_alloc", lambda shape, dtype, device: torch.full(
        shape, float("nan"), dtype=dtype, device=device))
    torch.set_default_device("cuda" if torch.cuda.is_available() else "cpu")
    yield mod
    torch.set_default_device("cpu")


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values (unwritten output?)"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("n", [1, 5, 16])
@pytest.mark.parametrize("g", [None, 2])
def test_triton_matches_ref_fp32(poisoned, n, g):
    inp = make_inputs(3, 20, n, g)  # 20 channels: two programs, the second partly masked
    keep = inp["state"].clone()
    y, h = selective_state_update(**inp, dt_softplus=True, impl="triton")
    yr, hr = selective_state_update_ref(**to64(inp), dt_softplus=True)
    assert y.dtype == torch.float32 and h.dtype == torch.float32 and h.shape == (3, 20, n)
    assert rel(y, yr) < 1e-5 and rel(h, hr) < 1e-5
    torch.testing.assert_close(inp["state"], keep, rtol=0, atol=0)


def test_triton_bf16_no_optionals(poisoned):
    inp = make_inputs(2, 16, 8, g=4, dtype=torch.bfloat16, D=False, z=False, dt_bias=False)
    inp["dt"] = inp["dt"].abs() * 0.1  # no softplus: keep dt positive
    y, h = selective_state_update(**inp, impl="triton")
    yr, hr = selective_state_update_ref(**to64(inp))
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    assert rel(y, yr) < 1e-2 and rel(h, hr) < 1e-5


def test_triton_softplus_extremes(poisoned):
    """softplus at large |dt| (exp overflow / log1p underflow) stays finite and exact."""
    inp = make_inputs(1, 8, 4)
    inp["dt"] = torch.tensor([[-90.0, -30.0, -8.0, -1e-3, 0.0, 2.0, 25.0, 90.0]])
    inp["dt_bias"] = None
    y, h = selective_state_update(**inp, dt_softplus=True, impl="triton")
    yr, hr = selective_state_update_ref(**to64(inp), dt_softplus=True)
    assert rel(h, hr) < 1e-6 and rel(y, yr) < 1e-6


def test_triton_strided_inputs(poisoned):
    """x, dt, B, C as slices of wider projections, as the Mamba block produces them."""
    b, d, n = 2, 12, 4
    xz = torch.randn(b, 2 * d)
    dbc = torch.randn(b, d + 2 * n)
    inp = make_inputs(b, d, n)
    inp.update(x=xz[:, :d], z=xz[:, d:], dt=dbc[:, :d], B=dbc[:, d:d + n], C=dbc[:, d + n:])
    y, h = selective_state_update(**inp, dt_softplus=True, impl="triton")
    yr, hr = selective_state_update_ref(**to64(inp), dt_softplus=True)
    assert rel(y, yr) < 1e-5 and rel(h, hr) < 1e-5


def test_bad_groups_raise():
    inp = make_inputs(2, 6, 3)
    inp["B"] = torch.randn(2, 4, 3)  # 4 groups do not divide 6 channels
    with pytest.raises(ValueError, match="groups"):
        selective_state_update_ref(**inp)


def test_triton_entry_point_names_bad_arguments(poisoned):
    inp = make_inputs(2, 6, 3)
    inp["B"] = torch.randn(2, 5)
    with pytest.raises(ValueError, match="B has dstate 5"):
        poisoned.selective_state_update_triton(**inp)
