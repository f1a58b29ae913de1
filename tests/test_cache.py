"""The hybrid inference cache: prefill + one-token steps equal the full forward for mixed layouts
(prompts shorter and longer than a sliding window, chunked prefill), the window's reach, capacity
errors, and saved states ("cartridges"): exact round trip, foreign caches refused."""
import pytest
import torch

import hybridseq as hs
from hybridseq.errors import HybridSeqError

from conftest import MIXED_VOCAB as V, make_mixed_model as make_model


def assert_logits_close(a, b, tol=1e-4):
    scale = b.abs().max().item()
    assert scale > 0.1  # logits are not trivially small
    assert (a - b).abs().max().item() <= tol * scale


def decode_all(model, ids, prompt_len, chunks=None, max_seq_len=None):
    """Prefill ``prompt_len`` tokens (optionally in ``chunks``), then one token at a time."""
    cache = model.new_cache(ids.shape[0], max_seq_len or ids.shape[1])
    outs, pos = [], 0
    for c in (chunks or [prompt_len]):
        outs.append(model(ids[:, pos:pos + c], cache=cache).logits)
        pos += c
    assert pos == prompt_len
    for t in range(prompt_len, ids.shape[1]):
        outs.append(model(ids[:, t:t + 1], cache=cache).logits)
    assert cache.seqlen_offset == ids.shape[1]
    return torch.cat(outs, dim=1)


# prompts shorter than (1, 3) and longer than (8, 11) the windows (5 and 4)
@pytest.mark.parametrize("layout,prompt_len", [("M A W E F", 1), ("M A W E F", 8), ("W M N", 3),
                                               ("W M N", 11), ("E M F M A", 3)])
@torch.no_grad()
def test_prefill_then_steps_equal_full_forward(layout, prompt_len):
    model = make_model(layout)
    ids = torch.randint(0, V, (2, 14))
    full = model(ids).logits
    assert_logits_close(decode_all(model, ids, prompt_len), full)


@torch.no_grad()
def test_chunked_prefill_equals_full_forward():
    model = make_model("M W A N E")
    ids = torch.randint(0, V, (2, 23))
    full = model(ids).logits
    # chunks shorter than, equal to and longer than the windows (5, 4), then steps
    assert_logits_close(decode_all(model, ids, 19, chunks=[2, 5, 9, 3]), full)
    # a cache larger than needed changes nothing
    assert_logits_close(decode_all(model, ids, 7, max_seq_len=40), full)


@torch.no_grad()
def test_one_layer_sliding_window_ignores_tokens_beyond_window():
    w, L = 5, 14
    model = make_model("W")
    ids = torch.randint(0, V, (2, L))
    logits = model(ids).logits
    t = L - 1
    changed = ids.clone()
    changed[:, : t - w + 1] = (ids[:, : t - w + 1] + 1) % V  # every token outside t's window
    torch.testing.assert_close(model(changed).logits[:, t], logits[:, t], atol=1e-6, rtol=1e-5)
    # and through the ring-buffer cache as well
    assert_logits_close(decode_all(model, changed, 2)[:, t], logits[:, t])
    inside = ids.clone()
    inside[:, t - w + 1] = (ids[:, t - w + 1] + 1) % V
    assert (model(inside).logits[:, t] - logits[:, t]).abs().max() > 1e-3


@torch.no_grad()
def test_state_sizes_and_capacity():
    model = make_model("M A W")
    cache = model.new_cache(batch_size=2, max_seq_len=8)
    m, a, w = cache.states
    assert m["conv"].shape == (2, 3, 32) and m["ssm"].shape == (2, 32, 4)
    assert m["ssm"].dtype == torch.float32
    assert a["k"].shape == (2, 4, 8, 4) and w["k"].shape == (2, 2, 5, 4)  # ring of `window` slots
    ids = torch.randint(0, V, (2, 8))
    model(ids, cache=cache)
    with pytest.raises(HybridSeqError, match="KV cache is full"):
        model(ids[:, :1], cache=cache)
    with pytest.raises(HybridSeqError, match="batch"):
        model(ids[:1, :1], cache=model.new_cache(batch_size=2, max_seq_len=8))
    # sliding-window-only and Mamba-only models decode past max_seq_len: constant state
    ring = make_model("M W")
    c = ring.new_cache(batch_size=1, max_seq_len=5)
    long = torch.randint(0, V, (1, 12))
    full = ring(long).logits
    steps = torch.cat([ring(long[:, t:t + 1], cache=c).logits for t in range(12)], 1)
    assert_logits_close(steps, full)
    cache.reset()
    assert cache.seqlen_offset == 0 and cache.states[0]["ssm"].abs().max() == 0


