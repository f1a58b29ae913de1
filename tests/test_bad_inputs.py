"""A corpus of bad inputs, each through ``hybridseq show`` and ``hybridseq train``: exit status 2,
one line that names the file and the key, no traceback, nothing written. Then bad generate
arguments and bad cartridge metadata, refused before anything is allocated."""
import copy
import os

import pytest
import torch
import yaml

from hybridseq.cli import main

BASE = {
    "name": "bad",
    "model": {"d_model": 16},
    "blocks": {"M": {"kind": "mamba", "d_state": 4}, "S": {"kind": "mamba2", "d_state": 4, "headdim": 8},
               "A": {"kind": "attention", "n_heads": 2}, "E": {"kind": "moe", "n_experts": 4, "top_k": 2},
               "F": {"kind": "mlp"}},
    "layout": "M S A E F",
    "train": {"steps": 1, "task": {"name": "mqar", "seq_len": 32, "n_pairs": 2, "vocab": 16}},
}


def patched(**changes):
    """BASE with dotted-key changes ("blocks.M.d_state": 0); None deletes the key."""
    cfg = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        node = cfg
        parts = dotted.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = value
    return cfg


INF, NAN = float("inf"), float("nan")
# (id, config (dict) or raw YAML text, the key the message must name)
CASES = [
    ("d_model zero", patched(**{"model.d_model": 0}), "model.d_model"),
    ("d_model float", patched(**{"model.d_model": 1e12}), "model.d_model"),
    ("d_model huge", patched(**{"model.d_model": 10 ** 9}), "model.d_model"),
    ("d_model string", patched(**{"model.d_model": "big"}), "model.d_model"),
    ("vocab huge", patched(**{"model.vocab_size": 10 ** 12}), "model.d_model"),
    ("vocab float", patched(**{"model.vocab_size": 1e12}), "model.vocab_size"),
    ("vocab one", patched(**{"model.vocab_size": 1}), "model.vocab_size"),
    ("vocab below task", patched(**{"model.vocab_size": 8}), "model.vocab_size"),
    ("norm_eps nan", patched(**{"model.norm_eps": NAN}), "model.norm_eps"),
    ("norm_eps inf", patched(**{"model.norm_eps": INF}), "model.norm_eps"),
    ("norm_eps negative", patched(**{"model.norm_eps": -1e-5}), "model.norm_eps"),
    ("init_std nan", patched(**{"model.init_std": NAN}), "model.init_std"),
    ("pad multiple zero", patched(**{"model.pad_vocab_multiple": 0}), "model.pad_vocab_multiple"),
    ("checkpointing kind", patched(**{"model.checkpointing": ["mambaa"]}), "model.checkpointing[0]"),
    ("tie not bool", patched(**{"model.tie_embeddings": "yes"}), "model.tie_embeddings"),
    ("lr inf", patched(**{"train.lr": INF}), "train.lr"),
    ("lr nan", patched(**{"train.lr": NAN}), "train.lr"),
    ("lr zero", patched(**{"train.lr": 0}), "train.lr"),
    ("weight decay nan", patched(**{"train.weight_decay": NAN}), "train.weight_decay"),
    ("grad clip nan", patched(**{"train.grad_clip": NAN}), "train.grad_clip"),
    ("grad clip negative", patched(**{"train.grad_clip": -1}), "train.grad_clip"),
    ("min lr ratio", patched(**{"train.min_lr_ratio": 2}), "train.min_lr_ratio"),
    ("betas nan", patched(**{"train.betas": [0.9, NAN]}), "train.betas"),
    ("betas one", patched(**{"train.betas": [1.0, 0.9]}), "train.betas"),
    ("steps zero", patched(**{"train.steps": 0}), "train.steps"),
    ("batch negative", patched(**{"train.batch_size": -4}), "train.batch_size"),
    ("grad accum float", patched(**{"train.grad_accum": 2.5}), "train.grad_accum"),
    ("device gpu", patched(**{"train.device": "gpu"}), "train.device"),
    ("precision fp8", patched(**{"train.precision": "fp8"}), "train.precision"),
    ("on_nan typo", patched(**{"train.on_nan": "ignore"}), "train.on_nan"),
    ("nan skip limit zero", patched(**{"train.nan_skip_limit": 0}), "train.nan_skip_limit"),
    ("out_dir empty", patched(**{"train.out_dir": " "}), "train.out_dir"),
    ("task unknown", patched(**{"train.task": "copy"}), "train.task.name"),
    ("task key typo", patched(**{"train.task.n_pair": 2}), "train.task.n_pair"),
    ("task seq_len tiny", patched(**{"train.task.seq_len": 1}), "train.task.seq_len"),
    ("task vocab small", patched(**{"train.task.vocab": 4}), "train.task.vocab"),
    ("dt_max nan", patched(**{"blocks.M.dt_max": NAN}), "blocks.M.dt_max"),
    ("dt_min inf", patched(**{"blocks.M.dt_min": INF}), "blocks.M.dt_min"),
    ("dt_min above dt_max", patched(**{"blocks.M.dt_min": 0.5}), "blocks.M.dt_max"),
    ("d_state zero", patched(**{"blocks.M.d_state": 0}), "blocks.M.d_state"),
    ("d_conv nine", patched(**{"blocks.M.d_conv": 9}), "blocks.M.d_conv"),
    ("dt_rank word", patched(**{"blocks.M.dt_rank": "full"}), "blocks.M.dt_rank"),
    ("mamba impl", patched(**{"blocks.M.impl": "cuda"}), "blocks.M.impl"),
    ("mamba2 headdim", patched(**{"blocks.S.headdim": 5}), "blocks.S.headdim"),
    ("mamba2 ngroups", patched(**{"blocks.S.ngroups": 3}), "blocks.S.ngroups"),
    ("mamba2 dt_limit", patched(**{"blocks.S.dt_limit": [1, 0]}), "blocks.S.dt_limit"),
    ("mamba2 A range", patched(**{"blocks.S.A_init_range": [1, INF]}), "blocks.S.A_init_range"),
    ("mamba2 chunk", patched(**{"blocks.S.chunk_size": 100}), "blocks.S.chunk_size"),
    ("heads not dividing", patched(**{"blocks.A.n_heads": 3}), "blocks.A.n_heads"),
    ("kv heads", patched(**{"blocks.A.n_kv_heads": 3}), "blocks.A.n_kv_heads"),
    ("rope odd head", patched(**{"blocks.A.head_dim": 7}), "blocks.A.rope_theta"),
    ("rope theta nan", patched(**{"blocks.A.rope_theta": NAN}), "blocks.A.rope_theta"),
    ("window zero", patched(**{"blocks.A.window": 0}), "blocks.A.window"),
    ("experts huge", patched(**{"blocks.E.n_experts": 10 ** 9}), "model.d_model"),
    ("experts float", patched(**{"blocks.E.n_experts": 1e9}), "blocks.E.n_experts"),
    ("top_k above", patched(**{"blocks.E.top_k": 5}), "blocks.E.top_k"),
    ("capacity nan", patched(**{"blocks.E.capacity_factor": NAN}), "blocks.E.capacity_factor"),
    ("aux coef inf", patched(**{"blocks.E.aux_loss_coef": INF}), "blocks.E.aux_loss_coef"),
    ("ep_size", patched(**{"blocks.E.ep_size": 3}), "blocks.E.ep_size"),
    ("router typo", patched(**{"blocks.E.router": "softmx"}), "blocks.E.router"),
    ("mlp activation", patched(**{"blocks.F.activation": "relu"}), "blocks.F.activation"),
    ("mlp d_ff zero", patched(**{"blocks.F.d_ff": 0}), "blocks.F.d_ff"),
    ("kind typo", patched(**{"blocks.F.kind": "mpl"}), "blocks.F.kind"),
    ("symbol not ascii", patched(**{"blocks.é": {"kind": "mlp"}, "layout": "M é"}), "blocks.é"),
    ("layout unknown symbol", patched(layout="M X"), "layout"),
    ("layout deep", patched(layout="(" * 5000 + "M" + ")" * 5000), "layout"),
    ("layout long count", patched(layout="M*" + "9" * 5000), "layout"),
    ("layout superscript", patched(layout="M*²"), "layout"),
    ("layout arabic digit", patched(layout="M*٣"), "layout"),
    ("layout repeat explosion", patched(layout="((M*999999)*999999)*999999"), "layout"),
    ("layout missing", patched(layout=None), "layout"),
    ("top-level typo", {**BASE, "modle": {}}, "modle"),
    ("deepspeed not mapping", {**BASE, "deepspeed": 3}, "deepspeed"),
    ("yaml syntax", "model: {d_model: 16\nblocks: [", None),
    ("yaml top-level list", "- 1\n- 2\n", None),
]


