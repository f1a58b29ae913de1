"""The comparison report: ``report.json`` (every number), ``report.md`` (tables with the plots
embedded) and PNG plots, written into the comparison folder.

Over seeds, each scalar metric is summarised as ``{"mean", "std", "n", "values"}`` (``std``: the
sample standard deviation, ddof 1; 0 for a single seed). Plots use matplotlib's Agg canvas
directly (no pyplot, no global backend change):

- ``loss_curves.png``: training loss vs step (mean over seeds, band: +-1 std), eval loss dashed;
- ``accuracy_vs_length.png``: task accuracy vs evaluation length (log2 axis; error bars: std),
  the training length marked;
- ``throughput_vs_seqlen.png``: training tokens/s (forward + backward) vs sequence length;
- ``memory_vs_seqlen.png``: peak training memory and inference-state bytes per sequence vs length.
"""
from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Iterable

from .runner import CompareOptions, Entry, write_json_atomic

REPORT_FORMAT = 1
PLOTS = {
    "loss": "loss_curves.png",
    "accuracy": "accuracy_vs_length.png",
    "throughput": "throughput_vs_seqlen.png",
    "memory": "memory_vs_seqlen.png",
}
# Per-run scalars summarised over seeds.
RUN_METRICS = ("final_eval_loss", "best_eval_loss", "eval_acc", "best_eval_acc", "eval_seq_acc",
               "final_train_loss", "train_tokens_per_s", "peak_memory_bytes", "decode_tokens_per_s",
               "decode_ms_per_token", "cache_bytes_per_seq", "train_wall_s")
# Closed-form numbers (the same for every seed).
STATIC_METRICS = ("params", "active_params", "flops_per_token", "state_bytes", "tokens_seen",
                  "train_seq_len")


# ----------------------------------------------------------------------------------------------
# numbers
# ----------------------------------------------------------------------------------------------
def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def mean_std(values: Iterable) -> dict | None:
    vals = [float(v) for v in values if _num(v)]
    if not vals:
        return None
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "n": len(vals), "values": vals}


def summarize_entry(e: Entry) -> dict:
    """Mean/std over the entry's finished runs, the accuracy per evaluation length, the speed
    sweep (first seed) and the loss curves."""
    runs = e.runs
    out: dict[str, Any] = {"metrics": {}, "lengths": [], "sweep": [], "curves": []}
    for k in (*RUN_METRICS, *STATIC_METRICS):
        s = mean_std(r.get(k) for r in runs)
        if s is not None:
            out["metrics"][k] = s
    by_len: dict[int, list[dict]] = {}
    for r in runs:
        for row in r.get("lengths") or []:
            by_len.setdefault(int(row["seq_len"]), []).append(row)
    for L in sorted(by_len):
        rows = by_len[L]
        good = [x for x in rows if x.get("status") == "ok"]
        item = {"seq_len": L, "status": "ok" if good else rows[0].get("status", "?"),
                "runs_ok": len(good), "tokens": rows[0].get("tokens")}
        for k in ("eval_acc", "eval_loss", "eval_seq_acc"):
            s = mean_std(x.get(k) for x in good)
            if s is not None:
                item[k] = s
        out["lengths"].append(item)
    for r in runs:
        if r.get("sweep"):
            out["sweep"] = r["sweep"]
            out["state_bytes_by_length"] = r.get("state_bytes_by_length", {})
            break
    out["curves"] = [{"seed": r.get("seed"), "loss": r.get("loss_curve", []), "eval": r.get("eval_curve", [])}
                     for r in runs]
    return out


def environment() -> dict:
    """Versions and the device the comparison ran on."""
    import torch

    from .. import __version__

    env = {"hybridseq": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
           "platform": platform.platform(), "cpu_count": os.cpu_count()}
    for name in ("triton", "numpy", "omegaconf", "matplotlib", "deepspeed"):
        try:
            mod = __import__(name)
            env[name] = getattr(mod, "__version__", "?")
        except Exception:
            env[name] = None
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return env


# ----------------------------------------------------------------------------------------------
# formatting
# ----------------------------------------------------------------------------------------------
def _fmt(v: float, kind: str = "") -> str:
    if kind == "bytes":
        for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(v) < 1024 or unit == "TiB":
                return f"{v:.0f} {unit}" if unit == "B" else f"{v:.3g} {unit}"
            v /= 1024
    if kind == "count":
        for unit in ("", "K", "M", "G", "T"):
            if abs(v) < 1000 or unit == "T":
                return f"{v:.0f}" if unit == "" else f"{v:.3g}{unit}"
            v /= 1000
    if kind == "pct":
        return f"{100 * v:.1f}%"
    if kind == "loss":
        return f"{v:.4f}"
    if abs(v) >= 1e4:
        return f"{v:.3g}"
    return f"{v:.4g}"


