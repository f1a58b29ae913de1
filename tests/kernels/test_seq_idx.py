"""Packed documents (``seq_idx``) in the Mamba-1 kernels: selective_scan and causal_conv1d.

The property checked everywhere: a packed row gives what its documents give when run one by one
(each from a zero state, the first one from initial_state; the final state is the last
document's), forward and every gradient. The one-by-one runs use the float64 reference without
seq_idx on slices of the same leaf tensors, so autograd sums the shared parameters' gradients
(A, D, delta_bias, weight, bias) over the documents by itself. Each path (ref, chunked, Triton
under the interpreter on CPU) is compared with that, at odd sizes: documents of one token,
document starts on Triton block edges, on the chunked path's chunk edges, on the split paths'
segment and carry-piece edges and next to them.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from hybridseq.kernels import (causal_conv1d, causal_conv1d_ref, causal_conv1d_update_ref,
                               selective_scan, selective_scan_chunked, selective_scan_ref)

sst = importlib.import_module("hybridseq.kernels.scan.triton_scan")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
SCAN_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def seq_from_lengths(*rows):
    """seq_idx (len(rows), l) int32 from each row's document lengths (ids 0, 1, ... shifted by
    the row number, so rows use different ids)."""
    out = []
    for r, lengths in enumerate(rows):
        out.append(torch.cat([torch.full((n,), 3 * r + k, dtype=torch.int32)
                              for k, n in enumerate(lengths)]))
    return torch.stack(out).to(DEV)


def documents(seq_row):
    """[(start, end)] of the documents of one row of seq_idx."""
    s = seq_row.tolist()
    cuts = [0] + [t for t in range(1, len(s)) if s[t] != s[t - 1]] + [len(s)]
    return list(zip(cuts[:-1], cuts[1:]))


def rel(x, ref):
    x, ref = x.detach().double(), ref.detach().double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------------- scan

@pytest.fixture
def tuning():
    """Set TUNING for one test (the rest: None, the heuristic); restored afterwards."""
    saved = dict(sst.TUNING)

    def set_(**kw):
        sst.TUNING.update({k: None for k in sst.TUNING})
        sst.TUNING.update(kw)

    yield set_
    sst.TUNING.clear()
    sst.TUNING.update(saved)


def make_scan(b, l, d, n, groups=None, dtype=torch.float32, h0=True, opts=True):
    bc = (b, l, n) if groups is None else (b, l, groups, n)
    t = {
        "u": torch.randn(b, l, d, device=DEV).to(dtype),
        "delta": (0.5 * torch.randn(b, l, d, device=DEV)).to(dtype),
        "A": -(0.1 + 2 * torch.rand(d, n, device=DEV)),
        "B": torch.randn(*bc, device=DEV).to(dtype),
        "C": torch.randn(*bc, device=DEV).to(dtype),
        "D": torch.randn(d, device=DEV) if opts else None,
        "z": torch.randn(b, l, d, device=DEV).to(dtype) if opts else None,
        "delta_bias": 0.3 * torch.randn(d, device=DEV) if opts else None,
        "initial_state": torch.randn(b, d, n, device=DEV) if h0 else None,
    }
    if dtype == torch.float64:  # the parameters too (else float32, as in the models)
        t = {k: (v.double() if v is not None else None) for k, v in t.items()}
    return {k: (v.requires_grad_() if v is not None else None) for k, v in t.items()}


def _scan_call(fn, t, seq_idx, softplus, **extra):
    return fn(t["u"], t["delta"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"],
              delta_bias=t["delta_bias"], delta_softplus=softplus,
              initial_state=t["initial_state"], return_final_state=True, seq_idx=seq_idx,
              **extra)


def scan_one_by_one(t, seq_idx, softplus):
    """Each document of each row through selective_scan_ref (no seq_idx) on slices of t: the
    first from initial_state, the others from zero. (y (b, l, d), h_last of the last ones)."""
    ys, hs = [], []
    for r in range(t["u"].shape[0]):
        row = []
        for k, (s, e) in enumerate(documents(seq_idx[r])):
            sl = {name: (v[r:r + 1, s:e] if name in ("u", "delta", "B", "C", "z") and v is not None
                         else v) for name, v in t.items()}
            h0 = t["initial_state"]
            sl["initial_state"] = h0[r:r + 1] if (k == 0 and h0 is not None) else None
            y, h = _scan_call(selective_scan_ref, sl, None, softplus)
            row.append(y)
        ys.append(torch.cat(row, dim=1))
        hs.append(h)
    return torch.cat(ys), torch.cat(hs)


def scan_against_one_by_one(fn, t, seq_idx, softplus=True, tol=1e-5, **extra):
    """fn (packed, with seq_idx) against the float64 one-by-one runs: y, h_last and the
    gradient of every input, for a random linear loss on y and h_last."""
    t64 = {k: (v.detach().double().requires_grad_() if v is not None else None)
           for k, v in t.items()}
    y, h = _scan_call(fn, t, seq_idx, softplus, **extra)
    yr, hr = scan_one_by_one(t64, seq_idx, softplus)
    gen = torch.Generator().manual_seed(1)
    gy = torch.randn(yr.shape, generator=gen, dtype=torch.float64).to(DEV)
    gh = torch.randn(hr.shape, generator=gen, dtype=torch.float64).to(DEV)
    ((y.double() * gy).sum() + (h.double() * gh).sum()).backward()
    ((yr * gy).sum() + (hr * gh).sum()).backward()
    res = {"y": (y, yr), "h_last": (h, hr)}
    res.update({"d" + k: (t[k].grad, t64[k].grad) for k in SCAN_NAMES if t[k] is not None})
    for name, (x, r) in res.items():
        assert x is not None, f"no gradient for {name}"
        assert x.shape == r.shape, name
        assert torch.isfinite(x).all(), f"{name}: NaN/inf"
        err = rel(x, r)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


# Document lengths per row (l = their sum): one-token documents, starts on the Triton chunk
# edges of BLOCK_T 4 (4, 8, 12) and next to them, a one-document row, a one-token last document.
LENGTHS_13 = ([4, 1, 3, 2, 2, 1], [13], [1, 1, 11])


def test_ref_packed_equals_one_by_one():
    t = make_scan(3, 13, 4, 3, dtype=torch.float64)
    scan_against_one_by_one(selective_scan_ref, t, seq_from_lengths(*LENGTHS_13), tol=1e-12)


@pytest.mark.parametrize("chunk", [1, 4, 5])
def test_chunked_packed_equals_one_by_one(chunk):
    """Chunk size 4: documents start on chunk edges (4, 8, 12) and inside chunks; 1: every
    step its own chunk; 5: a document of one token alone at a chunk's start (5)."""
    t = make_scan(3, 13, 6, 3, groups=2, dtype=torch.float64)
    scan_against_one_by_one(selective_scan_chunked, t, seq_from_lengths(*LENGTHS_13),
                            tol=1e-12, chunk_size=chunk)