def _write(tmp_path, cfg) -> str:
    path = tmp_path / "bad.yaml"
    text = cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, allow_unicode=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def _check(rc, err, path, key):
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and lines[0].startswith("error:"), err
    assert path in lines[0], err
    if key is not None:
        assert f"key '{key}'" in lines[0], err
    # one line; a layout error adds the pattern and a caret under the column
    assert len(lines) == 1 or (key == "layout" and len(lines) == 3), err


def test_the_corpus_is_large():
    assert len(CASES) >= 60


# sizes that are valid to look at (show counts them) but cannot be allocated here, or a vocabulary
# smaller than the task's token ids (train refuses)
TRAIN_ONLY = {"d_model huge", "vocab huge", "experts huge", "vocab below task"}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_show_refuses_with_one_line(tmp_path, capsys, case):
    name, cfg, key = case
    path = _write(tmp_path, cfg)
    rc = main(["show", path])
    if name in TRAIN_ONLY:
        out = capsys.readouterr().out
        assert rc == 0 and "total parameters" in out
        return
    _check(rc, capsys.readouterr().err, path, key)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_train_refuses_with_one_line_and_writes_nothing(tmp_path, capsys, case):
    _, cfg, key = case
    path = _write(tmp_path, cfg)
    out = tmp_path / "run"
    rc = main(["train", path, "--out", str(out), "--no-progress"])
    _check(rc, capsys.readouterr().err, path, key)
    assert not out.exists()


