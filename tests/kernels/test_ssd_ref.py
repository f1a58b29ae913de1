"""ssd_scan_ref (the Mamba-2 SSD reference) against independent formulas: a hand computation,
the quadratic "attention form" per head, documents run one by one; then the public entry point
ssd_scan: impl dispatch and argument checks."""
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import hybridseq.kernels as K
from hybridseq.kernels import ssd_scan, ssd_scan_ref

f64 = torch.float64


def make(b=2, l=9, h=4, p=3, g=2, n=5, dtype=f64, D="h", z=True, dt_bias=True, h0=True):
    kw = dict(
        x=torch.randn(b, l, h, p, dtype=dtype), dt=torch.randn(b, l, h, dtype=dtype),
        A=-torch.rand(h, dtype=dtype) * 2 - 0.1,
        B=torch.randn(b, l, g, n, dtype=dtype), C=torch.randn(b, l, g, n, dtype=dtype),
        D=(torch.randn(h, dtype=dtype) if D == "h" else
           torch.randn(h, p, dtype=dtype) if D == "hp" else None),
        z=torch.randn(b, l, h, p, dtype=dtype) if z else None,
        dt_bias=torch.randn(h, dtype=dtype) * 0.5 if dt_bias else None,
        initial_state=torch.randn(b, h, p, n, dtype=dtype) if h0 else None)
    return kw