def test_chunked_gradcheck_with_documents():
    t = make_scan(1, 6, 2, 2, dtype=torch.float64)
    seq = seq_from_lengths([2, 1, 3])
    names = [k for k in SCAN_NAMES if t[k] is not None]

    def fn(*xs):
        kw = dict(zip(names, xs))
        y, h = selective_scan_chunked(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"],
                                      D=kw["D"], z=kw["z"], delta_bias=kw["delta_bias"],
                                      delta_softplus=True, initial_state=kw["initial_state"],
                                      return_final_state=True, seq_idx=seq, chunk_size=2)
        return y, h

    assert torch.autograd.gradcheck(fn, tuple(t[k] for k in names))


# (b, lengths, d, n, groups, fwd tuning, bwd tuning, ckpt steps)
TRITON_CASES = {
    # BLOCK_T 4: starts on chunk edges and next to them, one-token documents, a one-doc row
    "block_edges": (LENGTHS_13, 4, 3, None, (4, 4, 2, 4), (4, 2, 2, 4), None),
    # checkpoints every 8 steps with backward chunks of 4: the backward recomputes the states
    # of a checkpoint segment's sub-chunks (CK_R = 2) across document starts
    "ckpt_recompute_grouped": (([3, 5, 1, 7, 3], [8, 8, 3]), 8, 3, 2, (8, 4, 2, 4),
                               (4, 2, 2, 4), 8),
    # every token its own document
    "all_one_token": (([1] * 9,), 4, 2, None, (4, 4, 2, 4), (4, 4, 2, 4), None),
    "seqlen1": (([1], [1]), 4, 4, None, None, None, None),
    "default_blocks_dstate16": (([5, 12], [17]), 3, 16, None, None, None, None),
}


