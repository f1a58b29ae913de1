"""Write a small real-text corpus: the documentation strings of this Python's standard library.

    python scripts/make_pydoc_corpus.py data/pydoc/pydoc.jsonl

One JSON line per module of the standard library that has docstrings, ``{"text": ...,
"module": ...}``. The text is the module's docstring, then the docstring of each public class,
function and method, each under its qualified name, in source order. The sources are parsed
with ``ast`` (nothing is imported or run), modules are visited in sorted order, and test
packages are left out, so one Python version always gives the same file (about 1.5-2 MB from
CPython 3.11).

License: the text is taken from CPython's standard library, Copyright (c) 2001 Python Software
Foundation; All Rights Reserved, under the PSF License Agreement (PSF-2.0, a permissive license:
https://docs.python.org/3/license.html). The corpus is generated on your machine from your own
Python and is not shipped with hybridseq.
"""
from __future__ import annotations

import ast
import json
import os
import sys
import sysconfig

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def module_files(root: str):
    """(dotted module name, path) of every .py file under ``root``, sorted."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for f in sorted(files):
            if f.endswith(".py") and not f.startswith("."):
                rel = os.path.relpath(os.path.join(folder, f), root)[:-3].replace(os.sep, ".")
                yield (rel[: -len(".__init__")] if rel.endswith(".__init__") else rel), os.path.join(folder, f)


def docstrings(tree: ast.AST, prefix: str):
    """(qualified name, docstring) of the public classes and functions in ``tree``, in order."""
    for node in tree.body if hasattr(tree, "body") else []:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            name = f"{prefix}.{node.name}"
            doc = ast.get_docstring(node)
            if doc:
                yield name, doc
            if isinstance(node, ast.ClassDef):
                yield from docstrings(node, name)


def document(module: str, path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), filename=path)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"{module}\n\n{doc}")
    parts += [f"{name}\n{doc}" for name, doc in docstrings(tree, module)]
    return "\n\n".join(parts) if parts else None


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    out = argv[0]
    root = sysconfig.get_paths()["stdlib"]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}"
    n = size = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for module, path in module_files(root):
            text = document(module, path)
            if text:
                fh.write(json.dumps({"text": text, "module": module}, ensure_ascii=False) + "\n")
                n += 1
                size += len(text.encode("utf-8"))
    os.replace(tmp, out)
    print(f"{out}: {n} documents, {size / 1e6:.2f} MB of docstrings from {root} (Python "
          f"{sys.version.split()[0]}; PSF License Agreement)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
