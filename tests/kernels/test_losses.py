"""The fused LM head + cross-entropy: loss and gradients against the unfused reference (odd
sizes, chunks that do not divide the tokens, vocabularies that are not a multiple of the Triton
block, ignored labels, all labels ignored, bf16, autocast), that no (N, V) float32 tensor is ever
created, and the custom ops torch.compile traces. The Triton kernels run in the interpreter on
CPU."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hybridseq.kernels as K
from hybridseq.kernels.losses import linear_cross_entropy, linear_cross_entropy_ref
from hybridseq.kernels.losses.chunked import auto_chunk_size

IMPLS = ["torch", "triton"]


def inputs(n_shape, d, v, dtype=torch.float32, ignore=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*n_shape, d, generator=g).to(dtype)
    w = (torch.randn(v, d, generator=g) / d ** 0.5).to(dtype)
    labels = torch.randint(0, v, n_shape, generator=g)
    flat = labels.view(-1)
    for i in ignore:
        if i < flat.numel():
            flat[i] = -100
    return h, w, labels


def loss_and_grads(fn, h, w, labels, **kw):
    hs, ws = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(hs, ws, labels, **kw)
    gh, gw = torch.autograd.grad(loss, [hs, ws])
    return loss, gh, gw


def assert_match(got, want, rtol, atol):
    for name, a, b in zip(("loss", "dh", "dw"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype)
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True, msg=name)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape, d, v, chunk", [
    ((3, 7), 16, 37, 5),      # 21 tokens in chunks of 5 (the last one 1 token)
    ((2, 9), 12, 100, 4),     # vocab over one interpreter block (64) plus a partial one
    ((13,), 8, 5, 1),         # one token per chunk, tiny vocab
    ((4, 5), 24, 64, 20),     # one chunk of everything
    ((4, 5), 24, 64, 1000),   # a chunk larger than the tokens
    ((1, 1), 3, 2, None),     # the default chunk size
])
def test_fp32_matches_reference(impl, shape, d, v, chunk):
    h, w, labels = inputs(shape, d, v, ignore=(0, 2))
    got = loss_and_grads(linear_cross_entropy, h, w, labels, chunk_size=chunk, impl=impl)
    want = loss_and_grads(linear_cross_entropy_ref, h, w, labels)
    assert_match(got, want, rtol=1e-5, atol=1e-6)


def test_float64_inputs():
    """float64 logits, a float32 loss (the reference's ``.float()`` too), float64 gradients."""
    h, w, labels = inputs((5, 7), 10, 23, dtype=torch.float64, ignore=(3,))
    got = loss_and_grads(linear_cross_entropy, h, w, labels, chunk_size=6, impl="torch")
    want = loss_and_grads(linear_cross_entropy_ref, h, w, labels)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float64
    assert_match(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_labels_ignored(impl):
    """As F.cross_entropy: a NaN loss (0 / 0) and zero gradients."""
    h, w, labels = inputs((3, 4), 8, 11)
    labels[:] = -100
    got = loss_and_grads(linear_cross_entropy, h, w, labels, chunk_size=5, impl=impl)
    want = loss_and_grads(linear_cross_entropy_ref, h, w, labels)
    assert torch.isnan(got[0]) and torch.isnan(want[0])
    assert not got[1].any() and not got[2].any()
    assert_match(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_other_ignore_index(impl):
    h, w, labels = inputs((2, 6), 8, 13)
    labels[0, 1] = labels[1, 4] = 7  # class 7 ignored
    got = loss_and_grads(linear_cross_entropy, h, w, labels, ignore_index=7, chunk_size=4,
                         impl=impl)
    want = loss_and_grads(linear_cross_entropy_ref, h, w, labels, ignore_index=7)
    assert_match(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16(impl):
    """bf16 h and weight: logits in bf16, logsumexp in fp32, gradients in bf16; the reference
    runs the same precision (bf16 GEMMs, fp32 loss)."""
    h, w, labels = inputs((4, 9), 32, 77, dtype=torch.bfloat16, ignore=(1, 5, 30))
    got = loss_and_grads(linear_cross_entropy, h, w, labels, chunk_size=7, impl=impl)
    want = loss_and_grads(linear_cross_entropy_ref, h, w, labels)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.bfloat16
    assert_match(got, want, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("impl", IMPLS)
def test_autocast_fp32_master_weight(impl):
    """Under bf16 autocast with fp32 h and weight (the model's LM head in training): logits in
    bf16 as an autocast F.linear, gradients back in fp32."""
    h, w, labels = inputs((3, 8), 16, 45, ignore=(2,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_and_grads(linear_cross_entropy, h, w, labels, chunk_size=5, impl=impl)
        want = loss_and_grads(linear_cross_entropy_ref, h, w, labels)
    assert got[1].dtype == got[2].dtype == torch.float32
    assert_match(got, want, rtol=2e-2, atol=2e-3)


def test_only_one_input_needs_grad():
    h, w, labels = inputs((3, 5), 8, 19)
    ws = w.clone().requires_grad_()
    (gw,) = torch.autograd.grad(linear_cross_entropy(h, ws, labels, chunk_size=4), [ws])
    wr = w.clone().requires_grad_()
    (gwr,) = torch.autograd.grad(linear_cross_entropy_ref(h, wr, labels), [wr])
    torch.testing.assert_close(gw, gwr, rtol=1e-5, atol=1e-6)
    hs = h.clone().requires_grad_()
    (gh,) = torch.autograd.grad(linear_cross_entropy(hs, w, labels, chunk_size=4), [hs])
    hr = h.clone().requires_grad_()
    (ghr,) = torch.autograd.grad(linear_cross_entropy_ref(hr, w, labels), [hr])
    torch.testing.assert_close(gh, ghr, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- memory

class LargestTensors(TorchDispatchMode):
    """Records the element count of the largest floating tensor each op creates, per dtype."""

    def __init__(self):
        super().__init__()
        self.largest: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.dtype.is_floating_point:
                self.largest[t.dtype] = max(self.largest.get(t.dtype, 0), t.numel())
        return out


@pytest.mark.parametrize("impl", IMPLS)
def test_no_n_by_v_tensor_is_created(impl):
    """Forward and backward of the fused op never create a float tensor of N * V elements (nor
    anything near it: at most one chunk's logits); the unfused reference does (the check's own
    check)."""
    n, d, v, chunk = 64, 8, 96, 8
    h, w, labels = inputs((n,), d, v, ignore=(3,))
    for fn, kw in ((linear_cross_entropy, dict(chunk_size=chunk, impl=impl)),
                   (linear_cross_entropy_ref, {})):
        hs, ws = h.clone().requires_grad_(), w.clone().requires_grad_()
        with LargestTensors() as rec:
            fn(hs, ws, labels, **kw).backward()
        biggest = max(rec.largest.values())
        if fn is linear_cross_entropy_ref:
            assert rec.largest[torch.float32] >= n * v
        else:
            assert biggest <= max(chunk * v, v * d, n * d), rec.largest


def test_default_chunk_bounds_the_logits():
    assert auto_chunk_size(10, 50304) == 10
    c = auto_chunk_size(1 << 20, 50304)
    assert c % 256 == 0 and c * 50304 <= 2 ** 27
    assert auto_chunk_size(1 << 20, 10 ** 7) == 256  # at least 256 tokens


# -------------------------------------------------------------------------- custom ops

@pytest.mark.parametrize("triton", [False, True])
def test_custom_ops_opcheck(triton):
    from hybridseq.kernels.losses import ops

    h, w, labels = inputs((9,), 8, 21, ignore=(4,))
    torch.library.opcheck(ops._fwd_op, (h.requires_grad_(), w.requires_grad_(), labels, -100, 4,
                                        triton))


@pytest.mark.parametrize("impl", IMPLS)
def test_compiled_matches_eager(impl):
    """torch.compile(fullgraph=True) traces the custom ops (no graph break) and gives the eager
    loss and gradients."""
    def fn(h, w, labels):
        return linear_cross_entropy(h, w, labels, chunk_size=5, impl=impl)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    h, w, labels = inputs((3, 7), 16, 37, ignore=(0, 9))
    got = loss_and_grads(lambda a, b, c: compiled(a, b, c), h, w, labels)
    want = loss_and_grads(fn, h, w, labels)
    assert_match(got, want, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------- the entry point

def test_exports_and_cpu_default():
    assert K.linear_cross_entropy is linear_cross_entropy
    assert K.linear_cross_entropy_ref is linear_cross_entropy_ref
    h, w, labels = inputs((3, 5), 8, 19)
    torch.testing.assert_close(linear_cross_entropy(h, w, labels),
                               linear_cross_entropy_ref(h, w, labels))
    torch.testing.assert_close(linear_cross_entropy(h, w, labels, impl="ref"),
                               linear_cross_entropy_ref(h, w, labels))


@pytest.mark.parametrize("kw, exc, match", [
    (dict(weight=torch.randn(7, 5)), ValueError, r"h must be \(\.\.\., d\) and weight \(V, d\)"),
    (dict(labels=torch.zeros(3, 4, dtype=torch.long)), ValueError, "labels must be an int64"),
    (dict(labels=torch.zeros(3, 5)), ValueError, "labels must be an int64"),
    (dict(chunk_size=0), ValueError, "chunk_size must be None or a positive int"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
    (dict(impl="cuda"), ValueError, "linear_cross_entropy impl must be one of"),
])
def test_argument_checks(kw, exc, match):
    args = dict(h=torch.randn(3, 5, 8), weight=torch.randn(7, 8),
                labels=torch.zeros(3, 5, dtype=torch.long))
    args.update(kw)
    with pytest.raises(exc, match=match):
        linear_cross_entropy(**args)