def attention_form(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                   dt_limit=None, initial_state=None):
    """The SSD 'dual' form, float64, written from the math with no recurrence:
    y_t = sum_{s<=t} (prod_{s<k<=t} exp(dt_k A)) (C_t . B_s) dt_s x_s + (prod_{k<=t} exp(dt_k A))
    h0 C_t, and h_last = sum_s (prod_{s<k<l} exp(dt_k A)) dt_s x_s B_s^T + (prod_k ...) h0."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    d = dt.double() + (dt_bias.double() if dt_bias is not None else 0)
    if dt_softplus:
        d = torch.log1p(torch.exp(d))
    if dt_limit is not None:
        d = torch.minimum(torch.maximum(d, torch.tensor(dt_limit[0], dtype=f64)),
                          torch.tensor(dt_limit[1], dtype=f64))
    decay = torch.exp(d * A.double())  # (b, l, h)
    y = torch.zeros(b, l, h, p, dtype=f64)
    hl = torch.zeros(b, h, p, n, dtype=f64)
    for hh in range(h):
        gg = hh // (h // g)
        Bh, Ch = B[:, :, gg].double(), C[:, :, gg].double()  # (b, l, n)
        xs = x[:, :, hh].double() * d[:, :, hh, None]  # dt_s x_s: (b, l, p)
        L = torch.zeros(b, l, l, dtype=f64)
        for t in range(l):
            for s in range(t + 1):
                L[:, t, s] = torch.prod(decay[:, s + 1:t + 1, hh], dim=1)
        y[:, :, hh] = ((L * (Ch @ Bh.transpose(1, 2))) @ xs)
        hl[:, hh] = torch.einsum("bs,bsp,bsn->bpn", L[:, l - 1], xs, Bh)
        if initial_state is not None:
            lead = torch.cumprod(decay[:, :, hh], dim=1)  # prod_{k<=t}
            h0 = initial_state[:, hh].double()  # (b, p, n)
            y[:, :, hh] += lead[:, :, None] * torch.einsum("bpn,btn->btp", h0, Ch)
            hl[:, hh] += lead[:, -1, None, None] * h0
    if D is not None:
        y += (D.double()[:, None] if D.dim() == 1 else D.double()) * x.double()
    if z is not None:
        y = y * z.double() * torch.sigmoid(z.double())
    return y, hl


def test_hand_computed_two_steps():
    # b = h = p = n = 1, g = 1: h1 = dt1 x1 B1, h2 = exp(dt2 A) h1 + dt2 x2 B2
    x = torch.tensor([1.0, 2.0], dtype=f64).view(1, 2, 1, 1)
    dt = torch.tensor([0.5, 1.0], dtype=f64).view(1, 2, 1)
    A = torch.tensor([-1.0], dtype=f64)
    B = torch.tensor([1.0, 0.5], dtype=f64).view(1, 2, 1, 1)
    C = torch.tensor([2.0, 3.0], dtype=f64).view(1, 2, 1, 1)
    D = torch.tensor([0.5], dtype=f64)
    h1 = 0.5 * 1.0 * 1.0
    h2 = math.exp(-1.0) * h1 + 1.0 * 2.0 * 0.5
    y, hl = ssd_scan_ref(x, dt, A, B, C, D=D, return_final_state=True)
    torch.testing.assert_close(y.flatten(), torch.tensor([2 * h1 + 0.5, 3 * h2 + 1.0], dtype=f64),
                               rtol=0, atol=1e-14)
    torch.testing.assert_close(hl.flatten(), torch.tensor([h2], dtype=f64), rtol=0, atol=1e-14)


@pytest.mark.parametrize("opts", [
    dict(),
    dict(dt_softplus=True),
    dict(dt_softplus=True, dt_limit=(0.2, 0.9)),
    dict(D="hp", g=1),
    dict(D=None, z=False, dt_bias=False, h0=False, g=4),
])
def test_matches_attention_form(opts):
    opts = dict(opts)
    run = {k: opts.pop(k) for k in ("dt_softplus", "dt_limit") if k in opts}
    kw = make(**opts)
    if not run.get("dt_softplus"):
        kw["dt"] = kw["dt"].abs()  # keep dt positive without softplus
    y, hl = ssd_scan_ref(**kw, **run, return_final_state=True)
    ye, he = attention_form(**kw, **run)
    torch.testing.assert_close(y, ye, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hl, he, rtol=1e-12, atol=1e-12)


def test_heads_share_their_group():
    """With ngroups = 2 and 4 heads, heads 0, 1 see group 0 and heads 2, 3 group 1: the same as
    ngroups = 4 with each group repeated."""
    kw = make(g=2)
    y = ssd_scan_ref(**kw)
    kw4 = dict(kw, B=kw["B"].repeat_interleave(2, dim=2), C=kw["C"].repeat_interleave(2, dim=2))
    torch.testing.assert_close(y, ssd_scan_ref(**kw4), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_seq_idx_restarts_equal_documents_run_separately(dtype):
    """Each row is a few documents back to back (lengths 3, 1, 5 and 6, 3): the same as running
    each document on its own, the first from initial_state, the others from zero; the final
    state is the last document's."""
    kw = make(l=9)
    rows = [[3, 1, 5], [6, 3]]
    seq_idx = torch.tensor([sum(([i * 7] * n for i, n in enumerate(r)), []) for r in rows],
                           dtype=dtype)
    y, hl = ssd_scan_ref(**kw, dt_softplus=True, seq_idx=seq_idx, return_final_state=True)
    per_row = {k: v for k, v in kw.items() if k in ("A", "D", "dt_bias")}
    for bi, lens in enumerate(rows):
        s = 0
        for di, n in enumerate(lens):
            part = {k: kw[k][bi:bi + 1, s:s + n] for k in ("x", "dt", "B", "C", "z")}
            h0 = kw["initial_state"][bi:bi + 1] if di == 0 else None
            yd, hd = ssd_scan_ref(**part, **per_row, initial_state=h0, dt_softplus=True,
                                  return_final_state=True)
            torch.testing.assert_close(y[bi:bi + 1, s:s + n], yd, rtol=1e-13, atol=1e-13)
            s += n
        torch.testing.assert_close(hl[bi:bi + 1], hd, rtol=1e-13, atol=1e-13)


def test_constant_seq_idx_changes_nothing():
    kw = make()
    y, hl = ssd_scan_ref(**kw, return_final_state=True)
    y2, hl2 = ssd_scan_ref(**kw, seq_idx=torch.full((2, 9), 5, dtype=torch.int32),
                           return_final_state=True)
    torch.testing.assert_close(y, y2, rtol=0, atol=0)
    torch.testing.assert_close(hl, hl2, rtol=0, atol=0)


def test_gradcheck_tiny():
    """The reference's autograd gradients against finite differences, every input."""
    kw = make(b=1, l=4, h=2, p=2, g=1, n=2, D="hp")
    names = [k for k, v in kw.items() if v is not None]
    seq_idx = torch.tensor([[0, 0, 1, 1]], dtype=torch.int32)

    def fn(*ts):
        y, hl = ssd_scan_ref(**dict(zip(names, ts)), dt_softplus=True, dt_limit=(0.1, 5.0),
                             seq_idx=seq_idx, return_final_state=True)
        return y, hl

    assert torch.autograd.gradcheck(fn, tuple(kw[k].requires_grad_() for k in names))