@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_triton_packed_equals_one_by_one(case, tuning):
    lengths, d, n, g, tf, tb, ck = TRITON_CASES[case]
    tuning(fwd=tf, bwd=tb, ckpt=ck)
    seq = seq_from_lengths(*lengths)
    t = make_scan(seq.shape[0], seq.shape[1], d, n, groups=g)
    scan_against_one_by_one(sst.selective_scan_triton, t, seq)


# The sequence split forced, (lengths, d, n, fwd / bwd / carry / fwd-carry tuning, ckpt, S
# (forward, backward), pieces M, expected S). With BLOCK_T 2 and S = 3 over l = 12 the segments
# are [0, 4), [4, 8), [8, 12) and with M = 2 the carry pieces are 2 steps long: document starts
# at a segment start (4, 8), at a piece start (2, 6, 10), one step after one (5, 9) and a
# one-token document; the backward carry reads a_{hi} of the step after each piece.
SPLIT_CASES = {
    "s3_edges": (([2, 2, 1, 3, 1, 3], [5, 4, 3], [12]), 4, 2, (2, 4, 2, 4), (2, 4, 2, 4),
                 (2, 2, 2, 4), (2, 2, 2, 4), None, (3, 3), 2, (3, 3)),
    # no document start in the first segments: carries cross segments, then stop
    "s3_late_starts": (([11, 1], [9, 3]), 4, 2, (2, 4, 2, 4), (2, 4, 2, 4), (2, 2, 2, 4),
                       (2, 2, 2, 4), None, (3, 3), 2, (3, 3)),
    # backward chunks of 4 with checkpoints every 8 (recompute), carry pieces shorter than the
    # carry kernels' chunks, grouped B / C, ragged last segment
    "s2_recompute_grouped": (([7, 1, 4, 5], [8, 9]), 8, 3, (4, 4, 2, 4), (4, 2, 2, 4),
                             (8, 2, 2, 4), (8, 2, 2, 4), 8, (2, 2), 3, (2, 2)),
}


@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_triton_split_packed_equals_one_by_one(case, tuning):
    lengths, d, n, tf, tb, tc, tfc, ck, (sf, sb), m, want = SPLIT_CASES[case]
    groups = 2 if case.endswith("grouped") else None
    tuning(fwd=tf, bwd=tb, ckpt=ck, carry=tc, fwd_carry=tfc, split=sb, fwd_split=sf,
           carry_pieces=m)
    seq = seq_from_lengths(*lengths)
    t = make_scan(seq.shape[0], seq.shape[1], d, n, groups=groups)
    assert (sst.fwd_split(t["u"], t["A"], t["B"], t["C"]),
            sst.bwd_split(t["u"], t["A"], t["B"], t["C"])) == want
    scan_against_one_by_one(sst.selective_scan_triton, t, seq)


def test_triton_split_carry_outputs_are_all_written(tuning, monkeypatch):
    """With every buffer poisoned (NaN, and a nonzero flag for the document-start flags), a
    split run still matches: the carry passes write every piece's flag."""
    monkeypatch.setattr(sst, "POISON_OUTPUTS", True)
    tuning(fwd=(2, 4, 2, 4), bwd=(2, 4, 2, 4), carry=(2, 2, 2, 4), fwd_carry=(2, 2, 2, 4),
           split=3, fwd_split=3, carry_pieces=2)
    seq = seq_from_lengths([12], [3, 9])
    t = make_scan(2, 12, 4, 2)
    scan_against_one_by_one(sst.selective_scan_triton, t, seq)


def test_one_document_equals_no_seq_idx_exactly(tuning):
    """A seq_idx with one document per row gives bit for bit what seq_idx=None gives, on every
    path (the Triton one split too), outputs and gradients."""
    tuning(fwd=(4, 4, 2, 4), bwd=(4, 2, 2, 4), split=2, fwd_split=2, carry_pieces=2)
    t = make_scan(2, 11, 4, 3)
    one = torch.tensor([[3] * 11, [0] * 11], dtype=torch.int64, device=DEV)
    for impl in ("ref", "torch", "triton"):
        outs = []
        for seq in (None, one):
            for v in t.values():
                if v is not None:
                    v.grad = None
            y, h = _scan_call(lambda *a, **k: selective_scan(*a, **k, impl=impl), t, seq, True)
            ((y * torch.cos(y)).sum() + h.sum()).backward()
            outs.append([y, h] + [t[k].grad.clone() for k in SCAN_NAMES if t[k] is not None])
        for a, b in zip(*outs):
            assert torch.equal(a, b), impl


