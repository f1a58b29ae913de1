"""The text task on a prepared folder: packed windows of whole documents with doc_ids,
determinism, disjoint ranks, resume mid-epoch, a validation split of its own, bits per byte; and
end to end: train on a prepared folder, the tokenizer travelling with the model, generate text."""
import json
import math
import os
import random

import numpy as np
import pytest
import torch

import hybridseq as hs
from hybridseq.cli import main
from hybridseq.data import make_task
from hybridseq.data import prepare as P
from hybridseq.data.base import IGNORE, Batch
from hybridseq.errors import ConfigError
from hybridseq.train.distributed import ShardedTask

L = 24


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """60 documents of 1 to 60 words, each starting with its own number (so no two are alike)."""
    root = tmp_path_factory.mktemp("text")
    rng = random.Random(1)
    words = "the of state scan token model window kernel shard epoch split mamba".split()
    with open(root / "docs.jsonl", "w") as fh:
        for i in range(60):
            fh.write(json.dumps({"text": f"n{i} " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 60)))})
                     + "\n")
    out = root / "prep"
    P.prepare([str(root / "docs.jsonl")], str(out), train_tokenizer=300, shard_tokens=300, val_fraction=0.2,
              progress=False)
    return out


def docs_of(folder, split):
    meta = P.read_meta(str(folder))
    out = []
    for name in meta["splits"][split]["shards"]:
        ids = np.fromfile(folder / f"{name}.bin", dtype=meta["dtype"]).astype(np.int64)
        idx = np.fromfile(folder / f"{name}.idx", dtype="<u8")
        nb = np.fromfile(folder / f"{name}.nbytes", dtype="<u8")
        out += [(ids[idx[j]:idx[j + 1]], int(nb[j])) for j in range(len(nb))]
    return out


def task(folder, seed=0, **kw):
    return make_task({"name": "text", "path": str(folder), "seq_len": L, **kw}, seed=seed)


def segments(row_tokens, row_ids):
    """The runs of equal doc ids of one row: [np.ndarray of tokens]."""
    cuts = [0] + [t for t in range(1, len(row_ids)) if row_ids[t] != row_ids[t - 1]] + [len(row_ids)]
    return [row_tokens[a:b] for a, b in zip(cuts, cuts[1:])], [row_ids[a] for a in cuts[:-1]]


def find(seg, docs):
    """(document number, offset) of the documents that hold ``seg`` as a contiguous slice."""
    hits = []
    for d, (ids, _) in enumerate(docs):
        for o in range(len(ids) - len(seg) + 1):
            if np.array_equal(ids[o:o + len(seg)], seg):
                hits.append((d, o))
    return hits


def check_window(window, doc_ids, docs, eos):
    """Every run of equal doc_ids is a slice of one document: the first may start inside one,
    the last may stop inside one, every other is a whole document; runs are numbered 0, 1, ..."""
    segs, ids = segments(window, doc_ids)
    assert ids == list(range(len(segs)))
    for k, seg in enumerate(segs):
        hits = find(seg, docs)
        assert hits, seg
        if 0 < k < len(segs) - 1:  # an inner run: a whole document
            assert any(o == 0 and len(docs[d][0]) == len(seg) for d, o in hits)
        if k < len(segs) - 1:      # every run but the last ends where its document ends
            assert seg[-1] == eos
        if k > 0:                  # every run but the first starts a document
            assert any(o == 0 for _, o in hits)


def test_windows_hold_whole_documents_with_doc_ids(prepared):
    from hybridseq.data import as_task_spec

    t = task(prepared)
    assert t.vocab_size == 300 and t.tokenizer == "tokenizer.json" and t.kind == "prepared"
    assert as_task_spec({"name": "text", "path": str(prepared)}).vocab_size() == 300  # read by hybridseq show
    train_docs = docs_of(prepared, "train")
    eos = P.read_meta(str(prepared))["eos_id"]
    for _ in range(4):
        b = t.next_batch(5)
        assert isinstance(b, Batch)
        x, y = b
        assert x.shape == y.shape == b.doc_ids.shape == (5, L) and x.dtype == y.dtype == b.doc_ids.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1]) and (y != IGNORE).all()
        for row in range(5):
            check_window(x[row].numpy(), b.doc_ids[row].tolist(), train_docs, eos)


