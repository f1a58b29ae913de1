"""Document masks (packed sequences): every backend agrees with an independent per-document
reference and with the torch backend, forward and gradients; no token sees another document;
RoPE positions restart at document starts; the layout (seg, positions, cu_seqlens, block mask)
is right and cached per doc_ids tensor."""
import inspect

import pytest
import torch

from hybridseq.blocks.attention import AttentionBlock
from hybridseq.blocks.attention.backends import (_flex_mask_mod, attention, attention_flops,
                                                 backend_available, describe_attention_backend,
                                                 document_layout, select_backend)
from hybridseq.errors import HybridSeqError

HAS_FLEX = backend_available("flex", "cpu")[0]


def _ids(*rows):
    """doc_ids from per-row document lengths: _ids([1, 4], [5]) -> [[0, 1, 1, 1, 1], [0, 0, 0, 0, 0]]."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows])


# (doc lengths per row, heads, kv heads, head_dim, window): documents of length 1, lengths not a
# multiple of any block, a document spanning the whole row, GQA, windows shorter and longer
CASES = [
    ([[1, 6, 13], [20]], 4, 2, 8, None),
    ([[20], [1, 1, 1, 17]], 4, 4, 8, 5),
    ([[7, 1, 9, 2], [3, 14, 2]], 6, 2, 16, 4),
    ([[1]], 2, 1, 8, None),
    ([[2, 3], [5]], 2, 2, 8, 9),
]


def _qkv(b, l, h, hkv, d, dtype=torch.float32, device="cpu"):
    mk = lambda n: torch.randn(b, l, n, d, dtype=dtype, device=device, requires_grad=True)  # noqa: E731
    return mk(h), mk(hkv), mk(hkv)


def _per_document(q, k, v, rows, window):
    """Independent reference: each document cut out and run alone through the plain causal
    torch backend (no document mask involved), float64."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for bi, lens in enumerate(rows):
        s = 0
        for n in lens:
            sl = slice(s, s + n)
            out[bi:bi + 1, sl] = attention(q[bi:bi + 1, sl].double(), k[bi:bi + 1, sl].double(),
                                           v[bi:bi + 1, sl].double(), window=window, impl="torch")
            s += n
    return out


def test_layout_runs_positions_and_cu_seqlens():
    ids = torch.tensor([[7, 7, 3, 3, 3, 7], [0, 0, 0, 0, 0, 0]])
    lay = document_layout(ids)
    assert lay.seg.tolist() == [[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 0, 0]]  # a recurring 7 is a new run
    assert lay.positions.tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]]
    cu, mx = lay.varlen()
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 2, 5, 6, 12] and mx == 6
    m = lay.mask(2)
    assert m[0, 4].tolist() == [False, False, False, True, True, False]  # window 2, same run
    assert m[0, 5].tolist() == [False] * 5 + [True]
    assert m[1, 5].tolist() == [False] * 4 + [True, True]


def test_layout_is_cached_per_tensor_and_refreshed_in_place():
    ids = _ids([3, 4])
    a = document_layout(ids)
    assert document_layout(ids) is a
    assert document_layout(ids.clone()) is not a  # another tensor, another layout
    ids[0, 5:] = 9  # in place: a new run starts at 5
    b = document_layout(ids)
    assert b is not a and b.seg[0].tolist() == [0, 0, 0, 1, 1, 2, 2]
    with torch.inference_mode():  # no version counter: rebuilt each call, still right
        ids = _ids([2, 5])
        first = document_layout(ids)
        ids[0, 4:] = 5
        assert document_layout(ids).seg[0].tolist() == [0, 0, 1, 1, 2, 2, 2]
        assert first.seg[0].tolist() == [0, 0, 1, 1, 1, 1, 1]