def test_big_yaml_is_refused_quickly(tmp_path, capsys):
    path = tmp_path / "huge.yaml"
    path.write_text("name: x\n" + "# padding\n" * 600_000)
    rc = main(["show", str(path)])
    err = capsys.readouterr().err
    assert rc == 2 and "MiB" in err and "Traceback" not in err


def test_runtime_refusals(tmp_path, capsys):
    """Values that validate but cannot run here: an absent device, an unwritable run folder."""
    path = _write(tmp_path, BASE)
    rc = main(["train", path, "train.device=mps", "--out", str(tmp_path / "r1"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "train.device" in err and "Traceback" not in err
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    rc = main(["train", path, "--out", str(blocked / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot write to the run folder" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A trained 2-step model folder and a cartridge of it."""
    import hybridseq as hs

    root = tmp_path_factory.mktemp("small")
    cfg = hs.load_config({**BASE, "layout": "M A F", "train": {**BASE["train"], "steps": 2}})
    torch.manual_seed(0)
    model = hs.build_model(cfg)
    hs.save_pretrained(model, cfg, root / "model")
    cache = model.new_cache(1, 8)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
    cache.save(root / "c.cartridge")
    return root


@pytest.mark.parametrize("argv,fragment", [
    (["--prompt", "-1"], "integers >= 0"),
    (["--prompt", "1 2 x"], "integers >= 0"),
    (["--prompt", "99999"], "outside the vocabulary"),
    (["--prompt", "1", "--temperature", "nan"], "temperature"),
    (["--prompt", "1", "--temperature", "-1"], "temperature"),
    (["--prompt", "1", "--top-p", "nan"], "top_p"),
    (["--prompt", "1", "--top-k", "-3"], "top_k"),
    (["--prompt", "1", "--max-new-tokens", "-2"], "max-new-tokens"),
    (["--prompt", "1", "--max-new-tokens", "100000000000"], "max-new-tokens"),
    (["--prompt", ""], "empty"),
])
def test_generate_arguments_are_refused_before_allocating(small_run, capsys, argv, fragment):
    rc = main(["generate", str(small_run / "model"), "--tokens", "ids", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and fragment in err and "Traceback" not in err, err
    assert len([ln for ln in err.splitlines() if ln.strip()]) == 1, err


@pytest.mark.parametrize("key,value,fragment", [
    ("max_seq_len", "100000000", "max_seq_len"),
    ("max_seq_len", "1e8", "not an integer"),
    ("batch_size", "0", "out of range"),
    ("batch_size", "64", "batch 64"),
    ("seqlen_offset", "-3", "out of range"),
    ("dtype", "int8", "dtype"),
    ("dtype", "__import__('os')", "dtype"),
])
def test_cartridge_metadata_is_checked_before_allocating(small_run, tmp_path, key, value, fragment):
    """An edited metadata value is refused with a one-line HybridSeqError and no allocation
    beyond what the file's own tensors hold (max_seq_len 1e8 would otherwise allocate GBs)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    import hybridseq as hs
    from hybridseq.errors import HybridSeqError

    with safe_open(str(small_run / "c.cartridge"), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta[key] = value
    path = tmp_path / "edited.cartridge"
    save_file(tensors, str(path), metadata=meta)
    model = hs.load_pretrained(small_run / "model")
    with pytest.raises(HybridSeqError, match=fragment):
        hs.load_cache(path, model)


def test_edited_config_is_refused_naming_the_keys(small_run, tmp_path):
    import shutil

    import hybridseq as hs
    from hybridseq.errors import HybridSeqError

    folder = tmp_path / "model"
    shutil.copytree(small_run / "model", folder)
    text = (folder / "config.yaml").read_text().replace("norm_eps: 1.0e-05", "norm_eps: 0.001")
    (folder / "config.yaml").write_text(text)
    with pytest.raises(HybridSeqError, match=r"model\.norm_eps: 1e-05 -> 0\.001"):
        hs.load_pretrained(folder)


def test_saved_folders_are_readable_by_others(small_run):
    mode = os.stat(small_run / "model").st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask
    assert os.stat(small_run / "model" / "model.safetensors").st_mode & 0o777 == 0o666 & ~umask
