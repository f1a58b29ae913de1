"""ssd_scan_chunked (the CPU training path of the Mamba-2 SSD scan) against ssd_scan_ref: the
outputs and every gradient (through y and h_last, with random upstream gradients) in float64 at
chunk edges, with documents (seq_idx) cut at and between chunk edges, then float32 / bf16
tolerances, extreme decays, chunk-size invariance and memory."""
import pytest
import torch

from hybridseq.kernels import ssd_scan_chunked, ssd_scan_ref

f64 = torch.float64
T = 8  # chunk size of the edge cases
H_, P_, N_ = 4, 3, 5


def make(l, b=2, h=H_, p=P_, g=2, n=N_, dtype=f64, D="h", z=True, dt_bias=True, h0=True,
         softplus=True):
    """Random inputs (requiring grad). Without softplus, dt is kept positive."""
    dt = torch.randn(b, l, h, dtype=dtype)
    kw = dict(
        x=torch.randn(b, l, h, p, dtype=dtype), dt=dt if softplus else dt.abs(),
        A=-torch.rand(h, dtype=dtype) * 2 - 0.1,
        B=torch.randn(b, l, g, n, dtype=dtype), C=torch.randn(b, l, g, n, dtype=dtype),
        D=(torch.randn(h, dtype=dtype) if D == "h" else
           torch.randn(h, p, dtype=dtype) if D == "hp" else None),
        z=torch.randn(b, l, h, p, dtype=dtype) if z else None,
        dt_bias=torch.rand(h, dtype=dtype) * 0.5 if dt_bias else None,
        initial_state=torch.randn(b, h, p, n, dtype=dtype) if h0 else None)
    kw = {k: v.requires_grad_() if v is not None else None for k, v in kw.items()}
    kw["dt_softplus"] = softplus
    return kw


def seq_idx_from(lengths_per_row, dtype=torch.int32):
    """(b, l) seq_idx from document lengths per row (ids 0, 3, 6, ...)."""
    return torch.tensor([sum(([3 * i] * n for i, n in enumerate(r)), []) for r in lengths_per_row],
                        dtype=dtype)


def outputs_and_grads(fn, kw, seed=1):
    y, hl = fn(**kw, return_final_state=True)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=f64)).sum()
               for o in (y, hl))
    names = [k for k, v in kw.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    grads = torch.autograd.grad(loss, [kw[k] for k in names])
    return (y, hl), dict(zip(names, grads))


def assert_close_scaled(actual, expected, rtol, name):
    assert actual is not None, f"{name}: no gradient"
    assert torch.isfinite(actual).all(), f"{name}: not finite"
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol,
                               atol=rtol * max(scale, 1e-3), msg=lambda m: f"{name}: {m}")


def compare(kw, rtol, chunk_size=T, ref_kw=None, **run):
    outs, grads = outputs_and_grads(
        lambda **k: ssd_scan_chunked(**k, **run, chunk_size=chunk_size), kw)
    routs, rgrads = outputs_and_grads(lambda **k: ssd_scan_ref(**k, **run), ref_kw or kw)
    for name, o, r in zip(("y", "h_last"), outs, routs):
        assert o.shape == r.shape, name
        assert_close_scaled(o, r, rtol, name)
    assert set(grads) == set(rgrads)
    for name in grads:
        assert_close_scaled(grads[name], rgrads[name], rtol, f"d{name}")


@pytest.mark.parametrize("l", [1, T - 1, T, T + 1, 3 * T + 5])
@pytest.mark.parametrize("g", [1, 2])
def test_float64_forward_and_all_grads_at_chunk_edges(l, g):
    compare(make(l, g=g), rtol=1e-10)


@pytest.mark.parametrize("opts", [
    dict(D="hp"), dict(D=None), dict(z=False), dict(dt_bias=False), dict(h0=False),
    dict(softplus=False), dict(g=4), dict(D="hp", z=False, h0=False, g=1),
])
def test_float64_options(opts):
    compare(make(2 * T + 3, **opts), rtol=1e-10)


@pytest.mark.parametrize("dt_limit", [(0.05, 0.6), (0.0, float("inf")), (0.3, 0.3)])
def test_dt_limit(dt_limit):
    """The clamp is active on some steps (its gradient is zero there) and not on others."""
    compare(make(2 * T + 1), rtol=1e-10, dt_limit=dt_limit)


@pytest.mark.parametrize("lengths", [
    [[T, T, 5], [2 * T + 5]],                      # boundaries exactly at chunk edges
    [[1, T - 1, 1, 1, T + 3], [3, T, 1, 9]],         # documents of length 1, mid-chunk cuts
    [[1] * (2 * T + 5), [T - 1, 2, T + 4]],          # every step its own document
    [[2 * T + 4, 1], [T + 1, T + 4]],              # a 1-step last document; a cut 1 past an edge
])
def test_documents(lengths):
    kw = make(2 * T + 5)
    for dtype in (torch.int32, torch.int64):
        compare(kw, rtol=1e-10, seq_idx=seq_idx_from(lengths, dtype))


def test_documents_with_every_option():
    kw = make(3 * T + 2, D="hp", g=4)
    compare(kw, rtol=1e-10, seq_idx=seq_idx_from([[5, T, 1, 2 * T - 4], [T, 2 * T + 2]]),
            dt_limit=(0.01, 1.5))