def _cell(stats: dict | None, kind: str = "", spread: bool = True) -> str:
    """``mean ± std`` (std only with several seeds and ``spread``; closed forms have none)."""
    if not stats:
        return "-"
    s = _fmt(stats["mean"], kind)
    if stats["n"] > 1 and spread:
        s += " ± " + _fmt(stats["std"], kind)
    return s


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------
def _figure(ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4 * ncols, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _save(fig, path: str) -> None:
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


def _mean_curve(curves: list[list], col: int) -> tuple[list, list, list]:
    """Mean and std of column ``col`` over runs, at the steps every run logged."""
    if not curves:
        return [], [], []
    steps = sorted(set.intersection(*[{int(p[0]) for p in c} for c in curves])) if all(curves) else []
    xs, means, stds = [], [], []
    for s in steps:
        vals = [float(p[col]) for c in curves for p in c if int(p[0]) == s and _num(p[col])]
        if vals:
            xs.append(s)
            means.append(statistics.fmean(vals))
            stds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
    return xs, means, stds


def plot_all(folder: str, entries: list[Entry], summaries: dict[str, dict], train_len: int | None) -> dict:
    """Write the four PNGs; -> {plot key: file name}."""
    ok = [e for e in entries if e.ok and e.runs]
    colors = {e.label: f"C{i % 10}" for i, e in enumerate(ok)}
    written = {}

    fig, (ax,) = _figure()
    for e in ok:
        s = summaries[e.label]
        xs, m, sd = _mean_curve([c["loss"] for c in s["curves"]], 1)
        if xs:
            ax.plot(xs, m, "-" if len(xs) > 2 else "-o", color=colors[e.label], label=f"{e.label} (train)")
            if any(sd):
                ax.fill_between(xs, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)],
                                color=colors[e.label], alpha=0.2)
        xs, m, _ = _mean_curve([c["eval"] for c in s["curves"]], 1)
        if xs:
            ax.plot(xs, m, "--o", color=colors[e.label], markersize=3, label=f"{e.label} (eval)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (scored positions)")
    ax.set_title("Loss curves (mean over seeds)")
    if ok:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, os.path.join(folder, PLOTS["loss"]))
    written["loss"] = PLOTS["loss"]

    fig, (ax,) = _figure()
    for e in ok:
        pts = [(x["seq_len"], x["eval_acc"]) for x in summaries[e.label]["lengths"] if "eval_acc" in x]
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts], yerr=[p[1]["std"] for p in pts],
                        marker="o", capsize=3, color=colors[e.label], label=e.label)
        fails = [x["seq_len"] for x in summaries[e.label]["lengths"] if x["status"] != "ok"]
        if fails:
            ax.plot(fails, [0.0] * len(fails), "x", color=colors[e.label], markersize=8)
    if train_len:
        ax.axvline(train_len, color="gray", linestyle=":", label="training length")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("evaluation length (task seq_len)")
    ax.set_ylabel("accuracy on answer positions")
    ax.set_title("Accuracy vs evaluation length (x: out of memory / skipped)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, os.path.join(folder, PLOTS["accuracy"]))
    written["accuracy"] = PLOTS["accuracy"]

    fig, (ax,) = _figure()
    for e in ok:
        pts = [(r["seq_len"], r["train_tokens_per_s"]) for r in summaries[e.label]["sweep"] if r.get("status") == "ok"]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color=colors[e.label], label=e.label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("training tokens/s (forward + backward)")
    ax.set_title("Throughput vs sequence length (fixed tokens per step)")
    if ok:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    _save(fig, os.path.join(folder, PLOTS["throughput"]))
    written["throughput"] = PLOTS["throughput"]

    fig, (ax1, ax2) = _figure(2)
    for e in ok:
        s = summaries[e.label]
        pts = [(r["seq_len"], r["peak_memory_bytes"] / 2**20) for r in s["sweep"] if r.get("status") == "ok"]
        if pts:
            ax1.plot([p[0] for p in pts], [max(p[1], 1e-3) for p in pts], "-o", color=colors[e.label], label=e.label)
        sb = sorted((int(k), v) for k, v in (s.get("state_bytes_by_length") or {}).items())
        if sb:
            ax2.plot([p[0] for p in sb], [p[1] / 2**10 for p in sb], "-o", color=colors[e.label], label=e.label)
    kind = next((r.get("memory_kind") for e in ok for r in summaries[e.label]["sweep"] if r.get("memory_kind")), "")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.grid(alpha=0.3, which="both")
        if ok:
            ax.legend(fontsize=8)
    ax1.set_ylabel(f"peak training memory, MiB ({kind or 'n/a'})")
    ax1.set_title("Training memory (fixed tokens per step)")
    ax2.set_ylabel("inference state per sequence, KiB (bf16)")
    ax2.set_title("Inference state vs length")
    _save(fig, os.path.join(folder, PLOTS["memory"]))
    written["memory"] = PLOTS["memory"]
    return written


# ----------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------
def build_report(entries: list[Entry], opts: CompareOptions, argv: list[str] | None = None) -> dict:
    """The report.json object."""

    ref = next((e for e in entries if e.cfg is not None), None)
    train = ref.cfg.train.to_dict() if ref is not None else None
    layouts = []
    for e in entries:
        status = "failed" if not e.ok else ("ok" if e.runs else "not run")
        item: dict[str, Any] = {"label": e.label, "file": e.path, "status": status}
        if not e.ok:
            item.update({"error": e.error, "failed_at": e.failed_at})
        if e.cfg is not None:
            item["d_model"] = int(e.cfg.model.d_model)
            item["layout"] = e.cfg.layout
            item["stack"] = list(e.cfg.stack)
        if e.match is not None:
            item["match"] = e.match.as_dict()
        s = summarize_entry(e)
        item.update({"seeds_done": [r.get("seed") for r in e.runs], "summary": s["metrics"],
                     "lengths": s["lengths"], "sweep": s["sweep"],
                     "state_bytes_by_length": s.get("state_bytes_by_length", {}), "runs": e.runs})
        layouts.append(item)
    return {
        "format": REPORT_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": argv,
        "options": {k: v for k, v in vars(opts).items()},
        "environment": environment(),
        "train": train,
        "layouts": layouts,
        "failures": [{"label": e.label, "file": e.path, "failed_at": e.failed_at, "error": e.error}
                     for e in entries if not e.ok],
    }


def _markdown(report: dict, entries: list[Entry], summaries: dict, plots: dict) -> str:
    env, train = report["environment"], report["train"] or {}
    task = train.get("task", {})
    seeds = sorted({s for item in report["layouts"] for s in item["seeds_done"]})
    lines = [f"# hybridseq compare: {task.get('name', '?')}", ""]
    if report.get("command"):
        lines += ["```", "hybridseq compare " + " ".join(report["command"]), "```", ""]
    devices = ", ".join(sorted({str(r.get("device_name") or r.get("device")) for e in entries for r in e.runs}))
    tokens = None
    for e in entries:
        m = summaries[e.label]["metrics"]
        if "tokens_seen" in m:
            tokens = m["tokens_seen"]["mean"]
            break
    lines += [
        f"- task: `{', '.join(f'{k}={v}' for k, v in task.items())}`",
        f"- equal terms: {train.get('steps')} steps x {train.get('batch_size')} sequences"
        f" x {train.get('grad_accum')} accumulation, lr {train.get('lr')}, same data order per seed"
        + (f"; {_fmt(tokens, 'count')} training tokens per run" if tokens else ""),
        f"- seeds: {', '.join(map(str, seeds)) or '-'} (mean ± std over seeds where more than one)",
        f"- parameter matching: `{report['options'].get('match')}`",
        f"- device: {devices or env.get('device')}; torch {env.get('torch')}, triton {env.get('triton')}, "
        f"hybridseq {env.get('hybridseq')}, python {env.get('python')}",
        f"- created: {report['created']}",
        "",
        "## Summary",
        "",
    ]
    header = ["layout", "d_model", "params (total / active)", "FLOPs/token", "final eval loss",
              "best eval loss", "accuracy", "train tok/s", "peak train memory", "decode tok/s",
              "state / sequence"]
    rows = []
    for e in entries:
        m = summaries[e.label]["metrics"]
        if not e.runs:
            why = f"FAILED ({e.failed_at})" if not e.ok else "not run (interrupted)"
            rows.append([e.label, "-", "-", "-", why, "-", "-", "-", "-", "-", "-"])
            continue
        params = _cell(m.get("params"), "count", spread=False)
        if m.get("active_params") and m.get("params") and m["active_params"]["mean"] != m["params"]["mean"]:
            params += " / " + _cell(m.get("active_params"), "count", spread=False)
        label = e.label if e.ok else f"{e.label} (FAILED, partial)"
        rows.append([label, str(int(e.cfg.model.d_model)) if e.cfg is not None else "-", params,
                     _cell(m.get("flops_per_token"), "count", spread=False), _cell(m.get("final_eval_loss"), "loss"),
                     _cell(m.get("best_eval_loss"), "loss"), _cell(m.get("eval_acc"), "pct"),
                     _cell(m.get("train_tokens_per_s"), "count"), _cell(m.get("peak_memory_bytes"), "bytes"),
                     _cell(m.get("decode_tokens_per_s"), "count"),
                     _cell(m.get("state_bytes"), "bytes", spread=False)])
    lines += [_md_table(header, rows), ""]
    lines += ["Losses: cross-entropy on the task's answer positions, on fixed evaluation batches. "
              "Accuracy: at the training length, after the last step. Peak memory: "
              + ("CUDA max_memory_allocated" if any(r.get("memory_kind") == "cuda_max_allocated"
                                                    for e in entries for r in e.runs)
                 else "CPU resident-set growth (approximate)")
              + " while building and training. State: inference cache per sequence at the training "
              "length (closed form, bf16).", ""]
    matched = [item for item in report["layouts"] if item.get("match") and item["match"]["mode"] != "none"]
    if matched:
        lines += ["## Parameter matching", "",
                  _md_table(["layout", "d_model (original -> used)", "count (original -> used)", "reference",
                             "difference"],
                            [[it["label"], f"{it['match']['d_model_original']} -> {it['match']['d_model']}",
                              f"{it['match']['count_original']:,} -> {it['match']['count']:,}",
                              f"{it['match']['target']:,}", f"{100 * it['match']['rel_diff']:+.2f}%"]
                             for it in matched]), ""]
    all_lengths = sorted({x["seq_len"] for e in entries for x in summaries[e.label]["lengths"]})
    if all_lengths:
        rows = []
        for e in entries:
            by = {x["seq_len"]: x for x in summaries[e.label]["lengths"]}
            if not by:
                continue
            rows.append([e.label] + [(_cell(by[L]["eval_acc"], "pct") if "eval_acc" in by[L] else by[L]["status"])
                                     if L in by else "-" for L in all_lengths])
        train_len = (report["train"] or {}).get("task", {}).get("seq_len")
        lines += ["## Accuracy vs evaluation length", "",
                  f"Trained at seq_len {train_len}; `oom`: out of memory, `skipped`: time budget spent.", "",
                  _md_table(["layout"] + [str(L) for L in all_lengths], rows), ""]
    sweep_lengths = sorted({r["seq_len"] for e in entries for r in summaries[e.label]["sweep"]})
    if sweep_lengths:
        rows = []
        for e in entries:
            by = {r["seq_len"]: r for r in summaries[e.label]["sweep"]}
            if not by:
                continue
            rows.append([e.label] + [(f"{_fmt(by[L]['train_tokens_per_s'], 'count')} / "
                                      f"{_fmt(by[L]['peak_memory_bytes'], 'bytes')}"
                                      if by[L].get("status") == "ok" else by[L].get("status", "?"))
                                     if L in by else "-" for L in sweep_lengths])
        lines += ["## Training throughput / peak memory vs sequence length", "",
                  "Forward + backward at a fixed number of tokens per step (first seed's model).", "",
                  _md_table(["layout"] + [str(L) for L in sweep_lengths], rows), ""]
    lines += ["## Plots", ""]
    titles = {"loss": "Loss curves", "accuracy": "Accuracy vs evaluation length",
              "throughput": "Throughput vs sequence length", "memory": "Memory vs sequence length"}
    for key, name in plots.items():
        lines += [f"![{titles[key]}]({name})", ""]
    failures = report["failures"]
    if failures:
        lines += ["## Failures", ""]
        for f in failures:
            lines += [f"- **{f['label']}** (`{f['file']}`, at {f['failed_at']}): {f['error']}"]
        lines += [""]
    lines += ["Every number, per seed, with versions and device: `report.json`. Runs: `runs/<layout>/seed<k>/`.", ""]
    return "\n".join(lines)


def write_report(folder: str, entries: list[Entry], opts: CompareOptions, argv: list[str] | None = None) -> dict:
    """Write report.json, the PNGs and report.md into ``folder``; returns the report object."""
    os.makedirs(folder, exist_ok=True)
    report = build_report(entries, opts, argv)
    summaries = {e.label: summarize_entry(e) for e in entries}
    train_len = (report["train"] or {}).get("task", {}).get("seq_len")
    from ..extras import available

    if available("matplotlib"):
        plots = plot_all(folder, entries, summaries, train_len)
    else:  # the report stands without its figures; say how to get them
        import sys

        plots = {}
        print("compare: no plots: they need matplotlib (pip install 'hybridseq[plots]')", file=sys.stderr)
    report["plots"] = plots
    write_json_atomic(os.path.join(folder, "report.json"), report)
    text = _markdown(report, entries, summaries, plots)
    tmp = os.path.join(folder, ".report.md.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, os.path.join(folder, "report.md"))
    return report


__all__ = ["PLOTS", "build_report", "environment", "mean_std", "plot_all", "summarize_entry", "write_report"]