def test_an_epoch_is_every_training_token_once(prepared):
    t = task(prepared, seed=3)
    docs = docs_of(prepared, "train")
    total = sum(len(d) for d, _ in docs)
    n_windows = -(-total // L)
    stream = [t.next_batch(1)[0][0].numpy() for _ in range(n_windows)]
    stream = np.concatenate(stream)[:total]
    # the stream is the training documents in some order, each exactly once
    starts = [0] + [i + 1 for i in range(total - 1) if stream[i] == P.read_meta(str(prepared))["eos_id"]]
    pieces = sorted(tuple(stream[a:b]) for a, b in zip(starts, starts[1:] + [total]))
    assert pieces == sorted(tuple(d) for d, _ in docs)
    # the next epoch is another order of the same documents
    nxt = np.concatenate([t.next_batch(1)[0][0].numpy() for _ in range(n_windows)])
    assert not np.array_equal(nxt[:total], stream)


def test_deterministic_by_seed_and_pack_false(prepared):
    a, b, c = task(prepared, seed=5), task(prepared, seed=5), task(prepared, seed=6)
    for _ in range(3):
        ba, bb, bc = a.next_batch(4), b.next_batch(4), c.next_batch(4)
        assert torch.equal(ba[0], bb[0]) and torch.equal(ba.doc_ids, bb.doc_ids)
    assert not torch.equal(ba[0], bc[0])
    flat = task(prepared, seed=5, pack=False)
    for _ in range(3):
        bf = flat.next_batch(4)
    assert bf.doc_ids is None and torch.equal(bf[0], ba[0])


def test_two_ranks_see_disjoint_slices_of_one_global_batch(prepared):
    ranks = [ShardedTask(task(prepared, seed=2), r, 2) for r in range(2)]
    single = task(prepared, seed=2)
    for _ in range(5):
        parts = [rk.next_batch(3) for rk in ranks]
        whole = single.next_batch(6)
        assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
        assert torch.equal(torch.cat([p.doc_ids for p in parts]), whole.doc_ids)
        assert torch.equal(torch.cat([p.n_bytes for p in parts]), whole.n_bytes)
        # rows are distinct windows of the stream (no two ranks train on the same window)
        rows = {tuple(r.tolist()) for p in parts for r in p[0]}
        assert len(rows) == 6
    assert ranks[0].state_dict()["window"] == ranks[1].state_dict()["window"] == 30


def test_resume_mid_epoch_gives_the_same_next_batches(prepared, tmp_path):
    from hybridseq.train.state_io import load_state, save_state

    a = task(prepared, seed=4)
    for _ in range(3):
        a.next_batch(4)
    save_state({"task": a.state_dict()}, str(tmp_path), "s")  # as the trainer's checkpoint does
    b = task(prepared, seed=4)
    b.load_state_dict(load_state(str(tmp_path), "s")["task"])
    for _ in range(20):  # past the end of the epoch too
        x, y = a.next_batch(4), b.next_batch(4)
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and torch.equal(x.doc_ids, y.doc_ids)


def test_validation_reads_only_validation_documents(prepared):
    t = task(prepared)
    train_docs, val_docs = docs_of(prepared, "train"), docs_of(prepared, "val")
    assert val_docs and not ({tuple(d) for d, _ in train_docs} & {tuple(d) for d, _ in val_docs})
    eos = P.read_meta(str(prepared))["eos_id"]
    ev = t.eval_batches(3, 4)
    assert ev is t.eval_batches(3, 4) and len(ev) == 3
    for b in ev:
        for row in range(4):
            segs, _ = segments(b[0][row].numpy(), b.doc_ids[row].tolist())
            for seg in segs:
                if len(seg) > 2:  # (a token or two may occur anywhere)
                    assert find(seg, val_docs) and not find(seg, train_docs)
            check_window(b[0][row].numpy(), b.doc_ids[row].tolist(), val_docs, eos)
    # evaluation does not depend on the seed or on how far training went
    other = task(prepared, seed=9)
    for _ in range(3):
        other.next_batch(4)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(ev, other.eval_batches(3, 4)))