def test_layout_errors():
    with pytest.raises(HybridSeqError, match="integer"):
        document_layout(torch.zeros(2, 3))
    with pytest.raises(HybridSeqError, match=r"\(batch, seqlen\)"):
        document_layout(torch.zeros(6, dtype=torch.long))
    q, k, v = _qkv(2, 5, 2, 2, 8)
    with pytest.raises(HybridSeqError, match="doc_ids has shape"):
        attention(q, k, v, impl="torch", doc_ids=torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("case", CASES)
def test_torch_backend_matches_per_document_reference(case):
    rows, h, hkv, d, w = case
    ids = _ids(*rows)
    q, k, v = _qkv(*ids.shape, h, hkv, d)
    with torch.no_grad():
        o = attention(q, k, v, window=w, impl="torch", doc_ids=ids)
        torch.testing.assert_close(o.double(), _per_document(q, k, v, rows, w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "auto"])
@pytest.mark.parametrize("case", CASES)
def test_backend_matches_torch_forward_and_grads(case, impl):
    rows, h, hkv, d, w = case
    ids = _ids(*rows)
    q, k, v = _qkv(*ids.shape, h, hkv, d)
    o_ref = attention(q, k, v, window=w, impl="torch", doc_ids=ids)
    g = torch.randn_like(o_ref)
    grads_ref = torch.autograd.grad(o_ref, (q, k, v), g)
    o = attention(q, k, v, window=w, impl=impl, doc_ids=ids)
    grads = torch.autograd.grad(o, (q, k, v), g)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-4)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not HAS_FLEX, reason="no FlexAttention in this torch")
