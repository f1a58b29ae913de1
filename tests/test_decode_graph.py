"""One-token decoding (every block's ``step``, what ``hybridseq.decode_graph.GraphedDecodeStep``
captures): for layouts mixing mamba, full attention, sliding-window GQA attention (prompts shorter
and longer than the window, ring wrap-around), moe and mlp it gives the logits of the full forward
and of a chunked prefill; the cache stays usable by chunks, save and load; capturing leaves the
cache as it was; errors are clear. On CUDA (skipped here): the captured graph against the eager
decode. Also the decode bench's modes, memory estimate and batch fitting."""
import argparse
import os

import pytest
import torch

import hybridseq as hs
from hybridseq.blocks.attention.block import _decode_attention
from hybridseq.decode_graph import GraphedDecodeStep, graph_blockers
from hybridseq.errors import HybridSeqError

from conftest import MIXED_BLOCKS, MIXED_VOCAB as V, make_mixed_model

# the mixed blocks, plus a capacity-mode MoE (which cannot be captured)
BLOCKS = {**MIXED_BLOCKS, "C": {"kind": "moe", "n_experts": 4, "top_k": 2, "d_ff": 16,
                                "capacity_factor": 1.0}}
LAYOUTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "layouts")


def make_model(layout, seed=0, **model):
    return make_mixed_model(layout, seed, BLOCKS, **model)


def close(a, b, tol=1e-5):
    scale = b.abs().max().item()
    assert scale > 0.1
    assert (a - b).abs().max().item() <= tol * scale, (a - b).abs().max().item()


@torch.no_grad()
def teacher_forced(model, ids, prompt_len, step_obj, max_seq_len=None):
    """Last-position logits after the prompt, then after each later token: (B, n, V). The later
    tokens go one by one through ``GraphedDecodeStep`` (uncaptured) or the model's forward."""
    cache = model.new_cache(ids.shape[0], max_seq_len or ids.shape[1])
    outs = [model(ids[:, :prompt_len], cache=cache).logits[:, -1]]
    step = GraphedDecodeStep(model, cache, capture=False) if step_obj else None
    for t in range(prompt_len, ids.shape[1]):
        if step_obj:
            outs.append(step(ids[:, t]).clone())
        else:
            outs.append(model(ids[:, t:t + 1], cache=cache).logits[:, -1])
    assert cache.seqlen_offset == ids.shape[1]
    assert int(cache.position) == ids.shape[1]
    return torch.stack(outs, 1), cache


# windows 5 (W) and 4 (N): prompts shorter (1, 3) and longer (8, 11); 14 tokens wrap the rings
@pytest.mark.parametrize("layout,prompt_len", [("M A W E F", 1), ("M A W E F", 8), ("W M N", 3),
                                               ("W M N", 11), ("S W A S", 1), ("S W A S", 9)])
def test_one_token_steps_equal_full_forward(layout, prompt_len):
    model = make_model(layout)
    ids = torch.randint(0, V, (2, 14))
    full = model(ids).logits[:, prompt_len - 1:]
    got, cache = teacher_forced(model, ids, prompt_len, step_obj=True)
    # the attention step reads the whole buffer under a mask: the same keys, another summation
    # order than the full forward, so equal to rounding
    close(got, full, tol=1e-4)
    # the step object is the model's own one-token forward: bitwise the same
    ref, ref_cache = teacher_forced(model, ids, prompt_len, step_obj=False)
    assert torch.equal(got, ref)
    for name, t in ref_cache.tensors().items():
        assert torch.equal(cache.tensors()[name], t), name
    # and the same tokens from generate
    prompt = ids[:, :prompt_len]
    a = model.generate(prompt, 6, temperature=0.0, cuda_graph=False)
    b = model.generate(prompt, 6, temperature=0.0, cuda_graph="static")
    assert torch.equal(a, b)


def test_states_are_updated_in_place():
    """A prefill and steps write into the cache's own tensors (a CUDA graph keeps reading them)."""
    model = make_model("M W A E")
    ids = torch.randint(0, V, (2, 9))
    cache = model.new_cache(2, 9)
    before = {k: t for k, t in cache.tensors().items()}
    with torch.no_grad():
        model(ids[:, :5], cache=cache)
        model(ids[:, 5:6], cache=cache)
        model(ids[:, 6:9], cache=cache)
    for k, t in cache.tensors().items():
        assert t is before[k], k
        assert t.abs().sum() > 0, k


