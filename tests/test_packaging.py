"""The package ships every subpackage, and `hybridseq.kernels` resolves in a source checkout."""
import pathlib
import subprocess
import sys
import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_subpackage_ships():
    """The package finder of pyproject.toml reaches every folder with an __init__.py, the
    kernels' op folders through the hybridseq/kernels link included."""
    from setuptools import find_packages

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = meta["tool"]["setuptools"]["packages"]["find"]["include"]
    shipped = set(find_packages(str(ROOT), include=include))
    found = {".".join(init.parent.relative_to(ROOT).parts)
             for init in (ROOT / "hybridseq").rglob("__init__.py")}
    found |= {"hybridseq.kernels." + ".".join(init.parent.relative_to(ROOT / "kernels").parts)
              for init in (ROOT / "kernels").glob("*/__init__.py")}
    assert "hybridseq.kernels.scan" in found
    assert found <= shipped, f"not shipped: {sorted(found - shipped)}"
    assert (ROOT / "hybridseq" / "kernels").resolve() == (ROOT / "kernels").resolve()


def test_import_is_light_and_kernels_alias_works():
    code = (
        "import sys, hybridseq; assert 'torch' not in sys.modules, 'import hybridseq pulled torch';"
        "import hybridseq.kernels as k; import os;"
        "assert os.path.samefile(os.path.dirname(k.__file__), %r), k.__file__;"
        "assert callable(k.selective_scan) and callable(k.selective_scan_ref)"
    ) % str(ROOT / "kernels")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
