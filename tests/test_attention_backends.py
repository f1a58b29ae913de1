"""Attention backends: each one that runs here agrees with the torch reference (forward and
gradients), the position-masked cache path, backend selection and its errors."""
import pytest
import torch

from hybridseq.blocks.attention.backends import (attention, attention_flops, attention_tail,
                                                 attention_with_positions,
                                                 backend_available, describe_attention_backend,
                                                 position_mask, select_backend)
from hybridseq.errors import HybridSeqError

CASES = [  # (batch, seqlen, heads, kv heads, head_dim, window)
    (2, 1, 4, 4, 8, None),
    (1, 7, 4, 2, 8, None),
    (2, 33, 6, 2, 16, None),
    (2, 33, 4, 1, 8, 5),
    (1, 9, 2, 2, 8, 20),   # window longer than the sequence
]


def _qkv(b, l, h, hkv, d, dtype=torch.float32, device="cpu"):
    q = torch.randn(b, l, h, d, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(b, l, hkv, d, dtype=dtype, device=device, requires_grad=True)
    v = torch.randn(b, l, hkv, d, dtype=dtype, device=device, requires_grad=True)
    return q, k, v


def _naive(q, k, v, window):
    """Independent reference: a python loop over query positions, float64."""
    b, l, h, d = q.shape
    g = h // k.shape[2]
    kk = k.double().repeat_interleave(g, dim=2)
    vv = v.double().repeat_interleave(g, dim=2)
    out = torch.zeros(b, l, h, d, dtype=torch.float64)
    for i in range(l):
        lo = 0 if window is None else max(0, i - window + 1)
        s = torch.einsum("bhd,bjhd->bhj", q[:, i].double(), kk[:, lo:i + 1]) / d ** 0.5
        out[:, i] = torch.einsum("bhj,bjhd->bhd", s.softmax(-1), vv[:, lo:i + 1])
    return out


@pytest.mark.parametrize("case", CASES[:4])
def test_torch_reference_matches_naive_loop(case):
    b, l, h, hkv, d, w = case
    q, k, v = _qkv(b, l, h, hkv, d)
    o = attention(q, k, v, window=w, impl="torch")
    torch.testing.assert_close(o.double(), _naive(q, k, v, w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_sdpa_matches_torch_forward_and_grads(case):
    b, l, h, hkv, d, w = case
    q, k, v = _qkv(b, l, h, hkv, d)
    o_ref = attention(q, k, v, window=w, impl="torch")
    g = torch.randn_like(o_ref)
    grads_ref = torch.autograd.grad(o_ref, (q, k, v), g)
    o = attention(q, k, v, window=w, impl="sdpa")
    grads = torch.autograd.grad(o, (q, k, v), g)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-4)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not backend_available("flex", "cpu")[0], reason="no FlexAttention in this torch")
def test_flex_forward_matches_torch_on_cpu():
    """FlexAttention on CPU is forward-only in torch: compare forward, check the grad refusal."""
    b, l, h, hkv, d, w = 1, 20, 4, 2, 8, 6
    q, k, v = _qkv(b, l, h, hkv, d)
    with torch.no_grad():
        for window in (None, w):
            o = attention(q, k, v, window=window, impl="flex")
            torch.testing.assert_close(o, attention(q, k, v, window=window, impl="torch"),
                                       atol=1e-5, rtol=1e-4)
    with pytest.raises(HybridSeqError, match="backward on CPU"):
        attention(q, k, v, impl="flex")


def test_positions_path_any_key_order():
    """Keys given in a permuted order with their positions (a ring buffer) give the same
    attention as the in-order causal computation, for every query position."""
    b, l, h, hkv, d, w = 2, 10, 4, 2, 8, 4
    q, k, v = _qkv(b, l, h, hkv, d)
    with torch.no_grad():
        full = attention(q, k, v, window=w, impl="torch")
        perm = torch.randperm(l)
        pos = torch.arange(l)
        for impl in ("torch", "sdpa"):
            o = attention_with_positions(q, k[:, perm], v[:, perm], pos, pos[perm], window=w, impl=impl)
            torch.testing.assert_close(o, full, atol=1e-5, rtol=1e-4)
        # one query at the end, with an empty slot (-1) that must be ignored
        kpos = torch.cat([pos[perm], torch.tensor([-1])])
        kk = torch.cat([k[:, perm], torch.randn(b, 1, hkv, d)], 1)
        vv = torch.cat([v[:, perm], torch.randn(b, 1, hkv, d)], 1)
        o = attention_with_positions(q[:, -1:], kk, vv, pos[-1:], kpos, window=None, impl="sdpa")
        torch.testing.assert_close(o, attention(q, k, v, impl="torch")[:, -1:], atol=1e-5, rtol=1e-4)


def test_tail_chunk_attention_matches_full():
    """The last lq queries against all lk keys (a prefill chunk after cached keys) equal the
    corresponding rows of full causal attention, on each backend, with GQA."""
    q, k, v = _qkv(2, 11, 4, 2, 8)
    with torch.no_grad():
        full = attention(q, k, v, impl="torch")
        for impl in ("torch", "sdpa"):
            for lq in (1, 4, 11):
                o = attention_tail(q[:, -lq:], k, v, impl=impl)
                torch.testing.assert_close(o, full[:, -lq:], atol=1e-5, rtol=1e-4)


def test_position_mask_rule():
    m = position_mask(torch.tensor([5]), torch.tensor([-1, 0, 2, 3, 5, 6]), window=3)
    assert m.tolist() == [[False, False, False, True, True, False]]


def test_backend_selection_and_errors():
    assert select_backend("auto", "cpu", torch.float32, 64, None, True)[0] == "sdpa"
    assert select_backend("torch", "cpu", torch.float32, 64, 4, True)[0] == "torch"
    with pytest.raises(HybridSeqError, match="flash_attn"):
        select_backend("flash_attn", "cpu", torch.float32, 64, None, False)
    with pytest.raises(HybridSeqError, match="unknown attention impl"):
        select_backend("xformers", "cpu", torch.float32, 64, None, False)
    name, why = describe_attention_backend({"impl": "auto", "n_heads": 4}, "cpu", d_model=64)
    assert name == "sdpa" and why
    name, why = describe_attention_backend({"impl": "flash_attn", "n_heads": 4}, "cpu")
    assert name == "unavailable" and "flash" in why


def test_attention_flops_convention():
    causal = attention_flops(4, 16, 4096, 128, mode="fwd")
    assert causal == 4 * 4 * 16 * 128 * 4096 * 4096 / 2
    assert attention_flops(4, 16, 4096, 128, mode="fwd_bwd") == 3.5 * causal
    # a window covering the sequence is causal attention plus the diagonal
    assert attention_flops(1, 1, 8, 1, window=8) == 4 * (8 * 9 / 2)
    assert attention_flops(1, 1, 8, 1, window=2) == 4 * (1 + 2 * 7)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["sdpa", "flex", "flash_attn"])
