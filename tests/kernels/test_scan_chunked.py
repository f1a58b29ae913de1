"""selective_scan_chunked (the CPU training path) against selective_scan_ref: forward and every
gradient at float64, fp32/bf16 tolerances, extreme decays, chunk-size invariance, memory."""
import pytest
import torch

from hybridseq.kernels import selective_scan_chunked, selective_scan_ref

B_, D_, N_ = 2, 6, 4  # batch, dim, dstate of the comparison cases (dim 6 = 2 groups of 3)

OPTIONS = {
    "plain": {},
    "D": dict(D=True),
    "z": dict(z=True),
    "bias": dict(delta_bias=True),
    "softplus": dict(delta_softplus=True),
    "bias_softplus": dict(delta_bias=True, delta_softplus=True),
    "initial_state": dict(initial_state=True),
    "final_state": dict(return_final_state=True),
    "groups2": dict(groups=2),
    "all": dict(D=True, z=True, delta_bias=True, delta_softplus=True, initial_state=True,
                return_final_state=True),
    "all_groups2": dict(D=True, z=True, delta_bias=True, delta_softplus=True,
                        initial_state=True, return_final_state=True, groups=2),
}


def make_inputs(l, opts, b=B_, d=D_, n=N_, dtype=torch.float64, delta_scale=1.0):
    """Random inputs for ``opts``; tensors require grad. Returns (args, kwargs)."""
    g = opts.get("groups")
    bc = (b, l, n) if g is None else (b, l, g, n)
    softplus = opts.get("delta_softplus", False)
    delta = torch.randn(b, l, d, dtype=dtype) * delta_scale
    if not softplus:
        delta = delta.abs()  # keep dt > 0 as a softplus would
    args = [torch.randn(b, l, d, dtype=dtype), delta,
            -torch.rand(d, n, dtype=dtype) * 2 - 0.1,
            torch.randn(bc, dtype=dtype), torch.randn(bc, dtype=dtype)]
    kw = dict(delta_softplus=softplus, return_final_state=opts.get("return_final_state", False))
    if opts.get("D"):
        kw["D"] = torch.randn(d, dtype=dtype)
    if opts.get("z"):
        kw["z"] = torch.randn(b, l, d, dtype=dtype)
    if opts.get("delta_bias"):
        kw["delta_bias"] = torch.rand(d, dtype=dtype) * 0.5
    if opts.get("initial_state"):
        kw["initial_state"] = torch.randn(b, d, n, dtype=dtype)
    for t in [*args, *kw.values()]:
        if isinstance(t, torch.Tensor):
            t.requires_grad_(True)
    return args, kw


def outputs_and_grads(fn, args, kw, seed=1):
    """Outputs of fn and the gradients of a random linear function of them w.r.t. every input."""
    out = fn(*args, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum()
               for o in outs)
    inputs = [t for t in [*args, *kw.values()] if isinstance(t, torch.Tensor)]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return outs, grads


def assert_close_scaled(actual, expected, rtol, name):
    assert actual is not None, f"{name}: no gradient"
    assert torch.isfinite(actual).all(), f"{name}: not finite"
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol,
                               atol=rtol * max(scale, 1e-3), msg=lambda m: f"{name}: {m}")


def compare(args, kw, rtol, chunk_size=16, ref_args=None):
    ref_args = ref_args or (args, kw)
    outs, grads = outputs_and_grads(
        lambda *a, **k: selective_scan_chunked(*a, **k, chunk_size=chunk_size), args, kw)
    routs, rgrads = outputs_and_grads(selective_scan_ref, *ref_args)
    assert len(outs) == len(routs)
    for i, (o, r) in enumerate(zip(outs, routs)):
        assert o.shape == r.shape
        assert_close_scaled(o, r, rtol, f"output {i}")
    names = ["u", "delta", "A", "B", "C", *[k for k, v in kw.items() if isinstance(v, torch.Tensor)]]
    for name, g, r in zip(names, grads, rgrads):
        assert_close_scaled(g, r, rtol, f"d{name}")


@pytest.mark.parametrize("opt", list(OPTIONS))
@pytest.mark.parametrize("seqlen", [1, 7, 129])
def test_float64_matches_ref_forward_and_all_grads(seqlen, opt):
    args, kw = make_inputs(seqlen, OPTIONS[opt])
    compare(args, kw, rtol=1e-10, chunk_size=16)  # 129 steps = 9 chunks, the last of 1 step


def test_float64_default_chunk_many_chunks():
    args, kw = make_inputs(200, OPTIONS["all_groups2"])
    compare(args, kw, rtol=1e-10, chunk_size=None)


@pytest.mark.parametrize("chunk_size", [1, 3, 64, 1000])
def test_chunk_size_does_not_change_the_result(chunk_size):
    args, kw = make_inputs(70, OPTIONS["all"])
    compare(args, kw, rtol=1e-10, chunk_size=chunk_size)


def test_float32_within_tolerance_of_float64_ref():
    args, kw = make_inputs(129, OPTIONS["all_groups2"])
    args32 = [a.detach().float().requires_grad_() for a in args]
    kw32 = {k: (v.detach().float().requires_grad_() if isinstance(v, torch.Tensor) else v)
            for k, v in kw.items()}
    out = selective_scan_chunked(*args32, **kw32)
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32
    compare(args32, kw32, rtol=1e-4, ref_args=(args, kw))


