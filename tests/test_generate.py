"""Generation: greedy decoding equals repeated argmax of the full forward, eos handling, the
sampling filters (top-k, top-p), seeding, and continuing from a loaded state cartridge."""
import pytest
import torch

import hybridseq as hs
from hybridseq.errors import HybridSeqError
from hybridseq.generate import sample_next

V = 29


def make_model(layout="M W A E", **model):
    torch.manual_seed(0)
    cfg = hs.load_config({
        "model": {"d_model": 16, "vocab_size": V, "init_std": 0.3, **model},
        "blocks": {"M": {"kind": "mamba", "d_state": 4},
                   "W": {"kind": "attention", "n_heads": 2, "window": 4},
                   "A": {"kind": "attention", "n_heads": 4, "n_kv_heads": 2},
                   "E": {"kind": "moe", "n_experts": 4, "top_k": 2, "d_ff": 16}},
        "layout": layout})
    return hs.build_model(cfg).eval()


@torch.no_grad()
def greedy_reference(model, ids, n):
    for _ in range(n):
        nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    return ids


def test_greedy_equals_argmax_of_full_forward():
    model = make_model()
    prompt = torch.randint(0, V, (3, 5))
    out = model.generate(prompt, max_new_tokens=8, temperature=0.0)
    assert out.shape == (3, 13) and torch.equal(out[:, :5], prompt)
    assert torch.equal(out, greedy_reference(model, prompt, 8))
    assert len(set(out[:, 5:].flatten().tolist())) > 1  # not a degenerate constant
    # top_k=1 is greedy at any temperature
    assert torch.equal(model.generate(prompt, 8, temperature=2.0, top_k=1), out)


def test_eos_stops_rows_and_pads():
    model = make_model()
    prompt = torch.randint(0, V, (3, 4))
    free = model.generate(prompt, 10, temperature=0.0)
    eos = int(free[0, 6])  # row 0 emits it at its third new token
    out = model.generate(prompt, 10, temperature=0.0, eos_token_id=eos)
    first = {}
    for r in range(3):
        hits = (free[r, 4:] == eos).nonzero()
        first[r] = int(hits[0]) + 4 if len(hits) else None
    for r in range(3):
        f = first[r]
        if f is None:
            torch.testing.assert_close(out[r], free[r, : out.shape[1]])
        else:
            assert torch.equal(out[r, : f + 1], free[r, : f + 1])
            assert (out[r, f:] == eos).all()
    if all(f is not None for f in first.values()):
        assert out.shape[1] == max(first.values()) + 1  # stopped once every row finished


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.5, 2.0, -1.0, -2.0, 0.0]]).repeat(400, 1)
    g = torch.Generator().manual_seed(0)
    s = sample_next(logits, 1.0, top_k=2, generator=g)
    assert set(s.tolist()) == {0, 1}
    p = torch.softmax(logits[0], -1)
    # nucleus: the smallest prefix with mass >= top_p; here the top two tokens
    top_p = float(p[0] + p[1]) - 1e-3
    s = sample_next(logits, 1.0, top_p=top_p, generator=g)
    assert set(s.tolist()) == {0, 1}
    s = sample_next(logits, 1.0, top_p=1e-6, generator=g)
    assert set(s.tolist()) == {0}
    s = sample_next(logits, 1.0, generator=g)
    assert len(set(s.tolist())) >= 4
    assert torch.equal(sample_next(logits[:2], 0.0), torch.tensor([0, 0]))
    with pytest.raises(HybridSeqError):
        sample_next(logits, -1.0)
    with pytest.raises(HybridSeqError):
        sample_next(logits, 1.0, top_p=0.0)


def test_sampling_seeded_and_never_padded_ids():
    model = make_model("M A", pad_vocab_multiple=16)  # 29 -> 32: ids 29..31 are padding
    assert model.vocab_size == 32
    with torch.no_grad():
        model.embed.weight[V:] = 5.0  # make padded ids very likely if they were not masked
    prompt = torch.randint(0, V, (2, 3))
    a = model.generate(prompt, 12, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 12, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert a.max() < V


def test_continue_from_loaded_cartridge(tmp_path):
    model = make_model()
    doc = torch.randint(0, V, (1, 9))
    question = torch.randint(0, V, (1, 3))
    cache = model.new_cache(1, 32)
    with torch.no_grad():
        model(doc, cache=cache)
    cache.save(tmp_path / "doc.cartridge")
    loaded = hs.load_cache(tmp_path / "doc.cartridge", model)
    out = model.generate(question, 6, temperature=0.0, cache=loaded)
    ref = model.generate(torch.cat([doc, question], 1), 6, temperature=0.0)
    assert torch.equal(out, ref[:, 9:])


def test_static_graph_step_gives_the_same_samples():
    """generate's CUDA-graph code path (the static-buffer step, run eagerly here): the same
    greedy tokens, the same seeded samples with top-k / top-p / eos as the ordinary loop."""
    model = make_model("M W A E")
    prompt = torch.randint(0, V, (3, 6))
    a = model.generate(prompt, 6, temperature=0.0, cuda_graph=False)
    assert torch.equal(model.generate(prompt, 6, temperature=0.0, cuda_graph="static"), a)
    kw = dict(temperature=0.8, top_k=5, top_p=0.9, eos_token_id=int(a[0, 8]))
    s1 = model.generate(prompt, 6, generator=torch.Generator().manual_seed(4), cuda_graph=False, **kw)
    s2 = model.generate(prompt, 6, generator=torch.Generator().manual_seed(4), cuda_graph="static", **kw)
    assert torch.equal(s1, s2)
