"""The public kernel entry points: exports, impl dispatch, its errors, argument checks."""
import os
import subprocess
import sys

import pytest
import torch

import hybridseq.kernels as K
from hybridseq.kernels import backend, scan

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def scan_inputs(b=2, l=7, d=4, n=3, g=None):
    bc = (b, l, n) if g is None else (b, l, g, n)
    return (torch.randn(b, l, d), torch.rand(b, l, d), -torch.rand(d, n),
            torch.randn(bc), torch.randn(bc))


def test_exports():
    for name in ["selective_scan", "selective_scan_ref", "causal_conv1d", "causal_conv1d_ref",
                 "causal_conv1d_update", "causal_conv1d_update_ref", "selective_state_update",
                 "selective_state_update_ref", "triton_available"]:
        assert callable(getattr(K, name)), name
    assert isinstance(K.triton_available(), bool)


def test_import_does_not_import_triton():
    code = ("import sys, hybridseq.kernels as K; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "assert 'hybridseq.kernels.scan.triton_scan' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("impl", ["auto", "torch", "ref"])
def test_selective_scan_impls_agree_with_ref(impl):
    u, delta, A, B, C = scan_inputs(g=2)
    D, z, bias, h0 = torch.randn(4), torch.randn(2, 7, 4), torch.randn(4), torch.randn(2, 4, 3)
    kw = dict(D=D, z=z, delta_bias=bias, delta_softplus=True, initial_state=h0,
              return_final_state=True)
    y, h = K.selective_scan(u, delta, A, B, C, **kw, impl=impl)
    yr, hr = K.selective_scan_ref(u, delta, A, B, C, **kw)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, hr, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl, target", [("auto", "selective_scan_chunked"),
                                          ("torch", "selective_scan_chunked"),
                                          ("ref", "selective_scan_ref")])
def test_selective_scan_dispatch_on_cpu(monkeypatch, impl, target):
    calls = []
    real = getattr(scan, target)

    def spy(*a, **k):
        calls.append(target)
        return real(*a, **k)

    monkeypatch.setattr(scan, target, spy)
    K.selective_scan(*scan_inputs(), impl=impl)
    assert calls == [target]


def test_triton_impl_dispatches_to_the_triton_module(monkeypatch):
    """Under TRITON_INTERPRET=1 impl='triton' calls kernels/scan/triton_scan.py."""
    if not K.triton_available():
        pytest.skip("triton is not installed")
    import importlib

    mod = importlib.import_module("hybridseq.kernels.scan.triton_scan")
    calls = []
    monkeypatch.setattr(mod, "run_selective_scan_triton", lambda *a, **k: calls.append(k) or "T")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert K.selective_scan(*scan_inputs(), delta_softplus=True, impl="triton") == "T"
    assert calls and calls[0]["delta_softplus"] is True


def test_bad_impl_is_a_clear_error():
    with pytest.raises(ValueError, match=r"impl must be one of .*'cuda'"):
        K.selective_scan(*scan_inputs(), impl="cuda")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(backend, "_STATUS", [(True, "")])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        K.selective_scan(*scan_inputs(), impl="triton")


def test_triton_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(backend, "_STATUS", [(False, "the 'triton' package is not installed")])
    with pytest.raises(RuntimeError, match="Triton is unavailable: the 'triton' package"):
        K.selective_scan(*scan_inputs(), impl="triton")
    # auto falls back to the torch path
    y = K.selective_scan(*scan_inputs(), impl="auto")
    assert y.shape == (2, 7, 4)


def test_selective_scan_checks_shapes():
    u, delta, A, B, C = scan_inputs()
    with pytest.raises(ValueError, match=r"selective_scan: delta must have shape .*got \(2, 6, 4\)"):
        K.selective_scan(u, delta[:, :6], A, B, C)
    with pytest.raises(ValueError, match="selective_scan: B has 3 groups, which must divide dim=4"):
        K.selective_scan(u, delta, A, torch.randn(2, 7, 3, 3), C)
    with pytest.raises(TypeError, match="selective_scan: A must be float16"):
        K.selective_scan(u, delta, A.long(), B, C)
    with pytest.raises(ValueError, match="initial_state must have shape"):
        K.selective_scan(u, delta, A, B, C, initial_state=torch.zeros(2, 3, 4))


def test_causal_conv1d_dispatch_and_checks():
    x, w, bias = torch.randn(2, 9, 5), torch.randn(5, 4), torch.randn(5)
    s0 = torch.randn(2, 3, 5)
    for impl in ("auto", "torch", "ref"):
        y, s = K.causal_conv1d(x, w, bias, activation="silu", initial_state=s0,
                               return_final_state=True, impl=impl)
        yr, sr = K.causal_conv1d_ref(x, w, bias, activation="silu", initial_state=s0,
                                     return_final_state=True)
        torch.testing.assert_close(y, yr)
        torch.testing.assert_close(s, sr)
    with pytest.raises(ValueError, match="causal_conv1d: weight must have shape"):
        K.causal_conv1d(x, torch.randn(4, 4))
    with pytest.raises(ValueError, match="activation must be None or 'silu'"):
        K.causal_conv1d(x, w, activation="relu")
    with pytest.raises(ValueError, match="impl must be one of"):
        K.causal_conv1d(x, w, impl="fast")


def test_causal_conv1d_update_dispatch_and_checks():
    x, state, w = torch.randn(2, 5), torch.randn(2, 3, 5), torch.randn(5, 4)
    y, s = K.causal_conv1d_update(x, state, w, impl="torch")
    yr, sr = K.causal_conv1d_update_ref(x, state, w)
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(s, sr)
    with pytest.raises(ValueError, match="conv_state must have shape"):
        K.causal_conv1d_update(x, torch.randn(2, 2, 5), w)


def test_selective_state_update_dispatch_and_checks():
    b, d, n = 2, 4, 3
    state, x, dt = torch.randn(b, d, n), torch.randn(b, d), torch.rand(b, d)
    A, B, C = -torch.rand(d, n), torch.randn(b, n), torch.randn(b, n)
    y, s = K.selective_state_update(state, x, dt, A, B, C, D=torch.randn(d), impl="torch")
    assert y.shape == (b, d) and s.shape == (b, d, n)
    # one step of the state update equals a length-1 scan from that state
    ys, hs = K.selective_scan_ref(x[:, None], dt[:, None], A, B[:, None], C[:, None],
                                  initial_state=state, return_final_state=True)
    y0, s0 = K.selective_state_update(state, x, dt, A, B, C, impl="ref")
    torch.testing.assert_close(y0, ys[:, 0])
    torch.testing.assert_close(s0, hs)
    with pytest.raises(ValueError, match="state must have shape"):
        K.selective_state_update(state[:, :, :2], x, dt, A, B, C)
    with pytest.raises(ValueError, match="dt must have shape"):
        K.selective_state_update(state, x, dt[:, :3], A, B, C)