def test_bfloat16_inputs():
    args, kw = make_inputs(33, OPTIONS["all"])
    low = [a.detach().bfloat16().requires_grad_() for a in args]
    low[2] = args[2].detach().float().requires_grad_()  # A stays fp32
    kwl = dict(kw)
    for k in ("D", "delta_bias"):
        kwl[k] = kw[k].detach().float().requires_grad_()
    kwl["z"] = kw["z"].detach().bfloat16().requires_grad_()
    kwl["initial_state"] = kw["initial_state"].detach().float().requires_grad_()
    y, h = selective_scan_chunked(*low, **kwl)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    # the reference on the same (rounded) values, in float64
    rargs = [a.detach().double().requires_grad_() for a in low]
    rkw = {k: (v.detach().double().requires_grad_() if isinstance(v, torch.Tensor) else v)
           for k, v in kwl.items()}
    compare(low, kwl, rtol=2e-2, ref_args=(rargs, rkw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_dt_long_decay_is_finite_and_correct(dtype):
    """dt * A reaches -1000 per step and sums to about -1e5 over the sequence: any
    exp(cumsum) / exp(-cumsum) formulation overflows here; a product of decays does not."""
    l, d, n = 300, 4, 4
    args, kw = make_inputs(l, OPTIONS["all"], d=d, n=n, dtype=dtype)
    with torch.no_grad():
        args[1].copy_(torch.rand(2, l, d, dtype=dtype) * 60 - 10)  # softplus(delta) up to 50
        args[2].copy_(-torch.arange(1, n + 1, dtype=dtype).repeat(d, 1) * 5)  # A down to -20
        args[1][:, :, 0] = -30.0  # channel 0: dt ~ 1e-13, decay ~ 1: a very long memory
    cumsum = (torch.nn.functional.softplus(args[1] + kw["delta_bias"])[..., None]
              * args[2]).sum(1)
    assert cumsum.min() < -1e4  # exp(-cumsum) would be inf
    compare(args, kw, rtol=1e-10 if dtype == torch.float64 else 1e-4, chunk_size=32)


def test_gradcheck_tiny():
    args, kw = make_inputs(5, OPTIONS["all_groups2"], b=1, d=4, n=2)
    names = [k for k, v in kw.items() if isinstance(v, torch.Tensor)]

    def fn(*tensors):
        a = list(tensors[:5])
        k = dict(kw, **dict(zip(names, tensors[5:])))
        return selective_scan_chunked(*a, **k, chunk_size=2)

    assert torch.autograd.gradcheck(fn, (*args, *[kw[k] for k in names]))


def test_only_some_inputs_need_grad_and_no_grad_mode():
    args, kw = make_inputs(20, OPTIONS["all"])
    for t in [*args, *kw.values()]:
        if isinstance(t, torch.Tensor):
            t.requires_grad_(False)
    args[3].requires_grad_(True)  # B only
    y, _ = selective_scan_chunked(*args, **kw)
    (gB,) = torch.autograd.grad(y.sum(), [args[3]])
    yr, _ = selective_scan_ref(*args, **kw)
    (gBr,) = torch.autograd.grad(yr.sum(), [args[3]])
    torch.testing.assert_close(gB, gBr)
    with torch.no_grad():
        y2, _ = selective_scan_chunked(*args, **kw)
    torch.testing.assert_close(y2, y.detach())


def test_final_state_gradient_alone():
    args, kw = make_inputs(40, OPTIONS["all"])
    _, h = selective_scan_chunked(*args, **kw, chunk_size=16)
    _, hr = selective_scan_ref(*args, **kw)
    g = torch.autograd.grad(h.sum(), [args[0], kw["initial_state"]])
    gr = torch.autograd.grad(hr.sum(), [args[0], kw["initial_state"]])
    for a, r in zip(g, gr):
        torch.testing.assert_close(a, r)


def test_inputs_are_not_modified():
    args, kw = make_inputs(37, OPTIONS["all_groups2"])
    before = [t.detach().clone() for t in [*args, *kw.values()] if isinstance(t, torch.Tensor)]
    outputs_and_grads(lambda *a, **k: selective_scan_chunked(*a, **k, chunk_size=8), args, kw)
    after = [t.detach() for t in [*args, *kw.values()] if isinstance(t, torch.Tensor)]
    for x, y in zip(before, after):
        assert torch.equal(x, y)


def test_backward_saves_no_per_step_state():
    """What autograd keeps is O(b*l*d + b*d*n*l/chunk), not a (b, l, d, n) tensor."""
    b, l, d, n, chunk = 2, 256, 16, 16, 32
    args, kw = make_inputs(l, OPTIONS["all"], b=b, d=d, n=n, dtype=torch.float32)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, h = selective_scan_chunked(*args, **kw, chunk_size=chunk)
    assert saved, "the saved-tensor hooks saw nothing"
    assert max(saved) <= max(b * l * d, b * d * n * (l // chunk))
    assert sum(saved) < b * l * d * n / 2
    (y.sum() + h.sum()).backward()
    assert torch.isfinite(args[0].grad).all()


def test_empty_sequence_returns_initial_state():
    args, kw = make_inputs(0, OPTIONS["all"])
    y, h = selective_scan_chunked(*args, **kw)
    assert y.shape == (B_, 0, D_)
    torch.testing.assert_close(h, kw["initial_state"].detach())


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_chunk_size(bad):
    args, kw = make_inputs(4, {})
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan_chunked(*args, **kw, chunk_size=bad)


def test_autocast_does_not_change_the_computation():
    args, kw = make_inputs(20, OPTIONS["all"], dtype=torch.float32)
    y, h = selective_scan_chunked(*args, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, ha = selective_scan_chunked(*args, **kw)
    assert ya.dtype == torch.float32
    torch.testing.assert_close(ya, y)
    torch.testing.assert_close(ha, h)