def test_bytes_per_window_and_bits_per_byte(prepared):
    t = task(prepared)
    val_docs = docs_of(prepared, "val")
    # the validation stream in stored order, and each token's share of its document's bytes
    stream = np.concatenate([d for d, _ in val_docs])
    share = np.concatenate([np.full(len(d), nb / len(d)) for d, nb in val_docs])
    n, B = 2, 4
    have = (len(stream) - 1) // L
    starts = [i * have // (n * B) * L for i in range(n * B)]  # windows spread evenly over the split
    rows = [r for b in t.eval_batches(n, B) for r in zip(b[0], b[1], b.n_bytes)]
    for a, (x, y, nb) in zip(starts, rows):
        assert torch.equal(x, torch.from_numpy(stream[a:a + L]))
        assert torch.equal(y, torch.from_numpy(stream[a + 1:a + L + 1]))
        assert float(nb) == pytest.approx(share[a + 1:a + L + 1].sum())  # the targets' bytes
    # over whole documents the shares add up to the recorded bytes
    assert share.sum() == pytest.approx(sum(nb for _, nb in val_docs))


def tiny_cfg(folder, **train):
    base = {"task": {"name": "text", "path": str(folder), "seq_len": L}, "steps": 6, "batch_size": 4,
            "lr": 3e-3, "warmup_steps": 1, "eval_every": 3, "eval_batches": 2, "log_every": 1, "save_every": 3}
    base.update(train)
    return hs.load_config({
        "name": "tinytext", "model": {"d_model": 32},
        "blocks": {"M": {"kind": "mamba", "d_state": 4, "impl": "torch"}, "A": {"kind": "attention", "n_heads": 2},
                   "F": {"kind": "mlp", "d_ff": 64}},
        "layout": "M A F", "train": base})


def test_train_on_a_prepared_folder_and_generate_text(prepared, tmp_path, capsys, monkeypatch):
    from hybridseq.model import HybridLM
    from hybridseq.train import train
    from hybridseq.train import checkpoint as ckpt
    from hybridseq.train.metrics import read_metrics

    seen = []
    forward = HybridLM.forward

    def spy(self, input_ids, *a, **kw):
        seen.append(kw.get("doc_ids") is not None)
        return forward(self, input_ids, *a, **kw)

    monkeypatch.setattr(HybridLM, "forward", spy)
    out = tmp_path / "run"
    s = train(tiny_cfg(prepared), out_dir=str(out), progress=False)
    monkeypatch.setattr(HybridLM, "forward", forward)
    assert s["steps"] == 6 and seen and all(seen)  # training and evaluation passed doc_ids
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r]
    for r in evals:
        assert r["eval_ppl"] == pytest.approx(math.exp(r["eval_loss"]), rel=1e-6)
        assert 0 < r["eval_bpb"] < r["eval_loss"] / math.log(2)  # more than one byte per token
    # bits per byte = summed nats / (bytes * ln 2) over the evaluated windows
    batches = make_task(tiny_cfg(prepared).train.task, seed=0).eval_batches(2, 4)
    n_bytes = sum(float(b.n_bytes.sum()) for b in batches)
    assert evals[-1]["eval_bpb"] == pytest.approx(evals[-1]["eval_loss"] * 2 * 4 * L / (n_bytes * math.log(2)))
    # the tokenizer travels: run folder, every checkpoint (in its manifest), the saved config
    tok = (prepared / "tokenizer.json").read_bytes()
    assert (out / "tokenizer.json").read_bytes() == tok
    for _, folder in ckpt.list_checkpoints(str(out / "checkpoints")):
        assert open(os.path.join(folder, "tokenizer.json"), "rb").read() == tok
        assert "tokenizer.json" in json.load(open(os.path.join(folder, "manifest.json")))["files"]
    saved = hs.load_config(str(out / "config.yaml"))
    assert saved.train.task.tokenizer == "tokenizer.json"
    latest = ckpt.latest_checkpoint(str(out / "checkpoints"))
    model = hs.load_pretrained(latest)
    assert model.tokenizer_json == tok
    hs.save_pretrained(model, None, tmp_path / "saved")
    assert (tmp_path / "saved" / "tokenizer.json").read_bytes() == tok
    from hybridseq.train.export import export

    export(str(out), str(tmp_path / "exported"))
    assert (tmp_path / "exported" / "tokenizer.json").read_bytes() == tok
    # generate: text in, text out through the tokenizer; --tokens ids still reads ids
    assert main(["generate", str(out), "--prompt", "n3 the", "--max-new-tokens", "6", "--eos", "-1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("n3 the") and len(text.strip()) > len("n3 the")
    assert main(["generate", str(tmp_path / "exported"), "--prompt", "5 6", "--tokens", "ids",
                 "--max-new-tokens", "3"]) == 0
    ids_out = capsys.readouterr().out
    assert ids_out.startswith("5 6 | ") and len(ids_out.split("|")[1].split()) == 3


def test_resumed_training_on_packed_data_matches(prepared, tmp_path):
    from hybridseq.train import train
    from hybridseq.train.metrics import read_metrics

    cfg = tiny_cfg(prepared, steps=8, save_every=3, eval_every=4)
    train(cfg, out_dir=str(tmp_path / "a"), progress=False)

    def crash(trainer, rec):
        if rec["step"] == 5:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, out_dir=str(tmp_path / "b"), progress=False, hooks=[crash])
    train(cfg, out_dir=str(tmp_path / "b"), resume=True, progress=False)
    la = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if "loss" in r}
    lb = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if "loss" in r}
    assert lb == pytest.approx(la, rel=1e-5)


