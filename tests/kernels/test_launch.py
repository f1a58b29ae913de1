"""kernels/_launch.py: the direct relaunch of compiled Triton kernels keys on everything that
decides Triton's specialization, and gives the same results as ``kernel[grid]``."""
import pytest
import torch

from hybridseq.kernels import _launch


def test_key_separates_what_triton_specializes_on(monkeypatch):
    if not torch.cuda.is_available():  # the key names the CUDA device: stub it on CPU
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    base = torch.zeros(64, dtype=torch.float32)
    aligned, shifted = base[:8], base[1:9]  # data pointers 16-byte aligned / 4 bytes off
    k = lambda *args, **c: _launch._key(args, c, {"num_warps": 4})  # noqa: E731
    assert k(aligned, 16) == k(base[4:12], 16)  # both 16-byte aligned, same ints
    assert k(aligned, 16) != k(shifted, 16)
    assert k(aligned, 16) != k(aligned.to(torch.float16), 16)
    assert k(aligned, 16) != k(aligned, 17)
    assert k(aligned, 1) != k(aligned, True)
    assert k(aligned, 16, A=1) != k(aligned, 16, A=2)
    assert (_launch._key((aligned,), {}, {"num_warps": 4})
            != _launch._key((aligned,), {}, {"num_warps": 8}))
    with pytest.raises(TypeError, match="unsupported argument type NoneType"):
        k(aligned, None)


def test_interpreter_never_launches_directly(monkeypatch):
    monkeypatch.setitem(_launch._state, "direct", None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not _launch.direct_enabled()
    monkeypatch.setitem(_launch._state, "direct", None)
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("HYBRIDSEQ_TRITON_DIRECT_LAUNCH", "0")
    assert not _launch.direct_enabled()
    monkeypatch.setitem(_launch._state, "direct", None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_direct_relaunch_matches_and_respects_alignment(monkeypatch):
    import triton
    import triton.language as tl

    @triton.jit
    def _axpy(x_ptr, y_ptr, n, s, BLOCK: tl.constexpr, SCALE: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(y_ptr + offs, tl.load(x_ptr + offs * s, mask=m) * SCALE, mask=m)

    monkeypatch.setitem(_launch._state, "direct", None)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("HYBRIDSEQ_TRITON_DIRECT_LAUNCH", raising=False)
    base = torch.randn(4099, device="cuda")
    for rep in range(3):  # first: compiled and cached; then relaunched directly
        for off, n, s in ((0, 4096, 1), (1, 4096, 1), (3, 1000, 3), (0, 1, 1)):
            x = base[off:]
            y = torch.full((n,), float("nan"), device="cuda")
            _launch.launch(_axpy, (triton.cdiv(n, 256),), (x, y, n, s),
                           {"BLOCK": 256, "SCALE": 2.0 if off else 3.0}, num_warps=4)
            want = x[: n * s: s] * (2.0 if off else 3.0)
            torch.testing.assert_close(y, want)
    assert _launch.direct_enabled()
    assert len(_launch._caches[_axpy]) == 4
