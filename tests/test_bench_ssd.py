"""`hybridseq bench ssd` on CPU at toy sizes: rows for each implementation (an unavailable one
reported as a row, not raised), the Mamba-2 block rows, the CLI dispatch."""
import argparse

from hybridseq.bench import ssd as bench
from hybridseq.cli import main


def _args(argv):
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return p.parse_args(argv)


def test_rows_on_cpu():
    rows = bench.run(_args(["--shapes", "1x20x2x8x16", "--impls", "torch,mamba_ssm", "--dtype", "fp32",
                            "--iters", "1", "--warmup", "0", "--block", "64", "--block-shape", "1x8"]))
    by = {(r["what"].split()[0], r["impl"]): r for r in rows}
    torch_row = by[("SSD", "torch")]
    assert torch_row["fwd_ms"] > 0 and torch_row["fwd_bwd_ms"] >= torch_row["fwd_ms"]
    assert "error" in by[("SSD", "mamba_ssm")] or "fwd_ms" in by[("SSD", "mamba_ssm")]
    block = next(r for r in rows if r["what"].startswith("Mamba-2 block") and r["impl"] == "hybridseq")
    assert block["fwd_bwd_ms"] > 0 and block["tokens_per_s"] > 0


def test_cli_dispatch(capsys):
    assert main(["bench", "ssd", "--shapes", "1x8x2x4x8", "--impls", "torch", "--dtype", "fp32",
                 "--iters", "1", "--warmup", "0"]) == 0
    assert "SSD B1 L8 H2 P4 N8" in capsys.readouterr().out
