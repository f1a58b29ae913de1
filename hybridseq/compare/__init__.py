"""``hybridseq compare``: train several layouts on equal terms (same task, data order, seeds and
token budget), measure quality, speed and memory, and write a report.

    hybridseq compare layouts/mamba.yaml layouts/transformer.yaml --task selective_copy \
        --out runs/cmp --seeds 3 --match params train.steps=500

Modules: ``runner`` (loading, equal terms, one folder per run, reuse of finished runs),
``match`` (``--match``: d_model rescaled to equal parameter counts, closed form), ``measure``
(evaluation at several lengths, decoding speed, throughput/memory sweeps, peak memory), ``report``
(report.md, report.json, PNG plots), ``cli`` (the command).
"""
from .match import MatchError, MatchResult, match_layouts
from .runner import CompareOptions, Entry, load_entries, run_entries

__all__ = ["CompareOptions", "Entry", "MatchError", "MatchResult", "compare", "load_entries",
           "match_layouts", "run_entries"]


def compare(layouts, out: str, **options):
    """Python entry point: ``compare(["a.yaml", "b.yaml"], out="runs/cmp", task="mqar", seeds=2)``
    runs what is missing and writes the report; returns (report dict, list of Entry)."""
    from .report import write_report

    opts = CompareOptions(out=out, **options)
    entries = load_entries(list(layouts), opts)
    run_entries(entries, opts)
    return write_report(out, entries, opts), entries
