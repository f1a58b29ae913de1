"""The package ships every subpackage, and `hybridseq.kernels` resolves in a source checkout."""
import pathlib
import subprocess
import sys
import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_subpackage():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(meta["tool"]["setuptools"]["packages"])
    found = {"hybridseq.kernels"}
    for init in (ROOT / "hybridseq").rglob("__init__.py"):
        rel = init.parent.relative_to(ROOT)
        found.add(".".join(rel.parts))
    assert found == listed, f"pyproject packages differ: missing {found - listed}, extra {listed - found}"
    assert meta["tool"]["setuptools"]["package-dir"]["hybridseq.kernels"] == "kernels"


def test_import_is_light_and_kernels_alias_works():
    code = (
        "import sys, hybridseq; assert 'torch' not in sys.modules, 'import hybridseq pulled torch';"
        "import hybridseq.kernels as k; import os;"
        "assert os.path.samefile(os.path.dirname(k.__file__), %r), k.__file__;"
        "assert callable(k.selective_scan) and callable(k.selective_scan_ref)"
    ) % str(ROOT / "kernels")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
