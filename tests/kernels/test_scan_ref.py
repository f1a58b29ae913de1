"""selective_scan_ref: the sequential definition, checked against hand-computed values and
against the contract's algebraic properties (grouping, state hand-off, dtypes, errors)."""
import math

import pytest
import torch
import torch.nn.functional as F

from hybridseq.kernels import selective_scan_ref


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_hand_computed_two_steps_with_D():
    # b=1, l=2, d=1, n=1, no softplus, no bias
    u = _t([[[1.0], [2.0]]])
    delta = _t([[[0.5], [1.0]]])
    A = _t([[-1.0]])
    B = _t([[[1.0], [0.5]]])
    C = _t([[[2.0], [3.0]]])
    D = _t([0.5])
    h1 = 0.5 * 1.0 * 1.0
    y1 = 2.0 * h1 + 0.5 * 1.0
    h2 = math.exp(-1.0) * h1 + 1.0 * 0.5 * 2.0
    y2 = 3.0 * h2 + 0.5 * 2.0
    y, h = selective_scan_ref(u, delta, A, B, C, D=D, return_final_state=True)
    torch.testing.assert_close(y, _t([[[y1], [y2]]]), rtol=0, atol=1e-14)
    torch.testing.assert_close(h, _t([[[h2]]]), rtol=0, atol=1e-14)


def test_hand_computed_all_options_two_states():
    # b=1, l=2, d=1, n=2 with delta_bias, softplus, z gating and an initial state
    u = _t([[[1.5], [-1.0]]])
    delta = _t([[[0.2], [-0.7]]])
    bias = _t([0.1])
    A = _t([[-1.0, -2.0]])
    B = _t([[[1.0, -1.0], [0.5, 2.0]]])
    C = _t([[[0.3, 0.4], [-1.0, 0.25]]])
    z = _t([[[0.8], [-0.3]]])
    h0 = _t([[[0.5, -0.25]]])

    def sp(x):
        return math.log1p(math.exp(x))

    def silu(x):
        return x / (1 + math.exp(-x))

    h = [0.5, -0.25]
    ys = []
    for t in range(2):
        dt = sp(delta[0, t, 0].item() + 0.1)
        ut = u[0, t, 0].item()
        h = [math.exp(dt * A[0, k].item()) * h[k] + dt * B[0, t, k].item() * ut for k in range(2)]
        yt = sum(C[0, t, k].item() * h[k] for k in range(2))
        ys.append(yt * silu(z[0, t, 0].item()))
    y, hl = selective_scan_ref(u, delta, A, B, C, z=z, delta_bias=bias, delta_softplus=True,
                               initial_state=h0, return_final_state=True)
    torch.testing.assert_close(y, _t([[[ys[0]], [ys[1]]]]), rtol=0, atol=1e-14)
    torch.testing.assert_close(hl, _t([[h]]), rtol=0, atol=1e-14)


def _inputs(b=2, l=9, d=6, n=4, dtype=torch.float64):
    return (torch.randn(b, l, d, dtype=dtype), torch.rand(b, l, d, dtype=dtype),
            -torch.rand(d, n, dtype=dtype) * 2, torch.randn(b, l, n, dtype=dtype),
            torch.randn(b, l, n, dtype=dtype))


def test_groups_equal_per_group_scans():
    b, l, d, n, g = 2, 9, 6, 4, 3
    u, delta, A, _, _ = _inputs(b, l, d, n)
    B = torch.randn(b, l, g, n, dtype=torch.float64)
    C = torch.randn(b, l, g, n, dtype=torch.float64)
    y = selective_scan_ref(u, delta, A, B, C)
    k = d // g
    for i in range(g):
        sl = slice(i * k, (i + 1) * k)
        yi = selective_scan_ref(u[..., sl], delta[..., sl], A[sl], B[:, :, i], C[:, :, i])
        torch.testing.assert_close(y[..., sl], yi, rtol=1e-12, atol=1e-12)


def test_one_group_equals_ungrouped():
    u, delta, A, B, C = _inputs()
    torch.testing.assert_close(selective_scan_ref(u, delta, A, B, C),
                               selective_scan_ref(u, delta, A, B[:, :, None], C[:, :, None]))


def test_state_handoff_equals_whole_sequence():
    u, delta, A, B, C = _inputs(l=11)
    D = torch.randn(6, dtype=torch.float64)
    y, h = selective_scan_ref(u, delta, A, B, C, D=D, return_final_state=True)
    y1, h1 = selective_scan_ref(u[:, :4], delta[:, :4], A, B[:, :4], C[:, :4], D=D,
                                return_final_state=True)
    y2, h2 = selective_scan_ref(u[:, 4:], delta[:, 4:], A, B[:, 4:], C[:, 4:], D=D,
                                initial_state=h1, return_final_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)
    torch.testing.assert_close(h2, h)


def test_softplus_and_bias_equal_precomputed_dt():
    u, delta, A, B, C = _inputs()
    delta = torch.randn_like(delta)
    bias = torch.randn(6, dtype=torch.float64)
    y = selective_scan_ref(u, delta, A, B, C, delta_bias=bias, delta_softplus=True)
    torch.testing.assert_close(y, selective_scan_ref(u, F.softplus(delta + bias), A, B, C))


def test_low_precision_inputs_fp32_state():
    u, delta, A, B, C = (t.float() for t in _inputs())
    y, h = selective_scan_ref(u.bfloat16(), delta.bfloat16(), A, B.bfloat16(), C.bfloat16(),
                              return_final_state=True)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    y32 = selective_scan_ref(u.bfloat16().float(), delta.bfloat16().float(), A,
                             B.bfloat16().float(), C.bfloat16().float())
    torch.testing.assert_close(y.float(), y32, rtol=1e-2, atol=1e-2)


def test_gradients_reach_every_input():
    u, delta, A, B, C = _inputs(l=5)
    extra = dict(D=torch.randn(6, dtype=torch.float64), z=torch.randn_like(u),
                 delta_bias=torch.randn(6, dtype=torch.float64),
                 initial_state=torch.randn(2, 6, 4, dtype=torch.float64))
    ins = [u, delta, A, B, C, *extra.values()]
    for t in ins:
        t.requires_grad_(True)
    y, h = selective_scan_ref(u, delta, A, B, C, **extra, delta_softplus=True,
                              return_final_state=True)
    grads = torch.autograd.grad(y.sum() + h.sum(), ins)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(delta=torch.zeros(2, 9, 5)), "delta must have shape"),
        (dict(A=torch.zeros(6)), "A must have shape"),
        (dict(B=torch.zeros(2, 9, 5)), "B has dstate 5"),
        (dict(B=torch.zeros(2, 9, 4, 4)), "B has 4 groups"),
        (dict(C=torch.zeros(2, 8, 4)), "C must have shape"),
        (dict(D=torch.zeros(5)), "D must have shape"),
        (dict(z=torch.zeros(2, 9, 5)), "z must have shape"),
        (dict(delta_bias=torch.zeros(6, 1)), "delta_bias must have shape"),
        (dict(initial_state=torch.zeros(2, 4, 6)), "initial_state must have shape"),
        (dict(u=torch.zeros(2, 9, 6, dtype=torch.int64)), "u must be float16"),
        (dict(u=torch.zeros(9, 6)), "u must have shape"),
    ],
)
def test_bad_arguments_name_the_argument(change, message):
    u, delta, A, B, C = (t.float() for t in _inputs())
    kw = dict(u=u, delta=delta, A=A, B=B, C=C)
    kw.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        selective_scan_ref(**kw)
