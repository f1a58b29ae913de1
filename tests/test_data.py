"""Tasks: token layouts, seeding, data position, evaluation batches, scoring, text/memmap data."""
import numpy as np
import pytest
import torch

from hybridseq.data import IGNORE, accuracy, make_task, score, task_spec, task_vocab_size
from hybridseq.errors import ConfigError

SMALL = {
    "selective_copy": {"seq_len": 40, "n_data": 6, "vocab": 8},
    "induction_heads": {"seq_len": 33, "vocab": 8},
    "mqar": {"seq_len": 48, "n_pairs": 6, "vocab": 64},
}


def _task(name, seed=0, **kw):
    return make_task({"name": name, **SMALL[name], **kw}, seed=seed)


@pytest.mark.parametrize("name", list(SMALL))
def test_shapes_ranges_and_scored_positions(name):
    t = _task(name)
    x, y = t.next_batch(5)
    assert x.shape == y.shape == (5, t.seq_len) and x.dtype == y.dtype == torch.long
    assert 0 <= int(x.min()) and int(x.max()) < t.vocab_size
    scored = y != IGNORE
    assert scored.any(dim=1).all()
    assert 0 <= int(y[scored].min()) and int(y[scored].max()) < t.vocab_size
    assert t.vocab_size == task_vocab_size({"name": name, **SMALL[name]})


def test_selective_copy_layout():
    t = _task("selective_copy")
    x, y = t.next_batch(16)
    region, n = 40, 6
    assert t.seq_len == region + n and t.vocab_size == 8 + 2
    assert (x[:, region:] == t.marker).all()
    assert (y[:, :region] == IGNORE).all()
    for row_x, row_y in zip(x, y):
        data = row_x[:region][row_x[:region] != t.noise]
        assert len(data) == n and (data >= 1).all() and (data <= 8).all()
        assert torch.equal(row_y[region:], data)  # recalled in order of appearance
    # positions vary between sequences (a time-invariant model cannot solve it)
    assert len({tuple((row != 0).nonzero().flatten().tolist()) for row in x[:, :region]}) > 1


def test_induction_heads_layout():
    t = _task("induction_heads")
    x, y = t.next_batch(32)
    s = t.special
    assert (x[:, -1] == s).all()
    assert ((x == s).sum(dim=1) == 2).all()
    first = (x == s).float().argmax(dim=1)
    assert (first <= t.seq_len - 3).all()
    key = x.gather(1, (first + 1)[:, None])[:, 0]
    assert torch.equal(y[:, -1], key)
    assert ((y != IGNORE).sum(dim=1) == 1).all()
    assert len(set(first.tolist())) > 1


def test_mqar_layout():
    t = _task("mqar")
    x, y = t.next_batch(16)
    n, half = 6, 32
    for row_x, row_y in zip(x, y):
        keys, values = row_x[0:2 * n:2], row_x[1:2 * n:2]
        assert len(set(keys.tolist())) == n and (keys >= 1).all() and (keys < half).all()
        assert (values >= half).all() and (values < 64).all()
        table = dict(zip(keys.tolist(), values.tolist()))
        q = (row_y != IGNORE).nonzero().flatten()
        assert len(q) == n and (q >= 2 * n).all()
        assert sorted(row_x[q].tolist()) == sorted(keys.tolist())  # each key asked once
        for pos in q.tolist():
            assert row_y[pos].item() == table[row_x[pos].item()]
        rest = torch.ones(t.seq_len, dtype=torch.bool)
        rest[: 2 * n] = False
        rest[q] = False
        assert (row_x[rest] == 0).all()