def test_seq_idx_int64_strided_and_dispatcher(tuning):
    """int64 seq_idx, a stride-0 batch (one row expanded), through selective_scan for every impl."""
    tuning(fwd=(4, 4, 2, 4), bwd=(4, 4, 2, 4))
    seq = seq_from_lengths([3, 1, 5]).long().expand(2, -1)
    assert seq.stride(0) == 0
    t = make_scan(2, 9, 4, 2, opts=False)
    for impl in ("ref", "torch", "triton"):
        for v in t.values():
            if v is not None:
                v.grad = None
        scan_against_one_by_one(lambda *a, **k: selective_scan(*a, **k, impl=impl), t, seq)


def test_scan_bad_seq_idx_raises():
    t = make_scan(2, 5, 3, 2, h0=False, opts=False)
    args = [t[k].detach() for k in ("u", "delta", "A", "B", "C")]
    for fn in (selective_scan, selective_scan_ref, selective_scan_chunked,
               sst.selective_scan_triton):
        name = fn.__name__
        with pytest.raises(TypeError, match=f"{name}: seq_idx must be int32 or int64"):
            fn(*args, seq_idx=torch.zeros(2, 5))
        with pytest.raises(ValueError, match=rf"{name}: seq_idx must have shape .*\(2, 5\)"):
            fn(*args, seq_idx=torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="selective_scan: seq_idx is on meta"):
        selective_scan(*args, seq_idx=torch.zeros(2, 5, dtype=torch.int32, device="meta"))


# ----------------------------------------------------------------------------------- conv

@pytest.fixture
def conv_mod(monkeypatch):
    """The Triton conv module with 16-row tiles and 32-row backward chunks, outputs poisoned
    with NaN (an unwritten element fails the comparison)."""
    mod = importlib.import_module("hybridseq.kernels.conv1d.triton_conv")
    monkeypatch.setitem(mod._INTERP_META, "BL", 16)
    monkeypatch.setattr(mod, "BWD_CHUNK_ROWS", 32)
    monkeypatch.setattr(mod, "_alloc", lambda shape, dtype, device: torch.full(
        shape, float("nan"), dtype=dtype, device=device))
    if torch.cuda.is_available():  # a few tiles to autotune among
        monkeypatch.setattr(mod._conv_fwd_tuned, "configs", mod.FWD_CONFIGS[:1])
        monkeypatch.setattr(mod._conv_bwd_tuned, "configs",
                            [c for c in mod.BWD_CONFIGS if c.kwargs["BL"] in (16, 32)
                             and c.num_warps == 4][:2])
        monkeypatch.setattr(mod, "_TUNED", {})
        monkeypatch.setattr(mod, "FWD_PIN", None)
    return mod


def conv_one_by_one(x, weight, bias, act, state, seq_idx):
    """Each document through causal_conv1d_ref (no seq_idx) on slices of x: the first from
    initial_state, the others from zeros. (y, final state of each row's last document)."""
    ys, fs = [], []
    for r in range(x.shape[0]):
        row = []
        for k, (s, e) in enumerate(documents(seq_idx[r])):
            st = state[r:r + 1] if (state is not None and k == 0) else None
            y, f = causal_conv1d_ref(x[r:r + 1, s:e], weight, bias, act, st,
                                     return_final_state=True)
            row.append(y)
        ys.append(torch.cat(row, dim=1))
        fs.append(f)
    return torch.cat(ys), torch.cat(fs)


