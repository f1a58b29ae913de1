"""Causal depthwise conv1d: the reference against its definition, decoding against prefill, and
the Triton kernels (interpreter on CPU) against the reference, forward and every gradient."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from hybridseq.kernels import (
    causal_conv1d,
    causal_conv1d_ref,
    causal_conv1d_update,
    causal_conv1d_update_ref,
)


def loop_conv(x, weight, bias, silu, state):
    """The definition, one output element at a time (float64)."""
    b, l, d = x.shape
    w = weight.shape[1]
    xc = torch.cat([state if state is not None else x.new_zeros(b, w - 1, d), x], dim=1).double()
    y = torch.zeros(b, l, d, dtype=torch.float64)
    for t in range(l):
        for k in range(w):
            # tap k reads the input k - (w - 1) steps from t: xc index t + k
            y[:, t, :] += weight[:, k].double() * xc[:, t + k, :]
    if bias is not None:
        y += bias.double()
    return F.silu(y) if silu else y


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values (unwritten output?)"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("w", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("l", [1, 2, 7])
def test_ref_matches_definition(w, l):
    b, d = 2, 3
    x = torch.randn(b, l, d, dtype=torch.float64)
    weight = torch.randn(d, w, dtype=torch.float64)
    bias = torch.randn(d, dtype=torch.float64)
    state = torch.randn(b, w - 1, d, dtype=torch.float64)
    for silu in (False, True):
        for st in (None, state):
            y = causal_conv1d_ref(x, weight, bias, "silu" if silu else None, st)
            torch.testing.assert_close(y, loop_conv(x, weight, bias, silu, st))
    # and against torch's own conv1d (no state): weight[:, -1] multiplies the current token
    ref = F.conv1d(x.transpose(1, 2), weight[:, None, :], bias, padding=w - 1, groups=d)
    torch.testing.assert_close(causal_conv1d_ref(x, weight, bias), ref[..., :l].transpose(1, 2))


@pytest.mark.parametrize("w", [2, 4])
def test_ref_final_state_is_last_inputs(w):
    b, d = 2, 3
    state = torch.randn(b, w - 1, d)
    for l in (1, w - 1, 6):
        x = torch.randn(b, l, d)
        _, fs = causal_conv1d_ref(x, torch.randn(d, w), initial_state=state, return_final_state=True)
        torch.testing.assert_close(fs, torch.cat([state, x], 1)[:, -(w - 1):])


def _prefill_then_decode(impl, w, dtype=torch.float64):
    b, d, l0, steps = 2, 5, 3, 6
    x = torch.randn(b, l0 + steps, d, dtype=dtype)
    weight, bias = torch.randn(d, w, dtype=dtype), torch.randn(d, dtype=dtype)
    full = causal_conv1d_ref(x, weight, bias, "silu")
    y0, state = causal_conv1d_ref(x[:, :l0], weight, bias, "silu", return_final_state=True)
    torch.testing.assert_close(y0, full[:, :l0])
    for t in range(l0, l0 + steps):
        old, before = state, state.clone()
        y, state = causal_conv1d_update(x[:, t], old, weight, bias, "silu", impl=impl)
        torch.testing.assert_close(old, before, rtol=0, atol=0)  # functional: not modified
        tol = dict(rtol=1e-5, atol=1e-5) if impl == "triton" else {}
        torch.testing.assert_close(y, full[:, t], **tol)
        torch.testing.assert_close(state, x[:, t - w + 2:t + 1], **tol)
    return state


@pytest.mark.parametrize("w", [2, 3, 4])
def test_ref_update_steps_equal_full_conv(w):
    _prefill_then_decode("ref", w)


def test_ref_update_does_not_modify_state():
    state = torch.randn(2, 3, 4)
    keep = state.clone()
    causal_conv1d_update_ref(torch.randn(2, 4), state, torch.randn(4, 4))
    torch.testing.assert_close(state, keep)


# --------------------------------------------------------------------------- Triton (interpreter)

def _few_tiles(monkeypatch, mod):
    """Compiled runs: one forward tile and one backward tile per variant (GATHER 0 and 1), and
    an empty cache of tuned choices, so each test autotunes among these only."""
    monkeypatch.setattr(mod._conv_fwd_tuned, "configs", mod.FWD_CONFIGS[:1])
    monkeypatch.setattr(mod._conv_bwd_tuned, "configs",
                        [c for c in mod.BWD_CONFIGS if c.kwargs["BL"] in (16, 32)
                         and c.num_warps == 4][:2])
    monkeypatch.setattr(mod, "_TUNED", {})
    monkeypatch.setattr(mod, "FWD_PIN", None)


@pytest.fixture
def conv_mod(monkeypatch):
    """The Triton module with small tiles and chunks (at seqlen 67: three backward chunks of two
    tiles each, so dweight/dbias accumulate across tiles and across chunks) and outputs poisoned
    with NaN, so an element the kernel forgets to write fails the comparison."""
    mod = importlib.import_module("hybridseq.kernels.conv1d.triton_conv")
    monkeypatch.setitem(mod._INTERP_META, "BL", 16)
    monkeypatch.setattr(mod, "BWD_CHUNK_ROWS", 32)
    monkeypatch.setattr(mod, "_alloc", lambda shape, dtype, device: torch.full(
        shape, float("nan"), dtype=dtype, device=device))
    if torch.cuda.is_available():  # autotune over fewer tiles: fewer compiles in the GPU run
        _few_tiles(monkeypatch, mod)
    # compiled kernels on CUDA when there is one, else the interpreter on CPU tensors
    torch.set_default_device("cuda" if torch.cuda.is_available() else "cpu")
    yield mod
    torch.set_default_device("cpu")


# (seqlen, width, bias, silu, initial_state, final_state, dim): every seqlen and width, each flag
# both ways, kept few because the interpreter is slow.
CASES = [
    (1, 2, True, True, True, True, 40),
    (1, 3, False, False, False, True, 8),
    (1, 4, True, True, False, False, 8),
    (5, 2, False, True, True, False, 40),
    (5, 3, True, False, True, True, 8),
    (5, 4, False, True, False, True, 8),
    (67, 2, True, False, False, True, 8),
    (67, 3, False, True, True, True, 8),
    (67, 4, True, True, True, True, 24),
    (67, 4, False, False, False, False, 8),
    # width 1 (no state, no halo) and widths above 4 (taps >= 4 take the kernel's generic path)
    (5, 1, True, True, False, True, 8),
    (40, 1, False, False, False, False, 8),
    (5, 5, True, True, True, True, 8),
    (30, 6, False, True, True, True, 8),
    (30, 6, True, False, False, True, 8),
    # dim a multiple of the tile (the forward's unmasked EVEN_D path) and interior tiles
    (67, 4, True, True, False, True, 64),
    (50, 3, False, False, True, False, 32),
    # seqlen a multiple of the interpreter's tile (32 rows: the forward's EVEN_L path, rows masked
    # only at the causal edge), with and without a state, channels even and not
    (64, 4, True, True, True, True, 32),
    (32, 2, False, True, False, False, 40),
    (96, 3, True, True, True, False, 64),
]


def _run_both(conv_mod, l, w, bias, silu, st, fs, d, dtype, b=2, wdtype=None):
    x = torch.randn(b, l, d, dtype=dtype, requires_grad=True)
    weight = torch.randn(d, w, dtype=wdtype or dtype).div_(w ** 0.5).requires_grad_()
    bi = torch.randn(d, dtype=wdtype or dtype, requires_grad=True) if bias else None
    s = torch.randn(b, w - 1, d, dtype=dtype, requires_grad=True) if st else None
    act = "silu" if silu else None
    ins = [t for t in (x, weight, bi, s) if t is not None]
    up = [t.detach().double().requires_grad_() for t in ins]
    kw = dict(bias=bi, activation=act, initial_state=s, return_final_state=fs)
    out = causal_conv1d(x, weight, impl="triton", **kw)
    up_kw = dict(bias=up[2] if bias else None, activation=act,
                 initial_state=up[-1] if st else None, return_final_state=fs)
    ref = causal_conv1d_ref(up[0], up[1], **up_kw)
    outs, refs = (out, ref) if fs else ((out,), (ref,))
    cots = [torch.randn_like(r) for r in refs]
    g = torch.autograd.grad(sum((o * c.to(o.dtype)).sum() for o, c in zip(outs, cots)), ins)
    gr = torch.autograd.grad(sum((r * c).sum() for r, c in zip(refs, cots)), up)
    assert all(o.dtype == dtype for o in outs)
    return outs, refs, g, gr


@pytest.mark.parametrize("case", range(len(CASES)))
def test_triton_matches_ref_fp32(conv_mod, monkeypatch, case):
    l, w, bias, silu, st, fs, d = CASES[case]
    # the backward's two variants (g shifted by tl.gather / recomputed) on alternate cases: each
    # width 2..4 and seqlen 67 gets both
    monkeypatch.setitem(conv_mod._INTERP_BWD, "GATHER", case % 2)
    # the forward's int64 offsets (taken past 2**31 elements per batch row) on alternate cases
    if case % 2:
        monkeypatch.setattr(conv_mod, "I32_LIMIT", 0)
    b = 1 if l == 67 and w == 4 and st else 2
    outs, refs, g, gr = _run_both(conv_mod, l, w, bias, silu, st, fs, d, torch.float32, b=b)
    for o, r in zip(outs, refs):
        assert o.shape == r.shape
        assert rel(o, r) < 1e-5
    names = ["x", "weight", "bias", "initial_state"]
    names = [n for n, on in zip(names, (True, True, bias, st)) if on]
    for n, a, r in zip(names, g, gr):
        assert a.shape == r.shape
        assert rel(a, r) < 1e-5, n


def test_triton_matches_ref_bf16(conv_mod):
    outs, refs, g, gr = _run_both(conv_mod, 20, 4, True, True, True, True, 16, torch.bfloat16)
    for o, r in zip(outs, refs):
        assert rel(o, r) < 1e-2
    for a, r in zip(g, gr):
        assert rel(a, r) < 1e-2


def test_triton_bf16_input_fp32_weight(conv_mod):
    """The Mamba block keeps conv weights fp32 under bf16 activations."""
    outs, refs, g, gr = _run_both(conv_mod, 9, 4, True, True, False, False, 8, torch.bfloat16,
                                  wdtype=torch.float32)
    assert rel(outs[0], refs[0]) < 1e-2
    assert g[1].dtype == torch.float32 and g[2].dtype == torch.float32
    for a, r in zip(g, gr):
        assert rel(a, r) < 1e-2


def test_triton_strided_input(conv_mod):
    """x as a channel slice of a wider projection (the Mamba in_proj output)."""
    xz = torch.randn(2, 9, 16)
    x = xz[..., :8]
    weight, bias = torch.randn(8, 4), torch.randn(8)
    y = causal_conv1d(x, weight, bias, "silu", impl="triton")
    assert rel(y, causal_conv1d_ref(x.double(), weight.double(), bias.double(), "silu")) < 1e-5


@pytest.mark.parametrize("w", [2, 4])
def test_triton_update_matches_prefill(conv_mod, w):
    _prefill_then_decode("triton", w, dtype=torch.float32)


def test_triton_update_bf16_no_bias(conv_mod):
    x, state = torch.randn(3, 40, dtype=torch.bfloat16), torch.randn(3, 3, 40, dtype=torch.bfloat16)
    weight = torch.randn(40, 4)
    y, ns = causal_conv1d_update(x, state, weight, impl="triton")
    yr, nsr = causal_conv1d_update_ref(x, state, weight)
    assert y.dtype == torch.bfloat16 and ns.dtype == torch.bfloat16
    assert rel(y, yr) < 1e-2
    torch.testing.assert_close(ns, nsr, rtol=0, atol=0)  # a shift: exact


def test_triton_entry_points_name_bad_arguments(conv_mod):
    """The Triton functions called directly (not through the dispatcher) still say what is wrong."""
    x = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="weight"):
        conv_mod.causal_conv1d_triton(x, torch.randn(3, 4))
    with pytest.raises(ValueError, match="activation"):
        conv_mod.causal_conv1d_triton(x, torch.randn(4, 4), activation="gelu")
    with pytest.raises(ValueError, match="conv_state"):
        conv_mod.causal_conv1d_update_triton(x[:, 0], torch.randn(2, 2, 4), torch.randn(4, 4))


def test_bad_arguments_raise():
    x = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_ref(x, torch.randn(4, 3), activation="relu")
    with pytest.raises(ValueError, match="initial_state"):
        causal_conv1d_ref(x, torch.randn(4, 3), initial_state=torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="conv_state"):
        causal_conv1d_update_ref(x[:, 0], torch.randn(2, 3, 4), torch.randn(4, 3))


def test_bench_conv_smoke(conv_mod):
    """`hybridseq bench conv --check` end to end at tiny sizes (CPU, interpreter)."""
    import argparse

    from hybridseq.bench import conv as bench_conv

    p = argparse.ArgumentParser()
    bench_conv.add_arguments(p)
    args = p.parse_args(["--conv-shapes", "1x8x5x4", "--decode-shapes", "2x8x4", "--iters", "1",
                         "--dtype", "fp32", "--device", "cuda" if torch.cuda.is_available() else "cpu",
                         "--check"])
    rows = bench_conv.run(args)
    ops = {(r["op"], r["impl"]) for r in rows}
    assert {("conv", "triton"), ("conv", "F.conv1d+silu"), ("conv_update", "triton"),
            ("state_update", "triton"), ("state_update", "ref")} <= ops
    for r in rows:
        if r["impl"] == "triton":
            assert r["max_rel_err"] < 1e-5, r
        if r["op"] != "copy (ceiling)":
            assert r["fwd_ms"] > 0
        if r["op"] == "conv":
            assert r["fwdbwd_ms"] > 0 and r["bwd_ms"] > 0


def test_fwd_pin_parses_and_names_the_variable(conv_mod):
    assert conv_mod.parse_fwd_pin("") is None
    assert conv_mod.parse_fwd_pin("64,128,8") == (64, 128, 8)
    assert conv_mod.parse_fwd_pin("32x256x4") == (32, 256, 4)
    for bad in ("32,128", "32,100,4", "a,b,c", "32,128,4,fast"):
        with pytest.raises(ValueError, match=conv_mod.FWD_PIN_ENV):
            conv_mod.parse_fwd_pin(bad)
    with pytest.raises(ValueError, match="roll forward variant was removed"):
        conv_mod.parse_fwd_pin("64,512,2,roll")
