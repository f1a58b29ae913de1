"""The layer order of the code (pyproject.toml's [tool.importlinter] contracts, explained in
docs/architecture.md) holds: import-linter finds no import that breaks it."""
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_contracts_hold():
    exe = shutil.which("lint-imports") or os.path.join(os.path.dirname(sys.executable), "lint-imports")
    assert os.path.exists(exe), "import-linter is missing: pip install -e '.[dev]'"
    r = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "Contracts: 4 kept, 0 broken." in r.stdout, r.stdout[-2000:]


def test_no_kind_switches_outside_blocks():
    """Outside hybridseq/blocks/ (and the benchmark that times each kind against its anchors, and
    the Hugging Face converter, which maps each kind's tensors to a checkpoint family's) no code
    compares a kind name."""
    import re

    pattern = re.compile(r"""kind\s*(==|!=|in)\s*\(?["'](mamba|mamba2|attention|moe|mlp)["']""")
    offenders = []
    for folder in ("hybridseq", "launch"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            rel = os.path.relpath(dirpath, ROOT)
            if rel.startswith(os.path.join("hybridseq", "blocks")) or rel.startswith(os.path.join("hybridseq", "kernels")):
                continue
            for f in files:
                exempt = (os.path.join("hybridseq", "bench", "block.py"), os.path.join("hybridseq", "interop", "hf.py"))
                if f.endswith(".py") and os.path.join(rel, f) not in exempt:
                    text = open(os.path.join(dirpath, f), encoding="utf-8").read()
                    offenders += [f"{rel}/{f}: {m.group(0)}" for m in pattern.finditer(text)]
    assert not offenders, offenders