def conv_against_one_by_one(fn, seq_idx, d, w, bias=True, silu=True, state=True,
                            dtype=torch.float32, tol=1e-5):
    b, l = seq_idx.shape
    x = torch.randn(b, l, d, device=DEV, dtype=dtype, requires_grad=True)
    weight = (torch.randn(d, w, device=DEV, dtype=dtype) / w ** 0.5).requires_grad_()
    bi = torch.randn(d, device=DEV, dtype=dtype, requires_grad=True) if bias else None
    st = torch.randn(b, w - 1, d, device=DEV, dtype=dtype, requires_grad=True) if state else None
    act = "silu" if silu else None
    ins = [v for v in (x, weight, bi, st) if v is not None]
    up = [v.detach().double().requires_grad_() for v in ins]
    upd = dict(zip(["x", "weight"] + (["bias"] if bias else []) + (["state"] if state else []),
                   up))
    y, f = fn(x, weight, bi, act, st, True, seq_idx=seq_idx)
    yr, fr = conv_one_by_one(upd["x"], upd["weight"], upd.get("bias"), act, upd.get("state"),
                             seq_idx)
    gen = torch.Generator().manual_seed(2)
    gy = torch.randn(yr.shape, generator=gen, dtype=torch.float64).to(DEV)
    gf = torch.randn(fr.shape, generator=gen, dtype=torch.float64).to(DEV)
    g = torch.autograd.grad((y.double() * gy).sum() + (f.double() * gf).sum(), ins)
    gr = torch.autograd.grad((yr * gy).sum() + (fr * gf).sum(), up)
    names = ["dx", "dweight"] + (["dbias"] if bias else []) + (["dinitial_state"] if state else [])
    for name, a, r in [("y", y, yr), ("final_state", f, fr)] + list(zip(names, g, gr)):
        assert a.shape == r.shape, name
        assert torch.isfinite(a).all(), f"{name}: NaN/inf"
        if r.numel():
            err = rel(a, r)
            assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


# Document lengths per row: documents shorter than the width (1, 2 tokens), a first document
# shorter than w - 1 (the initial state must not reach the second), starts on the 16-row tile
# edge, a one-document row, a last document shorter than w - 1 (its final state has zeros).
CONV_LENGTHS = ([1, 2, 1, 12, 4, 1], [21], [2, 3, 14, 2])


@pytest.mark.parametrize("w", [1, 2, 3, 4, 5])
def test_conv_ref_packed_equals_one_by_one(w):
    conv_against_one_by_one(causal_conv1d_ref, seq_from_lengths(*CONV_LENGTHS), 3, w,
                            state=w > 1, dtype=torch.float64, tol=1e-12)


# (width, gather, silu, bias, state, lengths, dim): widths 2..4 through both backward variants,
# width 5 (the generic path), l = 32 (two whole 16-row tiles: the forward's EVEN_L path) and
# l = 37 (a ragged tile; backward chunks of 32 rows: a second chunk)
CONV_CASES = [
    (2, 1, True, True, True, CONV_LENGTHS, 8),
    (3, 0, False, True, True, CONV_LENGTHS, 8),
    (4, 1, True, False, True, CONV_LENGTHS, 16),
    (4, 0, True, True, False, CONV_LENGTHS, 8),
    (2, 0, True, False, False, ([16, 1, 15], [32]), 16),
    (4, 1, False, True, True, ([15, 1, 16], [3, 29]), 8),
    (3, 1, True, True, True, ([31, 1, 1, 4], [16, 16, 5]), 8),
    (5, 1, True, True, True, ([1, 3, 4, 21], [29]), 8),
    (5, 0, False, False, True, ([2, 2, 25], [1, 28]), 8),
]


@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_conv_triton_packed_equals_one_by_one(conv_mod, monkeypatch, case):
    w, gather, silu, bias, state, lengths, d = CONV_CASES[case]
    monkeypatch.setitem(conv_mod._INTERP_BWD, "GATHER", gather)
    if case % 2:  # the forward's int64 offsets on alternate cases
        monkeypatch.setattr(conv_mod, "I32_LIMIT", 0)
    seq = seq_from_lengths(*lengths)
    if case % 3 == 1:
        seq = seq.long()

    def fn(*a, **k):
        return causal_conv1d(*a, **k, impl="triton")

    conv_against_one_by_one(fn, seq, d, w, bias=bias, silu=silu, state=state)


def test_conv_one_document_equals_no_seq_idx_exactly(conv_mod):
    x = torch.randn(2, 19, 8, device=DEV, requires_grad=True)
    weight = torch.randn(8, 4, device=DEV, requires_grad=True)
    bias = torch.randn(8, device=DEV, requires_grad=True)
    st = torch.randn(2, 3, 8, device=DEV, requires_grad=True)
    one = torch.tensor([[0] * 19, [5] * 19], dtype=torch.int32, device=DEV)
    for impl in ("ref", "triton"):
        outs = []
        for seq in (None, one):
            y, f = causal_conv1d(x, weight, bias, "silu", st, True, seq_idx=seq, impl=impl)
            g = torch.autograd.grad((y * torch.cos(y)).sum() + f.sum(), (x, weight, bias, st))
            outs.append((y, f) + g)
        for a, b in zip(*outs):
            assert torch.equal(a, b), impl