@pytest.mark.parametrize("window", [None, 64])
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_cuda_backends_match_torch(impl, window, kv_heads):
    if not backend_available(impl, "cuda", dtype=torch.bfloat16, head_dim=64)[0]:
        pytest.skip(f"{impl} unavailable")
    q, k, v = _qkv(2, 300, 8, kv_heads, 64, dtype=torch.bfloat16, device="cuda")
    o_ref = attention(q, k, v, window=window, impl="torch")
    g = torch.randn_like(o_ref)
    grads_ref = torch.autograd.grad(o_ref, (q, k, v), g)
    o = attention(q, k, v, window=window, impl=impl)
    grads = torch.autograd.grad(o, (q, k, v), g)
    torch.testing.assert_close(o, o_ref, atol=2e-2, rtol=2e-2)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r, atol=5e-2, rtol=5e-2)


def test_bench_attention_runs_on_cpu():
    import argparse

    from hybridseq.bench import attention as bench

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    rows = bench.run(p.parse_args(["--batch", "1", "--heads", "2", "--seqlen", "16", "--head-dim", "8",
                                   "--dtype", "fp32", "--iters", "1", "--backends", "auto,sdpa,torch,flash_attn"]))
    by = {r["backend"]: r for r in rows}
    assert by["auto"]["runs"] == "sdpa" and by["flash_attn"]["status"].startswith("skipped")
    for name in ("auto", "sdpa", "torch"):
        assert by[name]["status"] == "ok" and by[name]["fwd_bwd_TFLOPs"] > 0
    assert max(r.get("pct_of_best", 0) for r in rows) == 100.0


def test_auto_never_picks_compiled_flex_below_head_dim_16():
    """inductor's FlexAttention kernel refuses head_dim < 16 (seen on an H100): auto falls back to
    SDPA with a mask for a sliding window or documents, and an explicit flex is refused clearly."""
    from hybridseq.blocks.attention.backends import backend_available, select_backend
    from hybridseq.errors import HybridSeqError

    if not backend_available("flex", "cuda", head_dim=64)[0]:
        pytest.skip("FlexAttention is not importable in this torch")
    assert select_backend("auto", "cuda", torch.bfloat16, 64, 128, True)[0] == "flex"
    assert select_backend("auto", "cuda", torch.bfloat16, 8, 128, True)[0] == "sdpa"
    assert select_backend("auto", "cuda", torch.bfloat16, 8, None, True, documents=True)[0] == "sdpa"
    with pytest.raises(HybridSeqError, match="head_dim >= 16"):
        select_backend("flex", "cuda", torch.bfloat16, 4, 128, True)