def test_decode_attention_methods_match_reference():
    torch.manual_seed(1)
    b, h, hkv, d, cap = 2, 6, 2, 8, 7
    q = torch.randn(b, 1, h, d)
    kc, vc = torch.randn(b, hkv, cap, d), torch.randn(b, hkv, cap, d)
    valid = torch.tensor([True, True, False, True, False, False, True])
    k = kc.repeat_interleave(h // hkv, 1)[:, :, valid]  # query head i reads key head i // 3
    v = vc.repeat_interleave(h // hkv, 1)[:, :, valid]
    p = torch.softmax(torch.einsum("bhd,bhkd->bhk", q[:, 0], k) * d ** -0.5, -1)
    ref = torch.einsum("bhk,bhkd->bhd", p, v)[:, None]
    for method in ("sdpa", "matmul"):
        torch.testing.assert_close(_decode_attention(q, kc, vc, valid, method), ref,
                                   atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_mixing_with_ordinary_forward_save_and_load(tmp_path):
    """Steps, then a chunk, then steps again, a saved cartridge, a loaded one: all equal the full
    forward."""
    model = make_model("M W A E")
    ids = torch.randint(0, V, (2, 16))
    full = model(ids).logits
    cache = model.new_cache(2, 16)
    model(ids[:, :4], cache=cache)
    step = GraphedDecodeStep(model, cache, capture=False)
    outs = [step(ids[:, t]).clone() for t in range(4, 7)]
    outs.append(model(ids[:, 7:10], cache=cache).logits[:, -1])
    outs += [step(ids[:, t]).clone() for t in range(10, 12)]
    close(torch.stack(outs, 1), full[:, [4, 5, 6, 9, 10, 11]], tol=1e-4)
    cache.save(tmp_path / "c.cartridge")
    loaded = hs.load_cache(tmp_path / "c.cartridge", model)
    step2 = GraphedDecodeStep(model, loaded, capture=False)
    rest = torch.stack([step2(ids[:, t]).clone() for t in range(12, 16)], 1)
    close(rest, full[:, 12:], tol=1e-4)
    assert loaded.seqlen_offset == 16


@torch.no_grad()
def test_capacity_and_ring_wrap():
    model = make_model("M A")
    cache = model.new_cache(1, 5)
    ids = torch.randint(0, V, (1, 6))
    model(ids[:, :4], cache=cache)
    step = GraphedDecodeStep(model, cache, capture=False)
    step(ids[:, 4])
    with pytest.raises(HybridSeqError, match="KV cache is full"):
        step(ids[:, 5])
    with pytest.raises(HybridSeqError, match="expected 1 token"):
        step(ids[0, :2])
    # sliding-window and Mamba layers decode past max_seq_len: the ring wraps around
    ring = make_model("M W N")
    long = torch.randint(0, V, (2, 13))
    full = ring(long).logits
    got, _ = teacher_forced(ring, long, 1, step_obj=True, max_seq_len=5)
    close(got, full[:, :], tol=1e-4)


def test_generate_arguments_and_blockers():
    model = make_model("M E")
    prompt = torch.randint(0, V, (1, 3))
    with pytest.raises(HybridSeqError, match="CUDA"):
        model.generate(prompt, 4, temperature=0.0, cuda_graph=True)
    with pytest.raises(HybridSeqError, match="cuda_graph"):
        model.generate(prompt, 4, cuda_graph="yes")
    # auto on CPU: the ordinary loop
    assert torch.equal(model.generate(prompt, 4, temperature=0.0),
                       model.generate(prompt, 4, temperature=0.0, cuda_graph=False))
    assert any("CUDA" in r for r in graph_blockers(model, "cpu", torch.float32))
    cap = make_model("M C")
    reasons = graph_blockers(cap, "cuda", torch.bfloat16)
    assert len(reasons) == 1 and "capacity_factor" in reasons[0]
    assert "bfloat16" in graph_blockers(model, "cuda", torch.float32)[0]
    assert graph_blockers(model, "cuda", torch.bfloat16) == []
    with pytest.raises(HybridSeqError, match="CUDA"):
        GraphedDecodeStep(model, model.new_cache(1, 8), capture=True)


@torch.no_grad()
def test_capture_bookkeeping_with_stand_in_cuda(monkeypatch):
    """The capture sequence on CPU with stand-ins for the CUDA stream/graph API (the "captured"
    step runs eagerly, as the warm-up does): whatever the warm-up and capture wrote is put back,
    so the cache is unchanged, and replays then continue exactly like eager steps."""
    import hybridseq.decode_graph as dg

    class Stream:
        def __init__(self, *a, **k):
            pass

        def wait_stream(self, other):
            pass

    class Context:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class Graph:
        fn = None

        def replay(self):
            self.fn()

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: Stream())
    monkeypatch.setattr(torch.cuda, "stream", Context)
    monkeypatch.setattr(torch.cuda, "graph", Context)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(dg, "graph_blockers", lambda *a: [])
    model = make_model("M W A E F")
    ids = torch.randint(0, V, (2, 12))
    ref, _ = teacher_forced(model, ids, 6, step_obj=True)
    cache = model.new_cache(2, 12)
    model(ids[:, :6], cache=cache)
    before = {k: t.clone() for k, t in cache.tensors().items()}
    step = GraphedDecodeStep(model, cache, capture=True)
    assert step.captured and cache.seqlen_offset == 6
    for k, t in cache.tensors().items():
        assert torch.equal(t, before[k]), k
    assert int(cache.position) == 6

    def replay():  # what the graph does: the forward's device work; the host counter untouched
        off = cache.seqlen_offset
        step.logits.copy_(step._forward())
        cache._offset = off

    step.graph.fn = replay
    got = [ref[:, 0]] + [step(ids[:, t]).clone() for t in range(6, 12)]
    assert cache.seqlen_offset == 12 and int(cache.position) == 12
    assert torch.equal(torch.stack(got, 1), ref)


# ----------------------------------------------------------------------------------------------
# the decode bench
# ----------------------------------------------------------------------------------------------
def _bench_args(argv):
    from hybridseq.bench import decode as bench

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return p.parse_args(argv)


def test_bench_decode_static_modes_and_fit(capsys):
    from hybridseq.bench import decode as bench

    argv = [os.path.join(LAYOUTS, "transformer.yaml"), os.path.join(LAYOUTS, "mamba.yaml"),
            "--prompt", "9", "--batch", "3", "--new-tokens", "2", "--warmup", "1",
            "--prefill-chunk", "4", "--vocab", "32", "--dtype", "fp32", "--cuda-graph", "static"]
    rows = bench.run(_bench_args(argv))
    assert [r["mode"] for r in rows] == ["static"] * 2
    assert rows[0]["speedup"] == 1.0  # the first layout is the reference of its mode
    assert rows[1]["speedup"] == pytest.approx(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"])
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["batch"] == 3
        assert r["cache_MB_per_seq"] == pytest.approx(r["cache_MB_per_seq_closed_form"])
    assert "memory estimate" in capsys.readouterr().err
    # a budget between the largest estimates at batch 2 and 3: every layout runs at batch 2
    args = _bench_args(argv)
    cfgs = [bench._config(p, []) for p in argv[:2]]
    e2, e3 = (max(bench.estimate_memory(c, 32, b, 9, bench._cap(args, 2), 4, 4)["total"]
                  for c in cfgs) for b in (2, 3))
    assert e2 < e3
    args.memory_gb = (e2 + e3) / 2 / 1e9
    rows = bench.run(args)
    assert {r["batch"] for r in rows} == {2}
    assert "does not fit" in capsys.readouterr().err


def test_memory_estimate_350m_suite_at_8192x64():
    """The issue's measurement point fits an 80 GB H100 by the estimate; the transformer's
    KV cache is the bulk (24 layers x 2 x 1024 x 8256 positions x 2 bytes x 64 rows)."""
    from hybridseq.bench import decode as bench

    args = _bench_args(["--suite", "350m"])
    cap = bench._cap(args, 2)
    est = {name: bench.estimate_memory(bench._config(path, ov), 50304, 64, 8192, cap, 1024, 2)
           for name, path, ov in bench.SUITES["350m"]}
    tr, jb = est["transformer-354M"], est["jamba-358M-total"]
    assert tr["cache"] == 64 * 24 * 2 * 1024 * cap * 2
    assert 50e9 < tr["total"] < 0.92 * 80e9
    assert jb["cache"] < tr["cache"] / 30
    assert bench.fit_batch([lambda b: b * 1e9], 20e9, 64) == 16
    assert bench.fit_batch([lambda b: b * 1e9], 5.5e9, 64) == 5
    assert bench.fit_batch([lambda b: b * 1e9], 0.5e9, 64) == 0


# ----------------------------------------------------------------------------------------------
# CUDA: the captured graph
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@torch.no_grad()
@pytest.mark.parametrize("dtype,layout", [(torch.float32, "M A W N F M"),
                                          (torch.bfloat16, "M S A W N E F M")])
def test_cuda_graph_equals_ordinary_decode(dtype, layout):
    model = make_model(layout).cuda().to(dtype)
    for layer in model.layers:
        if layer.kind == "mamba":
            layer.block.impl = "auto"  # the Triton one-token kernels
    ids = torch.randint(0, V, (3, 60), device="cuda")
    P = 37
    ref_cache = model.new_cache(3, 60)
    cache = model.new_cache(3, 60)
    ref = [model(ids[:, :P], cache=ref_cache).logits[:, -1]]
    model(ids[:, :P], cache=cache)
    before = {k: t.clone() for k, t in cache.tensors().items()}
    step = GraphedDecodeStep(model, cache, capture=True)
    assert step.captured
    for k, t in cache.tensors().items():  # capturing (and its warm-up) left the cache as it was
        assert torch.equal(t, before[k]), k
    got = [ref[0]]
    for t in range(P, 60):
        ref.append(model(ids[:, t:t + 1], cache=ref_cache).logits[:, -1])
        got.append(step(ids[:, t]).clone())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    close(torch.stack(got, 1).float(), torch.stack(ref, 1).float(), tol=tol)
    if dtype == torch.float32:
        prompt = ids[:, :P]
        a = model.generate(prompt, 16, temperature=0.0, cuda_graph=False)
        b = model.generate(prompt, 16, temperature=0.0, cuda_graph=True)
        assert torch.equal(a, b)