def test_flex_forward_matches_torch_on_cpu():
    """FlexAttention on CPU runs unfused and forward-only (its backward is checked on CUDA)."""
    for rows, h, hkv, d, w in (CASES[0], CASES[2]):
        ids = _ids(*rows)
        q, k, v = _qkv(*ids.shape, h, hkv, d)
        with torch.no_grad():
            o = attention(q, k, v, window=w, impl="flex", doc_ids=ids)
            torch.testing.assert_close(o, attention(q, k, v, window=w, impl="torch", doc_ids=ids),
                                       atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("window", [None, 3])
def test_flex_mask_mod_equals_dense_mask(window):
    """The mask_mod FlexAttention compiles, evaluated on every (b, q, k), is the dense mask."""
    ids = _ids([1, 6, 2, 5], [14])
    lay = document_layout(ids)
    b, l = ids.shape
    bi = torch.arange(b)[:, None, None]
    qi = torch.arange(l)[None, :, None]
    ki = torch.arange(l)[None, None, :]
    m = _flex_mask_mod(window, lay.seg)(bi, torch.zeros((), dtype=torch.long), qi, ki)
    assert torch.equal(m.expand(b, l, l), lay.mask(window))


@pytest.mark.skipif(not HAS_FLEX, reason="no FlexAttention in this torch")
def test_flex_block_mask_shared_by_layers():
    """One BlockMask per (doc_ids tensor, window): every layer of a forward reuses it."""
    ids = _ids([5, 20, 39], [64])
    lay = document_layout(ids)
    bm = lay.block_mask(None)
    assert document_layout(ids).block_mask(None) is bm
    assert lay.block_mask(8) is not bm
    dense = bm.to_dense()  # (b, 1, q blocks, k blocks): 1 where some pair is visible
    assert dense.shape[0] == 2 and dense[1].sum() == 1  # one 64-token document: one block


def _block(h=4, hkv=2, d_model=32, window=None, impl="torch", rope=10000.0, qk_norm=False):
    torch.manual_seed(1)
    spec = {"n_heads": h, "n_kv_heads": hkv, "window": window, "impl": impl, "rope_theta": rope,
            "qk_norm": qk_norm}
    return AttentionBlock(d_model, spec).double()


@pytest.mark.parametrize("impl", ["torch", "sdpa"])
@pytest.mark.parametrize("window", [None, 4])
def test_block_documents_do_not_see_each_other(impl, window):
    """Perturbing document 1's tokens leaves every other document's outputs unchanged (and does
    change document 1's): no leak through the mask, GQA, RoPE or QK-norm."""
    blk = _block(window=window, impl=impl, qk_norm=True)
    ids = _ids([5, 7, 1, 6], [19])
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    y = blk(x, doc_ids=ids)
    x2 = x.clone()
    x2[0, 5:12] += torch.randn(7, 32, dtype=torch.float64)  # document 1 of row 0
    y2 = blk(x2, doc_ids=ids)
    other = torch.ones(2, 19, dtype=torch.bool)
    other[0, 5:12] = False
    torch.testing.assert_close(y2[other], y[other], atol=1e-12, rtol=0)
    assert (y2[0, 5:12] - y[0, 5:12]).abs().max() > 1e-3


@pytest.mark.parametrize("rope", [10000.0, None])
def test_block_packed_equals_documents_alone(rope):
    """A packed row gives each document the output it gets alone (positions restart)."""
    blk = _block(window=6, impl="sdpa", rope=rope)
    lens = [3, 1, 9, 4]
    x = torch.randn(1, sum(lens), 32, dtype=torch.float64)
    y = blk(x, doc_ids=_ids(lens))
    s = 0
    for n in lens:
        torch.testing.assert_close(y[:, s:s + n], blk(x[:, s:s + n]), atol=1e-10, rtol=1e-10)
        s += n


def test_block_rope_positions_restart_flag(monkeypatch):
    """restart_positions=True (default) feeds RoPE t - document start; False: 0..l-1."""
    import hybridseq.blocks.attention.block as mod

    seen = []
    real = mod.rope_tables

    def spy(pos, *a):
        seen.append(pos.clone())
        return real(pos, *a)

    monkeypatch.setattr(mod, "rope_tables", spy)
    blk = _block()
    ids = _ids([2, 3], [5])
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    blk(x, doc_ids=ids)
    blk(x, doc_ids=ids, restart_positions=False)
    assert seen[0].tolist() == [[0, 1, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert seen[1].tolist() == [0, 1, 2, 3, 4]


def test_block_doc_ids_errors():
    blk = _block()
    x = torch.randn(1, 4, 32, dtype=torch.float64)
    with pytest.raises(HybridSeqError, match="doc_ids has shape"):
        blk(x, doc_ids=torch.zeros(1, 5, dtype=torch.long))
    state = blk.new_state(1, 8, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="inference cache"):
        blk(x, state=state, doc_ids=torch.zeros(1, 4, dtype=torch.long))


def test_selection_with_documents():
    assert select_backend("auto", "cpu", torch.float32, 64, None, True, True)[0] == "sdpa"
    name, why = select_backend("auto", "cuda", torch.bfloat16, 64, 128, True, True)
    expected = "flash_attn" if backend_available("flash_attn", "cuda", dtype=torch.bfloat16)[0] else "flex"
    assert name == expected and "document" in why
    name, why = describe_attention_backend({"impl": "auto", "n_heads": 4}, "cpu", 64, documents=True)
    assert name == "sdpa" and "document" in why


def test_flops_count_only_work_inside_documents():
    one = attention_flops(4, 16, 4096, 128, mode="fwd_bwd")
    assert attention_flops(4, 16, 4096, 128, mode="fwd_bwd", doc_lens=[4096]) == one
    eight = attention_flops(4, 16, 4096, 128, mode="fwd", doc_lens=[512] * 8)
    assert eight == 8 * attention_flops(4, 16, 512, 128, mode="fwd")
    assert attention_flops(1, 1, 5, 1, window=2, doc_lens=[1, 4]) == 4 * (1 + (1 + 2 * 3))
    with pytest.raises(HybridSeqError, match="sum to seqlen"):
        attention_flops(1, 1, 5, 1, doc_lens=[2, 2])


def test_bench_attention_document_rows_on_cpu():
    import argparse

    from hybridseq.bench import attention as bench

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    rows = bench.run(p.parse_args(["--batch", "1", "--heads", "2", "--seqlen", "24", "--head-dim", "8",
                                   "--dtype", "fp32", "--iters", "1", "--doc-len", "10",
                                   "--backends", "auto,sdpa,torch,flex,sdpa[split]"]))
    by = {r["backend"]: r for r in rows}
    assert by["auto"]["runs"] == "sdpa" and "docs 10" in by["auto"]["shape"]
    assert by["flex"]["status"].startswith("skipped")  # no backward on CPU
    assert by["sdpa[split]"]["status"].startswith("skipped")  # 10 does not divide 24
    for name in ("auto", "sdpa", "torch"):
        assert by[name]["status"] == "ok" and by[name]["fwd_bwd_TFLOPs"] > 0
    rows = bench.run(p.parse_args(["--batch", "2", "--heads", "2", "--seqlen", "24", "--head-dim", "8",
                                   "--dtype", "fp32", "--iters", "1", "--doc-len", "8",
                                   "--backends", "sdpa[split]"]))
    assert rows[0]["status"] == "ok" and rows[0]["fwd_bwd_TFLOPs"] > 0


def test_model_passes_doc_ids_when_supported():
    """Model level (hybridseq/model.py): doc_ids reaches every layer: a packed row gives each
    document's logits as if it ran alone, for attention + mlp and for mamba + attention."""
    import hybridseq as hs

    if "doc_ids" not in inspect.signature(hs.HybridLM.forward).parameters:
        pytest.skip("HybridLM.forward has no doc_ids yet")
    cfg = {"name": "t", "model": {"d_model": 32, "vocab_size": 50},
           "blocks": {"A": {"kind": "attention", "n_heads": 4, "n_kv_heads": 2},
                      "F": {"kind": "mlp", "d_ff": 64}},
           "layout": "AFAF"}
    model = hs.build_model(hs.load_config(cfg)).double()
    lens = [4, 7, 5]
    ids = torch.randint(0, 50, (1, sum(lens)))
    out = model(ids, doc_ids=_ids(lens)).logits
    s = 0
    for n in lens:
        torch.testing.assert_close(out[:, s:s + n], model(ids[:, s:s + n]).logits, atol=1e-9, rtol=1e-9)
        s += n
    cfg["blocks"]["M"] = {"kind": "mamba", "d_state": 4, "impl": "torch"}
    cfg["layout"] = "MAMF"
    model = hs.build_model(hs.load_config(cfg)).double()
    out = model(ids, doc_ids=_ids(lens)).logits
    s = 0
    for n in lens:
        torch.testing.assert_close(out[:, s:s + n], model(ids[:, s:s + n]).logits, atol=1e-9, rtol=1e-9)
        s += n


# --- CUDA (skipped without a GPU) -------------------------------------------------------------
GPU_ROWS = [[1, 127, 128, 129, 300, 339], [1024], [512, 1, 511]]  # 1024 tokens per row


# (impl, window, kv heads): each flex (window, GQA) pair is one compilation, so the list is short;
# auto runs flex (or flash_attn) with the same guards as the flex rows
GPU_CASES = [("flex", None, 2), ("flex", 100, 8), ("auto", None, 2), ("flash_attn", None, 2),
             ("flash_attn", 100, 8), ("sdpa", None, 2), ("sdpa", 100, 8)]


@pytest.mark.gpu
@pytest.mark.parametrize("impl,window,kv_heads", GPU_CASES)
def test_cuda_backends_with_documents_match_torch(impl, window, kv_heads):
    """bf16 on CUDA: flex compiled, flash_attn varlen, SDPA with the mask, auto; fwd + grads."""
    if impl != "auto" and not backend_available(impl, "cuda", dtype=torch.bfloat16, head_dim=64)[0]:
        pytest.skip(f"{impl} unavailable")
    ids = _ids(*GPU_ROWS).cuda()
    q, k, v = _qkv(*ids.shape, 8, kv_heads, 64, dtype=torch.bfloat16, device="cuda")
    o_ref = attention(q, k, v, window=window, impl="torch", doc_ids=ids)
    g = torch.randn_like(o_ref)
    grads_ref = torch.autograd.grad(o_ref, (q, k, v), g)
    o = attention(q, k, v, window=window, impl=impl, doc_ids=ids)
    grads = torch.autograd.grad(o, (q, k, v), g)
    torch.testing.assert_close(o, o_ref, atol=2e-2, rtol=2e-2)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r, atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
def test_cuda_flex_documents_isolated_and_no_recompile_per_batch():
    """Compiled flex: perturbing one document leaves the others bit-identical; a new batch's
    doc_ids (another tensor, other boundaries, same shape) reuses the compiled kernel (training
    makes a new block mask every step: a recompilation per step would fall back to eager)."""
    if not backend_available("flex", "cuda")[0]:
        pytest.skip("flex unavailable")
    ids = _ids(*GPU_ROWS).cuda()
    q, k, v = _qkv(*ids.shape, 8, 2, 64, dtype=torch.bfloat16, device="cuda")  # = GPU_CASES[0]
    o = attention(q, k, v, impl="flex", doc_ids=ids)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[0, 256:385] += 1.0  # document 4 of row 0 (positions 256..384)
    v2[0, 256:385] -= 1.0
    o2 = attention(q, k2.requires_grad_(), v2.requires_grad_(), impl="flex", doc_ids=ids)
    keep = torch.ones(ids.shape, dtype=torch.bool, device="cuda")
    keep[0, 256:385] = False
    assert torch.equal(o2[keep], o[keep])
    assert not torch.equal(o2[0, 256:385], o[0, 256:385])
    other = _ids([600, 424], [3, 1021], [1024]).cuda()
    with torch._dynamo.config.patch(error_on_recompile=True):
        o3 = attention(q, k, v, impl="flex", doc_ids=other)
    torch.testing.assert_close(o3, attention(q, k, v, impl="torch", doc_ids=other), atol=2e-2, rtol=2e-2)
