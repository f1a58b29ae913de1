"""The command line: show, doctor, bench/plugin dispatch, error paths (exit 2, one line, no
traceback), and a tiny train + generate + Ctrl-C through real subprocesses."""
import importlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from hybridseq import cli
from hybridseq.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = """\
name: tiny-cli
model: {d_model: 32}
blocks:
  M: {kind: mamba, d_state: 4}
  F: {kind: mlp, d_ff: 64}
layout: "M F"
train:
  task: {name: selective_copy, seq_len: 8, n_data: 2, vocab: 4}
  steps: 6
  batch_size: 8
  eval_every: 0
  log_every: 2
"""


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_cli(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "hybridseq", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def tiny_yaml(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return str(path)


def assert_user_error(rc, err, *, one_line=True):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[0].startswith("error:"), err
    if one_line:
        assert len(lines) == 1, err


def test_show_prints_rows_and_totals(capsys):
    assert main(["show", "layouts/jamba.yaml"]) == 0
    out = capsys.readouterr().out
    assert out.count("| moe ") == 4 and out.count("| attention ") == 1 and out.count("| mamba ") == 7
    for word in ("total parameters", "active parameters", "FLOPs/token", "inference state", "embedding"):
        assert word in out


@pytest.mark.parametrize("name", ["mamba", "transformer", "moe-mamba", "blackmamba", "jamba", "samba",
                                  "nemotron-h"])
def test_show_every_preset(name, capsys):
    assert main(["show", f"layouts/{name}.yaml"]) == 0
    out = capsys.readouterr().out
    assert "total parameters" in out and "| 0 " in out


def test_show_json_and_overrides(capsys):
    assert main(["show", "layouts/blackmamba.yaml", "model.d_model=128", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["totals"]["d_model"] == 128 and len(data["rows"]) == 4
    assert data["totals"]["active_params"] < data["totals"]["params"]
    assert [r["kind"] for r in data["rows"]] == ["mamba", "moe", "mamba", "moe"]


@pytest.mark.parametrize("args, needle", [
    (["show", "layouts/does-not-exist.yaml"], "does-not-exist"),
    (["show", "layouts/blackmamba.yaml", "model.d_modell=3"], "d_modell"),
    (["show", "layouts/blackmamba.yaml", "model.d_model"], "model.d_model"),
    (["train", "layouts/blackmamba.yaml", "--bogus"], "--bogus"),
    (["frobnicate"], "frobnicate"),
    (["show"], "LAYOUT"),
    (["bench", "no-such-bench"], "no-such-bench"),
    (["train", "layouts/blackmamba.yaml", "--resume"], "--resume"),
])
def test_user_errors_exit_2_with_one_line(capsys, args, needle):
    rc = main(args)
    err = capsys.readouterr().err
    assert_user_error(rc, err)
    assert needle in err


def test_bad_yaml_and_unknown_symbol(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {d_model: 64\nblocks: [\n")
    assert_user_error(main(["show", str(bad)]), capsys.readouterr().err, one_line=False)
    sym = tmp_path / "sym.yaml"
    sym.write_text('model: {d_model: 64}\nblocks: {M: {kind: mamba}}\nlayout: "M X M"\n')
    rc = main(["show", str(sym)])
    err = capsys.readouterr().err
    assert_user_error(rc, err, one_line=False)  # a pattern error may show the caret line
    assert "X" in err.splitlines()[0]


def test_plugin_commands_missing_say_so(monkeypatch, capsys):
    monkeypatch.setitem(cli.PLUGIN_COMMANDS, "compare", ("hybridseq.no_such_module.cli", "x"))
    assert main(["compare", "a.yaml"]) == 2
    err = capsys.readouterr().err
    assert "not in this build" in err and len(err.strip().splitlines()) == 1


def test_bench_lists_modules(capsys):
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.bench_names():
        assert name in out
    assert "common" not in cli.bench_names()


def test_doctor_json(capsys):
    assert main(["doctor", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["torch"] and set(info["backends"]) >= {"mamba", "attention", "moe", "mlp"}
    assert all(b["why"] for b in info["backends"].values())
    assert main(["doctor"]) == 0
    report = capsys.readouterr().out
    for word in ("torch", "deepspeed", "mamba_ssm", "mamba", "attention", "moe", "cuda"):
        assert word in report


def test_usage_without_command(capsys):
    assert main([]) == 2
    assert "show" in capsys.readouterr().out


def test_train_generate_through_subprocesses(tiny_yaml, tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", tiny_yaml, "train.steps=4", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "done: 4 steps" in r.stdout and "Traceback" not in r.stderr
    assert (out / "metrics.jsonl").exists() and (out / "config.yaml").exists()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    g = run_cli("generate", str(out), "--prompt", "1 0 2 5 5", "--max-new-tokens", "3")
    assert g.returncode == 0, g.stderr
    prompt, new = g.stdout.strip().split("|")
    assert prompt.split() == ["1", "0", "2", "5", "5"] and len(new.split()) == 3
    missing = run_cli("show", "nope.yaml")  # the exit status of `python -m hybridseq` itself
    assert_user_error(missing.returncode, missing.stderr)


def test_generate_rejects_text_for_a_token_model(tiny_yaml, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", tiny_yaml, "train.steps=1", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert_user_error(main(["generate", str(out), "--prompt", "hello"]), capsys.readouterr().err)
    assert_user_error(main(["generate", str(tmp_path / "nothing"), "--prompt", "1"]), capsys.readouterr().err)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143),
                                      pytest.param(signal.SIGHUP, 129, marks=pytest.mark.slow),
                                      pytest.param(signal.SIGUSR1, 128 + signal.SIGUSR1, marks=pytest.mark.slow)])
def test_stop_signal_during_train_saves_and_exits_128_plus_signum(tiny_yaml, tmp_path, sig, code):
    """Ctrl-C and the signals schedulers send before a kill stop after the step with a checkpoint;
    the printed command continues the run (its arguments shell-quoted)."""
    out = tmp_path / "run dir"
    proc = subprocess.Popen([sys.executable, "-m", "hybridseq", "train", tiny_yaml, "train.steps=100000",
                             "train.log_every=1", "--out", str(out), "--no-progress"],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        metrics = out / "metrics.jsonl"
        while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size > 0):
            time.sleep(0.2)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert f"{signal.Signals(sig).name}: stopped after step" in err and "Traceback" not in err
    assert f"--out '{out}' --resume" in err  # quoted: the folder name has a space
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert os.path.isfile(out / "checkpoints" / latest / "manifest.json")


def _ci_commands():
    text = open(os.path.join(ROOT, ".ci", "run")).read()
    install = text.split("INSTALL='")[1].split("'\n")[0]
    test = text.split("TEST='")[1].split("'\n")[0]
    return install, test


def test_ci_runs_the_readme_commands():
    install, test = _ci_commands()
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert install == 'pip install torch==2.13.0 && pip install -e ".[dev]"'
    assert install in readme and test in readme
    assert "hybridseq train layouts/blackmamba.yaml" in readme


@pytest.mark.parametrize("pytest_status, expect", [(0, 0), (5, 1), (1, 1)])
def test_ci_script_fails_on_no_tests_and_failures(tmp_path, pytest_status, expect):
    """.ci/run with shims for pip and python: exit 5 from pytest (no tests) must fail the run."""
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "pip").write_text("#!/bin/sh\necho pip \"$@\" >> \"$SHIM_LOG\"\n")
    (shims / "python").write_text(
        "#!/bin/sh\nif [ \"$1\" = \"-m\" ] && [ \"$2\" = \"pytest\" ]; then echo pytest >> \"$SHIM_LOG\"; "
        f"exit {pytest_status}; fi\nexec {sys.executable} \"$@\"\n")
    for f in shims.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{shims}{os.pathsep}{os.environ['PATH']}", SHIM_LOG=str(tmp_path / "log"))
    r = subprocess.run(["bash", os.path.join(ROOT, ".ci", "run")], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == expect, r.stdout + r.stderr
    log = (tmp_path / "log").read_text().split("\n")
    assert log[:3] == ["pip install torch==2.13.0", "pip install -e .[dev]", "pytest"]
    assert "took" in r.stdout


def test_train_and_generate_on_bytes_of_a_text_file(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello hybrid world. " * 50)
    out = tmp_path / "run"
    args = ["train", "layouts/transformer.yaml", "model.d_model=32", "blocks.A.n_heads=2", "layout=A F",
            "train.steps=3", "train.batch_size=4", "train.eval_batches=1",
            f"train.task={{name: text, path: {corpus}, seq_len: 16}}", "--out", str(out), "--no-progress"]
    assert main(args) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "hello ", "--max-new-tokens", "5"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("hello ") and len(text.rstrip("\n")) >= len("hello ")


def test_bench_timing_option(monkeypatch, capsys):
    """Every bench takes --timing pipelined|sync; a bad value is a usage error naming the option;
    the table's footer says which method timed it."""
    from hybridseq.bench import common

    seen = []
    monkeypatch.setattr(common, "_TIMING", {"mode": "pipelined"})
    module = importlib.import_module("hybridseq.bench.scan")
    monkeypatch.setattr(module, "run", lambda args: seen.append(args.timing) or [{"x": 1}])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the footer names the method
    assert main(["bench", "scan", "--timing", "sync"]) == 0
    assert seen == ["sync"] and common.timing() == "sync"
    assert "timing: sync" in capsys.readouterr().out
    assert main(["bench", "scan"]) == 0
    assert seen[-1] == "pipelined" and "timing: pipelined" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "scan", "--timing", "sync"]) == 0
    assert "timing: host wall clock" in capsys.readouterr().out
    rc = main(["bench", "scan", "--timing", "bogus"])
    assert_user_error(rc, capsys.readouterr().err)
    with pytest.raises(ValueError, match="timing"):
        common.set_timing("bogus")