@pytest.mark.parametrize("chunk_size", [1, 3, 16, 1000])
def test_chunk_size_does_not_change_the_result(chunk_size):
    kw = make(37, D="hp")
    compare(kw, rtol=1e-10, chunk_size=chunk_size, seq_idx=seq_idx_from([[10, 27], [37]]))


def _to(kw, dtype):
    return {k: (v.detach().to(dtype).requires_grad_() if isinstance(v, torch.Tensor) else v)
            for k, v in kw.items()}


@pytest.mark.parametrize("chunk_size", [8, 64, 256])
def test_float32_within_tolerance_of_float64_ref(chunk_size):
    kw = make(300, D="hp")
    kw32 = _to(kw, torch.float32)
    seq_idx = seq_idx_from([[100, 56, 144], [300]])
    y, hl = ssd_scan_chunked(**kw32, seq_idx=seq_idx, return_final_state=True)
    assert y.dtype == torch.float32 and hl.dtype == torch.float32
    compare(kw32, rtol=2e-5, chunk_size=chunk_size, ref_kw=kw, seq_idx=seq_idx)


def test_bfloat16_inputs():
    kw = make(33)
    low = _to(kw, torch.bfloat16)
    for k in ("A", "D", "dt_bias", "initial_state"):  # parameters and state stay fp32
        low[k] = kw[k].detach().float().requires_grad_()
    y, hl = ssd_scan_chunked(**low, return_final_state=True)
    assert y.dtype == torch.bfloat16 and hl.dtype == torch.float32
    compare(low, rtol=2e-2, ref_kw=_to(low, f64))  # the reference on the same rounded values


@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_large_decays_are_finite_and_correct(dtype):
    """dt A reaches about -500 per step (the decay underflows to 0 within a step) on some heads
    and about -1e-6 (a memory much longer than a chunk) on another: exp(cumsum) / exp(-cumsum)
    formulations overflow here, and differences of long cumsums cancel."""
    l = 3 * 64 + 7
    kw = make(l, h0=True, dtype=dtype)
    with torch.no_grad():
        kw["dt"].copy_(torch.rand(2, l, H_, dtype=dtype) * 60 - 10)  # softplus up to ~50
        kw["A"].copy_(torch.tensor([-10.0, -1.0, -0.1, -1e-4], dtype=dtype))
        kw["dt"][:, :, 3] = -10.0  # head 3: dt ~ 5e-5, decay ~ 1 - 5e-9
    seq_idx = seq_idx_from([[64, 100, l - 164], [l]])
    compare(kw, rtol=1e-10 if dtype == f64 else 1e-4, chunk_size=64, seq_idx=seq_idx)


def test_gradcheck_tiny():
    kw = make(6, b=1, h=2, p=2, g=1, n=2, D="hp")
    names = [k for k, v in kw.items() if isinstance(v, torch.Tensor)]
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 2]], dtype=torch.int32)

    def fn(*ts):
        return ssd_scan_chunked(**dict(kw, **dict(zip(names, ts))), seq_idx=seq_idx,
                                return_final_state=True, chunk_size=4)

    assert torch.autograd.gradcheck(fn, tuple(kw[k] for k in names))


def test_empty_sequence_and_no_grad():
    kw = make(0)
    y, hl = ssd_scan_chunked(**kw, return_final_state=True)
    assert y.shape == (2, 0, H_, P_)
    torch.testing.assert_close(hl, kw["initial_state"].detach(), rtol=0, atol=0)
    (g,) = torch.autograd.grad(hl.sum(), [kw["initial_state"]])
    torch.testing.assert_close(g, torch.ones_like(g))
    kw = make(11)
    with torch.no_grad():
        y = ssd_scan_chunked(**kw, chunk_size=4)
    torch.testing.assert_close(y, ssd_scan_ref(**kw).detach(), rtol=1e-10, atol=1e-10)


def test_inputs_are_not_modified():
    kw = make(21, D="hp")
    before = {k: v.detach().clone() for k, v in kw.items() if isinstance(v, torch.Tensor)}
    outputs_and_grads(lambda **k: ssd_scan_chunked(**k, chunk_size=8), kw)
    for k, v in before.items():
        assert torch.equal(kw[k].detach(), v), k


def test_memory_is_linear_in_the_chunk_not_per_step_states():
    """What autograd keeps is O(b * l * h * chunk) plus one state per chunk, never a
    (b, l, h, p, n) tensor of per-step states."""
    b, l, h, p, n, chunk = 2, 256, 4, 32, 32, 16
    kw = make(l, b=b, h=h, p=p, g=1, n=n, dtype=torch.float32)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, hl = ssd_scan_chunked(**kw, return_final_state=True, chunk_size=chunk)
    assert saved
    per_step_states = b * l * h * p * n
    assert max(saved) <= max(b * l * h * max(chunk, p), b * (l // chunk) * h * p * n)
    assert sum(saved) < per_step_states / 2
    (y.sum() + hl.sum()).backward()
    assert torch.isfinite(kw["x"].grad).all()


def test_autocast_does_not_change_the_computation():
    kw = make(20, dtype=torch.float32)
    y, hl = ssd_scan_chunked(**kw, return_final_state=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, ha = ssd_scan_chunked(**kw, return_final_state=True)
    assert ya.dtype == torch.float32
    torch.testing.assert_close(ya, y)
    torch.testing.assert_close(ha, hl)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, None])
def test_bad_chunk_size(bad):
    with pytest.raises(ValueError, match="ssd_scan_chunked: chunk_size must be a positive int"):
        ssd_scan_chunked(**make(4), chunk_size=bad)
