"""hybridseq prepare: sources (text, folders, .jsonl, saved HF datasets), both tokenizer modes,
shards and their index files, the split by document, workers, resume after a crash, checksums,
and bad inputs (one line naming the file, exit 2, nothing half-written)."""
import hashlib
import json
import os
import random

import numpy as np
import pytest

from hybridseq.cli import main
from hybridseq.data import prepare as P
from hybridseq.errors import HybridSeqError

WORDS = ("state space model token window shard mamba attention expert router scan kernel "
         "document boundary packed stream epoch seed split").split()


def _text(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_corpus(root, n_jsonl=40, seed=0):
    """A folder: two text files (one in a subfolder, one with non-ASCII and a special token's
    spelling), an empty file, a hidden folder, and a .jsonl with blank and empty lines.
    Returns the documents' texts in reading order."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir(exist_ok=True)
    (root / ".hidden").mkdir(exist_ok=True)
    a = "alpha " + _text(rng, 120)
    b = "beta é ü ß <|endoftext|> " + _text(rng, 60)
    (root / "a.txt").write_text(a, encoding="utf-8")
    (root / "empty.txt").write_text("")
    (root / "sub" / "b.txt").write_text(b, encoding="utf-8")
    (root / ".hidden" / "h.txt").write_text("never read")
    lines, docs = [], []
    for i in range(n_jsonl):
        t = f"doc {i} " + _text(rng, rng.randint(1, 40))
        lines.append(json.dumps({"text": t, "id": i}))
        docs.append(t)
        if i == 3:
            lines += ["", json.dumps({"text": ""})]  # a blank line and an empty document
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [a] + docs + [b]  # os.walk order: the folder's files (sorted), then sub/


def read_docs(folder, split):
    """[(token ids, nbytes)] of every document of ``split``, in stored order."""
    meta = P.read_meta(str(folder))
    out = []
    for name in meta["splits"][split]["shards"]:
        ids = np.fromfile(folder / f"{name}.bin", dtype=meta["dtype"])
        idx = np.fromfile(folder / f"{name}.idx", dtype="<u8")
        nb = np.fromfile(folder / f"{name}.nbytes", dtype="<u8")
        out += [(ids[idx[j]:idx[j + 1]], int(nb[j])) for j in range(len(nb))]
    return out


def files_of(folder):
    return {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus") / "c"
    return root, make_corpus(root)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "p"
    s = P.prepare([str(corpus[0])], str(out), train_tokenizer=300, shard_tokens=400, val_fraction=0.25,
                  progress=False)
    return out, s


def test_trained_tokenizer_shards_documents_and_meta(corpus, trained):
    root, texts = corpus
    out, summary = trained
    from tokenizers import Tokenizer

    meta = P.read_meta(str(out))
    assert meta["format"] == "hybridseq-tokens" and meta["version"] == 1
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 300
    assert meta["eos_token"] == "<|endoftext|>" and meta["eos_id"] == 0
    assert meta["documents"] == len(texts) == summary["documents"]  # empties and hidden files skipped
    assert meta["sources"] == [{"path": str(root), "kind": "folder", "files": 4}]
    assert len(meta["splits"]["train"]["shards"]) > 1 and meta["splits"]["val"]["documents"] > 0
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    # every document comes back, in reading order within its split, ending with eos
    docs = {s: read_docs(out, s) for s in P.SPLITS}
    expect = {s: [t for i, t in enumerate(texts) if P.split_of(i, 0, 0.25) == s] for s in P.SPLITS}
    for split in P.SPLITS:
        assert len(docs[split]) == len(expect[split])
        for (ids, nbytes), text in zip(docs[split], expect[split]):
            assert ids[-1] == 0 and (ids[:-1] != 0).all()   # the special token's spelling is text
            assert tok.decode(ids[:-1].tolist()) == text
            assert nbytes == len(text.encode("utf-8"))
        info = meta["splits"][split]
        assert info["tokens"] == sum(len(d) for d, _ in docs[split])
        assert info["bytes"] == sum(b for _, b in docs[split])
    # shards hold whole documents and close once they reach shard_tokens
    for split in P.SPLITS:
        shards = [s for s in meta["shards"] if s["split"] == split]
        assert all(s["tokens"] >= 400 for s in shards[:-1])
    assert not any(f.startswith(".tmp-") or f == "progress.json" for f in os.listdir(out))


def test_meta_checksums_and_verify(trained, tmp_path):
    out, _ = trained
    meta = P.read_meta(str(out))
    for shard in meta["shards"]:
        for name, rec in shard["files"].items():
            data = (out / name).read_bytes()
            assert rec == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert meta["tokenizer"]["sha256"] == hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    assert P.verify(str(out)) == []
    copy = tmp_path / "copy"
    copy.mkdir()
    for f, data in files_of(out).items():
        (copy / f).write_bytes(data)
    victim = copy / f"{meta['shards'][0]['name']}.bin"
    data = bytearray(victim.read_bytes())
    data[0] ^= 1
    victim.write_bytes(bytes(data))
    assert any("sha256" in p for p in P.verify(str(copy)))


def test_given_tokenizer_split_and_workers_agree(corpus, trained, tmp_path):
    root, texts = corpus
    out, _ = trained
    tok_file = str(out / "tokenizer.json")
    one = tmp_path / "one"
    P.prepare([str(root)], str(one), tokenizer=tok_file, shard_tokens=400, val_fraction=0.25, progress=False)
    assert (one / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    # the same documents and shards as with the trained tokenizer's own run
    for f in os.listdir(out):
        if f not in ("meta.json",):
            assert (one / f).read_bytes() == (out / f).read_bytes(), f
    two = tmp_path / "two"
    P.prepare([str(root)], str(two), tokenizer=tok_file, shard_tokens=400, val_fraction=0.25, workers=2,
              progress=False)
    assert files_of(one) == files_of(two)  # any number of workers: the same bytes
    # the split is a function of (seed, index): deterministic, and near the asked fraction
    flags = [P.is_val(i, 0, 0.25) for i in range(4000)]
    assert flags == [P.is_val(i, 0, 0.25) for i in range(4000)]
    assert 0.2 < sum(flags) / 4000 < 0.3
    assert flags != [P.is_val(i, 1, 0.25) for i in range(4000)]
    assert not any(P.is_val(i, 0, 0.0) for i in range(100))
    meta = P.read_meta(str(one))
    for shard in meta["shards"]:  # each shard's documents are in its split
        assert P.split_of(shard["first_doc"], 0, 0.25) == shard["split"]
        assert P.split_of(shard["end_doc"] - 1, 0, 0.25) == shard["split"]


def test_resume_after_a_crash_gives_the_same_files(corpus, trained, tmp_path):
    root, _ = corpus
    tok_file = str(trained[0] / "tokenizer.json")
    kw = dict(tokenizer=tok_file, shard_tokens=150, val_fraction=0.25, progress=False)
    full = tmp_path / "full"
    P.prepare([str(root)], str(full), **kw)
    crashed = tmp_path / "crashed"
    seen = []

    def crash(shard):
        seen.append(shard["name"])
        if len(seen) == 3:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        P.prepare([str(root)], str(crashed), on_shard=crash, **kw)
    left = os.listdir(crashed)
    assert "progress.json" in left and "meta.json" not in left
    assert not any(f.startswith(".tmp-") for f in left)  # the open shard was discarded
    # what a kill mid-shard leaves: a partial temporary shard, and a renamed but unrecorded one
    (crashed / ".tmp-train-00003.bin").write_bytes(b"\x01\x02")
    (crashed / "train-00007.bin").write_bytes(b"junk")
    recorded = json.loads((crashed / "progress.json").read_text())["shards"]
    assert [s["name"] for s in recorded] == seen
    # a fresh run into it is refused; --resume with other settings too
    with pytest.raises(HybridSeqError, match="--resume"):
        P.prepare([str(root)], str(crashed), **kw)
    with pytest.raises(HybridSeqError, match="shard_tokens"):
        P.prepare([str(root)], str(crashed), resume=True, **{**kw, "shard_tokens": 151})
    s = P.prepare([str(root)], str(crashed), resume=True, **kw)
    assert files_of(crashed) == files_of(full)
    assert 0 < s["written_tokens"] < s["tokens"]  # the recorded shards were not tokenized again
    # resuming a finished folder verifies it and writes nothing
    again = P.prepare([str(root)], str(crashed), resume=True, **kw)
    assert again["already_complete"] and files_of(crashed) == files_of(full)


def test_uint32_for_a_large_vocabulary(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["<unk>"] = 70_000
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["</s>"])
    tok.save(str(tmp_path / "tok.json"))
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "w1 w69999 w65536 nope"}) + "\n")
    out = tmp_path / "out"
    P.prepare([str(tmp_path / "c.jsonl")], str(out), tokenizer=str(tmp_path / "tok.json"), text_key="body",
              val_fraction=0.0, progress=False)
    meta = P.read_meta(str(out))
    assert meta["dtype"] == "uint32" and meta["eos_token"] == "</s>" and meta["eos_id"] == 70_001
    assert read_docs(out, "train")[0][0].tolist() == [1, 69_999, 65_536, 70_000, 70_001]


def test_hf_dataset_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = ["first document", "", "second one", "third"]
    datasets.Dataset.from_dict({"content": texts}).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": texts[:2]}),
                          "test": datasets.Dataset.from_dict({"content": ["x"]})}).save_to_disk(str(tmp_path / "dd"))
    assert P.is_hf_dataset(str(tmp_path / "ds")) and P.is_hf_dataset(str(tmp_path / "dd"))
    out = tmp_path / "out"
    s = P.prepare([str(tmp_path / "ds"), str(tmp_path / "dd")], str(out), train_tokenizer=280,
                  text_key="content", val_fraction=0.0, progress=False)
    assert s["documents"] == 3 + 1  # empties skipped; of the DatasetDict, its train split
    assert P.read_meta(str(out))["sources"][0]["kind"] == "hf-dataset"
    with pytest.raises(HybridSeqError, match="no column 'text'"):
        P.prepare([str(tmp_path / "ds")], str(tmp_path / "o2"), train_tokenizer=280, progress=False)


def test_hf_dataset_without_the_package_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "state.json").write_text("{}")
    (tmp_path / "ds" / "dataset_info.json").write_text("{}")
    import hybridseq.extras as extras

    monkeypatch.setattr(extras, "available", lambda module: module != "datasets")
    with pytest.raises(HybridSeqError, match=r"hybridseq\[hf-datasets\]"):
        P.prepare([str(tmp_path / "ds")], str(tmp_path / "out"), train_tokenizer=280, progress=False)


def _cli(capsys, *argv):
    code = main(["prepare", *argv, "--no-progress"])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_prints_tokens_per_second(corpus, tmp_path, capsys):
    code, out, err = _cli(capsys, str(corpus[0]), "--out", str(tmp_path / "o"), "--train-tokenizer", "290")
    assert code == 0, err
    assert "tokens/s" in out and "documents" in out


@pytest.mark.parametrize("case", ["bad_json", "no_key", "not_string", "not_utf8", "missing", "no_tokenizer",
                                  "both_tokenizers", "out_not_empty", "all_empty", "bad_tokenizer",
                                  "no_eos", "tiny_vocab"])
def test_bad_inputs_are_one_line_exit_2(tmp_path, capsys, case, trained):
    src = tmp_path / "src"
    src.mkdir()
    good = json.dumps({"text": "fine"})
    out = tmp_path / "out"
    args, expect = [str(src), "--out", str(out), "--train-tokenizer", "280"], None
    if case == "bad_json":
        (src / "d.jsonl").write_text(f"{good}\n{good}\n{{\"text\": oops}}\n")
        expect = f"{src / 'd.jsonl'}:3: not a JSON line"
    elif case == "no_key":
        (src / "d.jsonl").write_text(f"{good}\n" + json.dumps({"body": "x"}) + "\n")
        expect = f"{src / 'd.jsonl'}:2: no key 'text' (keys: body)"
    elif case == "not_string":
        (src / "d.jsonl").write_text(json.dumps({"text": 3}) + "\n")
        expect = f"{src / 'd.jsonl'}:1: 'text' is a JSON int"
    elif case == "not_utf8":
        (src / "a.txt").write_text("fine")
        (src / "b.txt").write_bytes(b"ok \xff\xfe no")
        expect = f"{src / 'b.txt'}: not UTF-8 text (invalid byte at offset 3)"
    elif case == "missing":
        args[0] = str(tmp_path / "nope")
        expect = "nope: no such file or folder"
    elif case == "no_tokenizer":
        (src / "a.txt").write_text("fine")
        args = args[:3]
        expect = "--tokenizer tokenizer.json or --train-tokenizer VOCAB"
    elif case == "both_tokenizers":
        (src / "a.txt").write_text("fine")
        args += ["--tokenizer", str(trained[0] / "tokenizer.json")]
        expect = "one of them"
    elif case == "out_not_empty":
        (src / "a.txt").write_text("fine")
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        expect = "not empty"
    elif case == "all_empty":
        (src / "a.txt").write_text("")
        (src / "d.jsonl").write_text("\n" + json.dumps({"text": ""}) + "\n")
        expect = "no documents"
    elif case == "bad_tokenizer":
        (src / "a.txt").write_text("fine")
        (tmp_path / "t.json").write_text("{not json")
        args = args[:3] + ["--tokenizer", str(tmp_path / "t.json")]
        expect = f"{tmp_path / 't.json'}: not a tokenizers JSON file"
    elif case == "no_eos":
        from tokenizers import Tokenizer, models

        (src / "a.txt").write_text("fine")
        Tokenizer(models.WordLevel({"fine": 0, "<unk>": 1}, unk_token="<unk>")).save(str(tmp_path / "t.json"))
        args = args[:3] + ["--tokenizer", str(tmp_path / "t.json")]
        expect = "no end-of-document token"
    elif case == "tiny_vocab":
        (src / "a.txt").write_text("fine")
        args[-1] = "100"
        expect = "at least 257"
    code, _, err = _cli(capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], err
    if os.path.isdir(out):  # nothing half-written is left behind
        assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]
        assert "meta.json" not in os.listdir(out)
    if case == "all_empty":
        assert not os.path.exists(out)
    if case == "out_not_empty":
        assert os.listdir(out) == ["keep.txt"]


def test_a_crash_while_training_the_tokenizer_resumes(corpus, trained, tmp_path, monkeypatch):
    root, _ = corpus
    kw = dict(train_tokenizer=300, shard_tokens=400, val_fraction=0.25, progress=False)
    import hybridseq.data.tokenizer as T

    real = T.train_byte_bpe

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "train_byte_bpe", crash)
    with pytest.raises(KeyboardInterrupt):
        P.prepare([str(root)], str(tmp_path / "o"), **kw)
    assert os.listdir(tmp_path / "o") == ["progress.json"]  # marked unfinished from the start
    monkeypatch.setattr(T, "train_byte_bpe", real)
    P.prepare([str(root)], str(tmp_path / "o"), resume=True, **kw)
    out = trained[0]
    assert files_of(tmp_path / "o").keys() == files_of(out).keys()
    for f, data in files_of(out).items():  # the BPE trainer is deterministic: the same files
        if f != "meta.json":
            assert (tmp_path / "o" / f).read_bytes() == data, f
