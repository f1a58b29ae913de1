"""Plain-text tables and human-readable numbers for the CLI (no torch: ``hybridseq show`` and
``--help`` start fast)."""
from __future__ import annotations

from typing import Sequence


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no rows)"
    if columns is None:
        columns = []
        for r in rows:
            for k in r:
                if k not in columns:
                    columns.append(k)

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in cells]
    return "\n".join(out)


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M' (base 10; bytes use base 2: 'KiB', 'MiB')."""
    if unit == "B":
        for u in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(n) < 1024 or u == "TiB":
                return f"{n:.0f} {u}" if u == "B" else f"{n:.2f} {u}"
            n /= 1024
    for u in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000 or u == "P":
            return f"{n:.0f}{u}" if u == "" else f"{n:.3g}{u}"
        n /= 1000
    return str(n)
