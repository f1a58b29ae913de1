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
