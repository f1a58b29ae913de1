"""Files written by earlier versions keep working: a model folder and a cache cartridge saved
before the block kinds became typed specs (tests/data/legacy_v1, written by the previous
release's ``save_pretrained`` and ``cache.save``) load, hash alike and compute the same logits."""
import json
import os

import torch

import hybridseq as hs

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "legacy_v1")


def _expected():
    with open(os.path.join(DATA, "expected.json")) as f:
        return json.load(f)


def test_legacy_model_folder_loads_with_the_same_hash_and_logits():
    exp = _expected()
    model = hs.load_pretrained(os.path.join(DATA, "model"))
    assert model.config_hash == exp["config_hash"]
    ids = torch.tensor(exp["input_ids"])
    with torch.no_grad():
        logits = model(ids).logits
    assert abs(float(logits.double().sum()) - exp["logits_sum"]) < 1e-4
    torch.testing.assert_close(logits[0, -1], torch.tensor(exp["logits_last"]), atol=1e-5, rtol=1e-5)


def test_legacy_cartridge_loads_and_continues():
    exp = _expected()
    model = hs.load_pretrained(os.path.join(DATA, "model"))
    cache = hs.load_cache(os.path.join(DATA, "prompt.cartridge"), model)
    ids = torch.tensor(exp["input_ids"])
    assert cache.seqlen_offset == ids.shape[1]
    nxt = torch.tensor([[13]])
    with torch.no_grad():
        step = model(nxt, cache=cache).logits[:, -1]
        full = model(torch.cat([ids, nxt], 1)).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-4)
