"""Shared test setup.

Triton decides at decoration time whether a kernel runs compiled or in its CPU interpreter, so
TRITON_INTERPRET must be set before any kernel module is imported: without CUDA we set it here.
"""
import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # torch missing: collection errors will say so
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _HAS_CUDA else os.environ.get("DS_ACCELERATOR", "cuda"))


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield


requires_cuda = pytest.mark.skipif(not _HAS_CUDA, reason="needs a CUDA device")


# Small mixed-layout models for the inference-cache tests (test_cache.py, test_decode_graph.py):
# mamba, full attention with RoPE, sliding-window GQA, windowed attention without positions and
# with QK-norm, moe and mlp, at d_model 16.
MIXED_BLOCKS = {
    "M": {"kind": "mamba", "d_state": 4, "impl": "torch"},
    "S": {"kind": "mamba2", "d_state": 4, "headdim": 8, "ngroups": 2, "chunk_size": 16, "impl": "torch"},
    "A": {"kind": "attention", "n_heads": 4},                                  # full, RoPE
    "W": {"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "window": 5},   # sliding GQA
    "N": {"kind": "attention", "n_heads": 2, "window": 4, "rope_theta": None, "qk_norm": True},
    "E": {"kind": "moe", "n_experts": 4, "top_k": 2, "d_ff": 16},
    "F": {"kind": "mlp", "d_ff": 32},
}
MIXED_VOCAB = 41


def make_mixed_model(layout, seed=0, blocks=None, **model):
    """An eval-mode model of ``layout`` over ``blocks`` (default MIXED_BLOCKS), seeded."""
    import hybridseq as hs

    torch.manual_seed(seed)
    cfg = hs.load_config({"model": {"d_model": 16, "vocab_size": MIXED_VOCAB, "init_std": 0.15,
                                    **model},
                          "blocks": blocks or MIXED_BLOCKS, "layout": layout})
    return hs.build_model(cfg).eval()