def test_conv_state_reaches_the_first_document_only():
    """Hand-checkable: width 3, documents [x0] [x1 x2]; the second document sees neither the
    initial state nor x0, and the final state is (x1, x2)."""
    x = torch.tensor([[[1.0], [2.0], [3.0]]], dtype=torch.float64)
    weight = torch.tensor([[100.0, 10.0, 1.0]], dtype=torch.float64)
    st = torch.tensor([[[5.0], [7.0]]], dtype=torch.float64)
    seq = torch.tensor([[4, 9, 9]], dtype=torch.int32)
    y, f = causal_conv1d_ref(x, weight, initial_state=st, return_final_state=True, seq_idx=seq)
    torch.testing.assert_close(y, torch.tensor([[[500 + 70 + 1.0], [2.0], [20 + 3.0]]],
                                               dtype=torch.float64))
    torch.testing.assert_close(f, torch.tensor([[[2.0], [3.0]]], dtype=torch.float64))
    y, f = causal_conv1d_ref(x[:, :2], weight, initial_state=st, return_final_state=True,
                             seq_idx=seq[:, :2])
    torch.testing.assert_close(f, torch.tensor([[[0.0], [2.0]]], dtype=torch.float64))


@pytest.mark.parametrize("w", [2, 4])
def test_conv_decode_continues_the_last_document(w):
    """Prefill a packed row, then decode with causal_conv1d_update from its final state: the
    outputs are those of the last document run alone on the whole of its tokens."""
    d, prefill, steps = 3, [3, 5, 1], 4
    x = torch.randn(1, sum(prefill) + steps, d, dtype=torch.float64)
    weight, bias = torch.randn(d, w, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    seq = seq_from_lengths(prefill).cpu()
    l0 = sum(prefill)
    _, state = causal_conv1d_ref(x[:, :l0], weight, bias, "silu", return_final_state=True,
                                 seq_idx=seq)
    alone = causal_conv1d_ref(x[:, l0 - prefill[-1]:], weight, bias, "silu")
    for k in range(steps):
        y, state = causal_conv1d_update_ref(x[:, l0 + k], state, weight, bias, "silu")
        torch.testing.assert_close(y, alone[:, prefill[-1] + k])


def test_conv_bad_seq_idx_raises(conv_mod):
    x, weight = torch.randn(2, 5, 4), torch.randn(4, 3)
    for fn, name in ((causal_conv1d, "causal_conv1d"), (causal_conv1d_ref, "causal_conv1d_ref"),
                     (conv_mod.causal_conv1d_triton, "causal_conv1d_triton")):
        with pytest.raises(TypeError, match=f"{name}: seq_idx must be int32 or int64"):
            fn(x, weight, seq_idx=torch.zeros(2, 5, dtype=torch.bool))
        with pytest.raises(ValueError, match=rf"{name}: seq_idx must have shape .*\(2, 5\)"):
            fn(x, weight, seq_idx=torch.zeros(5, dtype=torch.int32))
    with pytest.raises(ValueError, match="causal_conv1d: seq_idx is on meta"):
        causal_conv1d(x, weight, seq_idx=torch.zeros(2, 5, dtype=torch.int32, device="meta"))


# The conv kernels with seq_idx through Triton's real compiler for an H100 (sm_90), without a
# GPU: catches what the interpreter lets through (constexpr conditions, loop-carried types).
_COMPILE_CONV_SM90 = r"""
import inspect
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hybridseq.kernels.conv1d import triton_conv as tc

def build(kernel, consts):
    sig = {}
    for p in inspect.signature(kernel.fn).parameters:
        sig[p] = ("constexpr" if p in consts else
                  ("*i32" if p == "q_ptr" else "*bf16") if p.endswith("_ptr") else "i32")
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})

for w in (2, 4, 5):
    for seq in (False, True):
        common = dict(W=w, HAS_BIAS=True, HAS_STATE=True, HAS_SEQ_IDX=seq, SILU=True)
        build(tc._conv_fwd_kernel, dict(common, BL=32, BD=128, EVEN_D=True, EVEN_L=w == 4,
                                        I32=True))
        for gather in (0, 1):
            build(tc._conv_bwd_kernel, dict(common, W_P2=triton.next_power_of_2(w), FAST=True,
                                            BL=16, BD=64, GATHER=gather))
print("compiled")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernels")
def test_conv_kernels_compile_for_sm90():
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
    res = subprocess.run([sys.executable, "-c", _COMPILE_CONV_SM90], env=env, cwd=root,
                         capture_output=True, text=True, timeout=600)
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr.lower():
        pytest.skip("Triton's bundled ptxas is missing")
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]


# ----------------------------------------------------------------------------- GPU, real shapes
def random_lengths(total, mean, gen):
    """Document lengths summing to ``total``: exponential-ish around ``mean``, some of one
    token."""
    out, left = [], total
    while left > 0:
        n = 1 if torch.rand((), generator=gen) < 0.1 else \
            int(torch.empty(()).exponential_(1.0 / mean, generator=gen)) + 1
        out.append(min(n, left))
        left -= out[-1]
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("split", [None, 2, 4])
def test_gpu_scan_packed_real_shape(split, monkeypatch, tuning):
    """B2 D1024 L4096 N16, fp32, documents of ~300 tokens (and one-token ones), every output
    NaN-poisoned, the sequence split automatic or forced both ways: against the chunked path in
    float64 (itself checked against the one-by-one runs above)."""
    monkeypatch.setattr(sst, "POISON_OUTPUTS", True)
    tuning(split=split, fwd_split=split)
    b, l, d, n = 2, 4096, 1024, 16
    gen = torch.Generator().manual_seed(3)
    seq = seq_from_lengths(*(random_lengths(l, 300, gen) for _ in range(b)))
    t = make_scan(b, l, d, n)
    with torch.no_grad():
        t["delta_bias"].sub_(3.0)
    t64 = {k: (v.detach().double().requires_grad_() if v is not None else None)
           for k, v in t.items()}
    y, h = _scan_call(sst.selective_scan_triton, t, seq, True)
    yr, hr = _scan_call(selective_scan_chunked, t64, seq, True)
    gy, gh = torch.randn_like(yr), torch.randn_like(hr)
    ((y.double() * gy).sum() + (h.double() * gh).sum()).backward()
    ((yr * gy).sum() + (hr * gh).sum()).backward()
    for name, a, r in [("y", y, yr), ("h_last", h, hr)] + [
            ("d" + k, t[k].grad, t64[k].grad) for k in SCAN_NAMES]:
        assert torch.isfinite(a).all(), name
        assert rel(a, r) < 1e-4, (name, rel(a, r))


@pytest.mark.gpu
@pytest.mark.parametrize("w", [2, 4])
def test_gpu_conv_packed_real_shape(w, conv_mod):
    """B4 L2048 D1024, bf16 + SiLU with an initial state, documents of ~100 tokens: the
    autotuned kernels against the reference in float64 on the same values."""
    b, l, d = 4, 2048, 1024
    gen = torch.Generator().manual_seed(4)
    seq = seq_from_lengths(*(random_lengths(l, 100, gen) for _ in range(b)))
    ins = [torch.randn(b, l, d, device=DEV, dtype=torch.bfloat16),
           torch.randn(d, w, device=DEV) / w ** 0.5, torch.randn(d, device=DEV),
           torch.randn(b, w - 1, d, device=DEV, dtype=torch.bfloat16)]
    ins = [v.requires_grad_() for v in ins]
    up = [v.detach().double().requires_grad_() for v in ins]
    y, f = causal_conv1d(ins[0], ins[1], ins[2], "silu", ins[3], True, seq_idx=seq,
                         impl="triton")
    yr, fr = causal_conv1d_ref(up[0], up[1], up[2], "silu", up[3], True, seq_idx=seq)
    gy, gf = torch.randn_like(yr), torch.randn_like(fr)
    g = torch.autograd.grad((y.double() * gy).sum() + (f.double() * gf).sum(), ins)
    gr = torch.autograd.grad((yr * gy).sum() + (fr * gf).sum(), up)
    for name, a, r in zip(("y", "final_state", "dx", "dweight", "dbias", "dinitial_state"),
                          (y, f) + g, (yr, fr) + gr):
        assert torch.isfinite(a).all(), name
        assert rel(a, r) < 1e-2, (name, rel(a, r))