def test_config_records_what_the_tokens_are(tmp_path, prepared):
    from hybridseq.train import Trainer

    ids = (np.arange(3000) % 97).astype(np.uint16)
    ids.tofile(tmp_path / "t.bin")
    cfg = tiny_cfg(tmp_path / "t.bin", steps=1)
    tr = Trainer(cfg, out_dir=str(tmp_path / "r"), progress=False)
    assert tr.cfg.train.task.tokenizer == "ids" and tr.tokenizer_json is None
    (tmp_path / "raw.txt").write_text("plain text " * 50)
    tr = Trainer(tiny_cfg(tmp_path / "raw.txt", steps=1), out_dir=str(tmp_path / "r2"), progress=False)
    assert tr.cfg.train.task.tokenizer == "bytes"
    ev = tr.task.eval_batches(1, 2)[0]  # a byte is a token: n_bytes counts the targets
    assert ev.n_bytes.tolist() == [float(L), float(L)]


def test_prepared_folder_errors(prepared, tmp_path):
    with pytest.raises(ConfigError, match="tokenizer.json"):
        task(prepared, tokenizer="ids")
    unfinished = tmp_path / "u"
    unfinished.mkdir()
    (unfinished / "progress.json").write_text("{}")
    (unfinished / "train-00000.bin").write_bytes(b"\x00\x00")
    with pytest.raises(ConfigError, match="--resume"):
        task(unfinished)
    broken = tmp_path / "b"
    broken.mkdir()
    for f in os.listdir(prepared):
        (broken / f).write_bytes((prepared / f).read_bytes())
    victim = broken / "train-00000.bin"
    victim.write_bytes(victim.read_bytes()[:-2])
    with pytest.raises(ConfigError, match="train-00000.bin"):
        task(broken)


def test_nothing_held_out_evaluates_on_training_documents(prepared, tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": f"n{i} the state of the scan"}) + "\n" for i in range(10)))
    P.prepare([str(src)], str(tmp_path / "p"), tokenizer=str(prepared / "tokenizer.json"), val_fraction=0.0,
              progress=False)
    t = task(tmp_path / "p")
    assert t.val_split is t.train_split and "none held out" in t.describe()
    assert len(t.eval_batches(1, 2)) == 1