@torch.no_grad()
def test_cartridge_round_trip_exact(tmp_path):
    model = make_model("M W A E")
    ids = torch.randint(0, V, (2, 12))
    cache = model.new_cache(2, 16)
    model(ids[:, :9], cache=cache)
    path = tmp_path / "prompt.cartridge"
    cache.save(path)
    loaded = hs.load_cache(path, model)
    assert loaded.seqlen_offset == 9 and loaded.max_seq_len == 16 and loaded.batch_size == 2
    for name, t in cache.tensors().items():
        assert torch.equal(loaded.tensors()[name], t), name
    a = model(ids[:, 9:], cache=cache).logits
    b = model(ids[:, 9:], cache=loaded).logits
    assert torch.equal(a, b)
    assert_logits_close(b, model(ids).logits[:, 9:])
    # bf16 state survives as bf16
    c16 = model.new_cache(2, 16, dtype=torch.bfloat16)
    c16.save(tmp_path / "b.cartridge")
    assert hs.load_cache(tmp_path / "b.cartridge", model).states[1]["k"].dtype == torch.bfloat16


@torch.no_grad()
def test_foreign_cache_refused(tmp_path):
    model = make_model("M W A E")
    cache = model.new_cache(1, 8)
    model(torch.randint(0, V, (1, 4)), cache=cache)
    path = tmp_path / "c.cartridge"
    cache.save(path)
    other_layout = make_model("M W A F")
    with pytest.raises(HybridSeqError, match="different model"):
        hs.load_cache(path, other_layout)
    other_size = make_model("M W A E", d_model=32)
    with pytest.raises(HybridSeqError, match="different model"):
        hs.load_cache(path, other_size)
    other_weights = make_model("M W A E", seed=1)
    with pytest.raises(HybridSeqError, match="other weights"):
        hs.load_cache(path, other_weights)
    assert hs.load_cache(path, other_weights, check_weights=False).seqlen_offset == 4
    junk = tmp_path / "junk.cartridge"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(HybridSeqError, match="not a readable"):
        hs.load_cache(junk, model)
    with pytest.raises(HybridSeqError, match="no such"):
        hs.load_cache(tmp_path / "missing", model)


@pytest.mark.gpu
@torch.no_grad()
def test_cuda_prefill_then_steps_equal_full_forward():
    """On CUDA the Mamba layers run the Triton kernels (scan, conv, one-token updates) and the
    attention layers SDPA / FlexAttention: decoding still equals the full forward."""
    model = make_model("M A W N E F M").cuda()
    for b in model.layers:
        if b.kind == "mamba":
            b.block.impl = "auto"
    ids = torch.randint(0, V, (2, 70), device="cuda")
    full = model(ids).logits
    assert_logits_close(decode_all(model, ids, 37, chunks=[30, 7]), full, tol=1e-3)


def test_bench_decode_runs_on_cpu():
    import argparse
    import os

    from hybridseq.bench import decode as bench

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    layouts = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "layouts")
    args = p.parse_args([os.path.join(layouts, "transformer.yaml"), os.path.join(layouts, "samba.yaml"), "--prompt", "12", "--batch", "2",
                         "--new-tokens", "2", "--warmup", "1", "--prefill-chunk", "5", "--vocab", "64",
                         "--dtype", "fp32"])
    rows = bench.run(args)
    assert len(rows) == 2 and rows[0]["speedup"] == 1.0
    for r in rows:
        assert r["tokens_per_s"] > 0
        assert r["cache_MB_per_seq"] == pytest.approx(r["cache_MB_per_seq_closed_form"])


def test_bench_decode_runs_without_autograd(monkeypatch):
    """The decode bench must not record a graph: with autograd on, a long prefill keeps every
    chunk's activations (the 2026-11-22 H100 run ran out of memory that way)."""
    import argparse
    import os

    from hybridseq.bench import decode as bench
    from hybridseq.model import HybridLM

    seen = []
    orig = HybridLM.forward

    def spy(self, *a, **k):
        seen.append(torch.is_grad_enabled())
        return orig(self, *a, **k)

    monkeypatch.setattr(HybridLM, "forward", spy)
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    layouts = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "layouts")
    args = p.parse_args([os.path.join(layouts, "mamba.yaml"), "--prompt", "6", "--batch", "1",
                         "--new-tokens", "1", "--warmup", "0", "--vocab", "32", "--dtype", "fp32"])
    bench.run(args)
    assert seen and not any(seen)