@pytest.mark.parametrize("name", list(SMALL))
def test_seeding_position_and_eval_batches(name):
    a, b, c = _task(name, seed=3), _task(name, seed=3), _task(name, seed=4)
    xa, _ = a.next_batch(4)
    assert torch.equal(xa, b.next_batch(4)[0])
    assert not torch.equal(xa, c.next_batch(4)[0])
    # data position: restoring the state replays the same batches
    state = a.state_dict()
    nxt = [a.next_batch(4) for _ in range(2)]
    fresh = _task(name, seed=3)
    fresh.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(nxt, [fresh.next_batch(4) for _ in range(2)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert fresh.batches_drawn == a.batches_drawn == 3
    # evaluation batches depend on the seed only, not on how much training data was drawn
    ev_a, ev_new = a.eval_batches(2, 4), _task(name, seed=3).eval_batches(2, 4)
    for (x1, y1), (x2, y2) in zip(ev_a, ev_new):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(ev_a[0][0], ev_a[1][0])
    assert not torch.equal(ev_a[0][0], _task(name, seed=3).next_batch(4)[0])


def test_seq_len_override_for_length_extrapolation():
    cfg = {"name": "induction_heads", "seq_len": 16, "vocab": 8}
    assert make_task(cfg).seq_len == 16
    long = make_task(cfg, seed=0, seq_len=64)
    x, y = long.next_batch(3)
    assert x.shape == (3, 64) and (x[:, -1] == long.special).all()
    assert make_task("mqar").seq_len == 128  # defaults from the schema


def test_score_and_accuracy():
    targets = torch.tensor([[IGNORE, 1, 2], [IGNORE, 0, IGNORE], [IGNORE, IGNORE, IGNORE]])
    logits = torch.full((3, 3, 4), -1.0)
    logits[0, 1, 1] = logits[0, 2, 3] = 1.0   # one right, one wrong
    logits[1, 1, 0] = 1.0                      # right
    s = score(logits, targets)
    assert s == {"correct": 2, "scored": 3, "seq_correct": 1, "seqs": 2}
    tok, seq = accuracy(logits, targets)
    assert tok == pytest.approx(2 / 3) and seq == pytest.approx(0.5)


@pytest.mark.parametrize("bad, key", [
    ({"name": "nope"}, "train.task.name"),
    ({"name": "mqar", "n_pair": 4}, "train.task.n_pair"),
    ({"name": "mqar", "n_pairs": 40, "vocab": 64}, "train.task.vocab"),
    ({"name": "mqar", "n_pairs": 8, "seq_len": 20}, "train.task.seq_len"),
    ({"name": "selective_copy", "seq_len": 4, "n_data": 8}, "train.task.n_data"),
    ({"name": "induction_heads", "seq_len": 2}, "train.task.seq_len"),
])
def test_bad_task_configs_name_the_key(bad, key):
    with pytest.raises(ConfigError) as e:
        make_task(bad)
    assert e.value.key == key


def test_task_spec_fills_defaults():
    spec = task_spec({"name": "selective_copy", "seq_len": 32})
    assert spec == {"name": "selective_copy", "seq_len": 32, "n_data": 16, "vocab": 16}


def test_text_bytes_file_and_folder(tmp_path):
    text = ("the quick brown fox jumps over the lazy dog. " * 40).encode()
    (tmp_path / "a.txt").write_bytes(text)
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.txt").write_bytes(text[::-1])
    for path in (tmp_path / "a.txt", tmp_path):
        t = make_task({"name": "text", "path": str(path), "seq_len": 16, "val_fraction": 0.1}, seed=0)
        assert t.vocab_size == 256 and t.seq_len == 16
        x, y = t.next_batch(4)
        assert x.shape == y.shape == (4, 16)
        assert torch.equal(x[:, 1:], y[:, :-1])  # next-token targets
        assert (y != IGNORE).all()
        for row in torch.cat([x, y[:, -1:]], dim=1):  # each window is a real slice of the data
            w = bytes(row.tolist())
            assert w in text or w in text[::-1]
        ev = t.eval_batches(2, 4)
        held = text[len(text) - max(17, int(len(text) * 0.1)):]
        assert bytes(ev[0][0][0].tolist()) in held or bytes(ev[0][0][0].tolist()) in text[::-1]


@pytest.mark.parametrize("dtype, np_dtype, top", [("uint16", np.uint16, 60000), ("uint32", np.uint32, 100000)])
def test_text_memmap_tokens(tmp_path, dtype, np_dtype, top):
    ids = (np.arange(5000) * 7919 % 1000).astype(np_dtype)
    ids[123] = top
    path = tmp_path / "train.bin"
    ids.tofile(path)
    t = make_task({"name": "text", "path": str(path), "seq_len": 32, "dtype": dtype}, seed=1)
    assert t.vocab_size == top + 1
    x, y = t.next_batch(3)
    assert torch.equal(x[:, 1:], y[:, :-1])
    seq = torch.from_numpy(ids.astype(np.int64))
    for row in x:  # every window is a real slice of the token file
        starts = np.nonzero(ids == row[0].item())[0]
        assert any(torch.equal(seq[s:s + 32], row) for s in starts)


def test_text_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        make_task({"name": "text", "path": str(tmp_path / "missing.txt")})
    with pytest.raises(ConfigError, match="needs a path"):
        make_task({"name": "text"})
    (tmp_path / "tiny.txt").write_bytes(b"abc")
    with pytest.raises(ConfigError, match="seq_len"):
        make_task({"name": "text", "path": str(tmp_path / "tiny.txt"), "seq_len": 16})