def test_dtypes_and_empty_sequence():
    kw = make(dtype=torch.bfloat16)
    kw["A"] = kw["A"].float()
    kw["initial_state"] = kw["initial_state"].float()
    y, hl = ssd_scan_ref(**kw, return_final_state=True)
    assert y.dtype == torch.bfloat16 and hl.dtype == torch.float32
    ye, he = attention_form(**kw)
    torch.testing.assert_close(y.double(), ye, rtol=2e-2, atol=2e-2 * ye.abs().max().item())
    torch.testing.assert_close(hl.double(), he, rtol=1e-5, atol=1e-5)
    kw0 = make(l=0)
    y0, h0 = ssd_scan_ref(**kw0, return_final_state=True)
    assert y0.shape == (2, 0, 4, 3)
    torch.testing.assert_close(h0, kw0["initial_state"], rtol=0, atol=0)


# ----------------------------------------------------------- the entry point: dispatch, checks

@pytest.mark.parametrize("impl", ["auto", "torch", "ref"])
def test_ssd_scan_impls_agree_with_ref(impl):
    kw = make(dtype=torch.float32)
    seq_idx = torch.tensor([[0] * 4 + [1] * 5, [2] * 9], dtype=torch.int32)
    run = dict(dt_softplus=True, dt_limit=(0.0, 3.0), seq_idx=seq_idx, return_final_state=True)
    y, hl = ssd_scan(**kw, **run, chunk_size=4, impl=impl)
    yr, hr = ssd_scan_ref(**kw, **run)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hl, hr, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl, target", [("auto", "ssd_scan_chunked"),
                                          ("torch", "ssd_scan_chunked"),
                                          ("ref", "ssd_scan_ref")])
def test_dispatch_on_cpu(monkeypatch, impl, target):
    import hybridseq.kernels.ssd as ssd

    calls = []
    real = getattr(ssd, target)
    monkeypatch.setattr(ssd, target, lambda *a, **k: calls.append(k) or real(*a, **k))
    ssd_scan(**make(), chunk_size=3, impl=impl)
    assert len(calls) == 1
    assert ("chunk_size" in calls[0]) == (target == "ssd_scan_chunked")


def test_triton_dispatch_passes_every_argument(monkeypatch):
    """impl='triton' (CPU tensors: needs the interpreter) calls triton_ssd.ssd_scan_triton with
    the contract's keywords; a stand-in module records the call."""
    if not K.triton_available():
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    fake = types.ModuleType("hybridseq.kernels.ssd.triton_ssd")
    fake.ssd_scan_triton = lambda *a, **k: calls.append((a, k)) or "T"
    monkeypatch.setitem(sys.modules, "hybridseq.kernels.ssd.triton_ssd", fake)
    kw = make(dtype=torch.float32)  # the kernels take 16/32-bit floats (float64 stays on torch)
    seq_idx = torch.zeros(2, 9, dtype=torch.int32)
    out = ssd_scan(**kw, dt_softplus=True, dt_limit=(0.1, 2.0), seq_idx=seq_idx,
                   return_final_state=True, chunk_size=64, impl="triton")
    assert out == "T" and len(calls) == 1
    a, k = calls[0]
    assert all(t is kw[n] for t, n in zip(a, ["x", "dt", "A", "B", "C"]))
    assert set(k) == {"D", "z", "dt_bias", "dt_softplus", "dt_limit", "initial_state", "seq_idx",
                      "return_final_state", "chunk_size"}
    assert k["D"] is kw["D"] and k["z"] is kw["z"] and k["initial_state"] is kw["initial_state"]
    assert k["seq_idx"] is seq_idx and k["dt_limit"] == (0.1, 2.0) and k["chunk_size"] == 64
    assert k["dt_softplus"] is True and k["return_final_state"] is True


def test_auto_keeps_float64_on_torch_and_triton_refuses_it(monkeypatch):
    from hybridseq.kernels import backend

    monkeypatch.setattr(backend, "_is_cuda", lambda where: True)  # as if on a GPU
    with pytest.raises(ValueError, match="outside the Triton kernel's limits"):
        ssd_scan(**make(), impl="triton")
    monkeypatch.setattr(backend, "_STATUS", [(True, "")])
    kw = make()
    y = ssd_scan(**kw, impl="auto")  # float64: the chunked path, not the kernels
    torch.testing.assert_close(y, ssd_scan(**kw, impl="torch"))


