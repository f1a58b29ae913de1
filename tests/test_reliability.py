"""Files from others never run code; no run is lost to a damaged checkpoint, a kill during a save
or a rotation, or a non-finite step. Fault injection on tiny CPU runs."""
import os
import pickle
import shutil

import pytest
import torch

import hybridseq as hs
from hybridseq.cli import main
from hybridseq.errors import HybridSeqError
from hybridseq.train import checkpoint as ckpt
from hybridseq.train import train

CFG = {"name": "rel", "model": {"d_model": 16},
       "blocks": {"M": {"kind": "mamba", "d_state": 4, "impl": "torch"}, "F": {"kind": "mlp"}},
       "layout": "M F",
       "train": {"steps": 6, "save_every": 3, "eval_every": 0, "log_every": 1, "batch_size": 4,
                 "task": {"name": "mqar", "seq_len": 16, "n_pairs": 2, "vocab": 16}}}


def _cfg(**train):
    return hs.load_config({**CFG, "train": {**CFG["train"], **train}})


class _Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    train(_cfg(), out_dir=str(out), progress=False)
    return out


def _plant(path, marker):
    with open(path, "wb") as fh:
        pickle.dump(_Payload(str(marker)), fh)


def test_planted_pickles_never_run(run, tmp_path, capsys):
    """A pickle payload in each file of the newest checkpoint, and beside them under the names
    earlier releases and DeepSpeed use: resume, load, export and generate never unpickle it."""
    newest = ckpt.find_checkpoint(str(run / "checkpoints"))[0]
    names = sorted(os.listdir(newest)) + ["trainer_state.pt", "client_state_rank00000.pt"]
    for name in names:
        copy = tmp_path / f"copy-{name}"
        shutil.copytree(run, copy)
        folder = copy / "checkpoints" / os.path.basename(newest)
        marker = tmp_path / f"ran-{name}"
        _plant(folder / name, marker)
        layout = str(copy / "config.yaml")
        main(["train", layout, "train.steps=7", "--out", str(copy), "--resume", "--no-progress"])
        try:
            hs.load_pretrained(folder)
        except HybridSeqError:
            pass
        main(["export", str(folder), str(tmp_path / f"exp-{name}")])
        main(["generate", str(folder), "--prompt", "1 2", "--tokens", "ids", "--max-new-tokens", "2"])
        capsys.readouterr()
        assert not marker.exists(), name


def test_planted_deepspeed_pickle_is_refused(tmp_path):
    from hybridseq.train.deepspeed_engine import check_deepspeed_files

    ds = tmp_path / "ds" / "zero"
    ds.mkdir(parents=True)
    torch.save({"module": {"w": torch.zeros(2)}, "step": 3}, ds / "mp_rank_00_model_states.pt")
    check_deepspeed_files(str(tmp_path / "ds"))  # plain data passes
    marker = tmp_path / "ran"
    _plant(ds / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    with pytest.raises(HybridSeqError, match="refused"):
        check_deepspeed_files(str(tmp_path / "ds"))
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate weights", "truncate state", "flip a byte", "delete manifest"])
def test_resume_skips_a_damaged_newest_checkpoint(run, tmp_path, damage, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    root = copy / "checkpoints"
    newest = ckpt.find_checkpoint(str(root))[0]
    target = {"truncate weights": "model.safetensors", "truncate state": "trainer_state.safetensors",
              "flip a byte": "trainer_state.json", "delete manifest": "manifest.json"}[damage]
    path = os.path.join(newest, target)
    if damage.startswith("truncate"):
        with open(path, "r+b") as fh:
            fh.truncate(os.path.getsize(path) // 2)
    elif damage == "flip a byte":
        data = bytearray(open(path, "rb").read())
        data[len(data) // 2] ^= 0x01
        open(path, "wb").write(bytes(data))
    else:
        os.remove(path)
    found, skipped = ckpt.find_checkpoint(str(root))
    assert found.endswith("step_00000003") and skipped and skipped[0][0] == newest
    rc = main(["train", str(copy / "config.yaml"), "--out", str(copy), "--resume", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"skipped {newest}" in err and "resumed from" in err and "step_00000003" in err


def test_leftovers_of_killed_saves_and_rotations_are_cleaned(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    root = copy / "checkpoints"
    (root / ".tmp-step_00000009-123").mkdir()
    (root / ".tmp-del-step_00000001-77").mkdir()
    (root / ".tmp-del-step_00000001-77" / "model.safetensors").write_bytes(b"half")
    rc = main(["train", str(copy / "config.yaml"), "train.steps=8", "--out", str(copy), "--resume",
               "--no-progress"])
    assert rc == 0
    assert not [n for n in os.listdir(root) if n.startswith(".tmp-")]


def test_rotation_renames_before_deleting(tmp_path, monkeypatch):
    """A kill during a rotation's deletion leaves a .tmp- folder, never a half step_ folder."""
    root = str(tmp_path)
    for step in (1, 2):
        ckpt.save_checkpoint(root, step, lambda f: open(os.path.join(f, "x"), "w").write("1"), keep_last=2)
    killed = []

    def rmtree(path, ignore_errors=False):
        killed.append(path)
        raise KeyboardInterrupt  # the process dies inside the deletion

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(root, 3, lambda f: open(os.path.join(f, "x"), "w").write("1"), keep_last=2)
    monkeypatch.undo()
    assert os.path.basename(killed[0]).startswith(".tmp-")
    steps = [n for n in os.listdir(root) if n.startswith("step_")]
    assert all(ckpt.verify(os.path.join(root, n)) is None for n in steps), steps


def _poison(step_to_poison):
    """A hook-free way to make one step's loss NaN: a forward hook on the first block."""
    def install(trainer):
        calls = {"n": 0}

        def hook(mod, args, out):
            calls["n"] += 1
            if trainer.step + 1 == step_to_poison:
                return out * float("nan")
            return out

        trainer.model.layers[0].block.register_forward_hook(hook)
    return install


@pytest.mark.parametrize("on_nan", ["stop", "skip"])
def test_non_finite_step_is_never_applied_or_saved(tmp_path, on_nan):
    from hybridseq.train.trainer import NonFiniteError, Trainer

    t = Trainer(_cfg(steps=6, save_every=1, on_nan=on_nan), out_dir=str(tmp_path / "r"), progress=False)
    _poison(4)(t)
    if on_nan == "stop":
        with pytest.raises(NonFiniteError, match=r"loss nan at step 4: first non-finite at layer 0 \(mamba"):
            t.fit()
        # nothing of step 4 was saved; every parameter is finite
        assert ckpt.find_checkpoint(str(tmp_path / "r" / "checkpoints"))[0].endswith("step_00000003")
    else:
        summary = t.fit()
        assert summary["steps"] == 6
    assert all(bool(torch.isfinite(p).all()) for p in t.model.parameters())
    for folder in ckpt.list_checkpoints(str(tmp_path / "r" / "checkpoints")):
        m = hs.load_pretrained(folder[1])
        assert all(bool(torch.isfinite(p).all()) for p in m.parameters())


def test_skip_limit_stops_a_run_that_keeps_failing(tmp_path):
    from hybridseq.train.trainer import NonFiniteError, Trainer

    t = Trainer(_cfg(steps=10, on_nan="skip", nan_skip_limit=2), out_dir=str(tmp_path / "r"), progress=False)
    t.model.layers[0].block.register_forward_hook(lambda m, a, out: out * float("nan"))
    with pytest.raises(NonFiniteError, match="3 non-finite steps in a row"):
        t.fit()