def test_bad_impl_and_triton_without_interpreter(monkeypatch):
    from hybridseq.kernels import backend

    with pytest.raises(ValueError, match=r"ssd_scan impl must be one of"):
        ssd_scan(**make(), impl="cuda")
    monkeypatch.setattr(backend, "_STATUS", [(True, "")])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ssd_scan(**make(), impl="triton")


@pytest.mark.parametrize("change, exc, match", [
    (dict(dt=torch.randn(2, 9, 3)), ValueError, r"ssd_scan: dt must have shape \(batch, seqlen, "
                                                r"nheads\) = \(2, 9, 4\), got \(2, 9, 3\)"),
    (dict(A=torch.randn(4, 5)), ValueError, r"ssd_scan: A must have shape \(nheads,\)"),
    (dict(B=torch.randn(2, 9, 3, 5, dtype=f64)), ValueError,
     "ssd_scan: B has 3 groups, which must divide nheads=4"),
    (dict(C=torch.randn(2, 9, 2, 4, dtype=f64)), ValueError,
     r"ssd_scan: C must have shape .*like B, got \(2, 9, 2, 4\)"),
    (dict(D=torch.randn(4, 2)), ValueError, r"ssd_scan: D must have shape \(nheads,\) = \(4,\) "
                                            r"or \(nheads, headdim\) = \(4, 3\)"),
    (dict(z=torch.randn(2, 9, 4, 2)), ValueError, "ssd_scan: z must have shape"),
    (dict(dt_bias=torch.randn(5)), ValueError, "ssd_scan: dt_bias must have shape"),
    (dict(initial_state=torch.randn(2, 4, 5, 3)), ValueError,
     r"initial_state must have shape \(batch, nheads, headdim, dstate\) = \(2, 4, 3, 5\)"),
    (dict(x=torch.randn(2, 9, 4, 3).long()), TypeError, "ssd_scan: x must be float16"),
    (dict(seq_idx=torch.zeros(2, 9)), TypeError, "ssd_scan: seq_idx must be int32 or int64"),
    (dict(seq_idx=torch.zeros(2, 8, dtype=torch.int32)), ValueError,
     r"seq_idx must have shape \(batch, seqlen\) = \(2, 9\), got \(2, 8\)"),
    (dict(seq_idx=torch.tensor([[0] * 5 + [1] * 4, [1] * 5 + [0] * 4], dtype=torch.int32)),
     ValueError, "seq_idx must be non-decreasing"),
    (dict(dt_limit=(1.0, 0.5)), ValueError, r"dt_limit must be a pair \(lo, hi\) with lo <= hi"),
    (dict(dt_limit=0.5), TypeError, "dt_limit must be None or a pair"),
    (dict(dt_limit=(0.1, 0.2, 0.3)), TypeError, "dt_limit must be None or a pair"),
    (dict(chunk_size=0), ValueError, "ssd_scan: chunk_size must be a positive int"),
    (dict(chunk_size=True), ValueError, "ssd_scan: chunk_size must be a positive int"),
])
def test_argument_checks(change, exc, match):
    kw = make()
    kw.update(change)
    with pytest.raises(exc, match=match):
        ssd_scan(**kw)


def test_reference_names_itself_in_errors():
    kw = make()
    kw["dt"] = kw["dt"][:, :5]
    with pytest.raises(ValueError, match="ssd_scan_ref: dt must have shape"):
        ssd_scan_ref(**kw)


def test_inputs_not_modified_and_softplus_matches_torch():
    kw = make()
    before = {k: v.clone() for k, v in kw.items()}
    y = ssd_scan_ref(**kw, dt_softplus=True)
    for k, v in kw.items():
        assert torch.equal(v, before[k]), k
    # softplus(dt + bias) given explicitly, no softplus inside: the same result
    kw2 = dict(kw, dt=F.softplus(kw["dt"] + kw["dt_bias"]), dt_bias=None)
    torch.testing.assert_close(ssd_scan_ref(**kw2), y, rtol=1e-13, atol=1e-13)
