"""The lm-evaluation-harness model (``hybridseq.interop.lm_eval``): on a tiny Llama imported from
transformers, with a small byte-level BPE tokenizer, its loglikelihood, rolling loglikelihood and
generate_until equal lm_eval's own transformers model on the original checkpoint; and
``hybridseq eval`` runs a tiny local task end to end. Skipped without lm_eval or transformers."""
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

from hybridseq.cli import main as cli_main  # noqa: E402
from hybridseq.interop.hf_io import import_transformers  # noqa: E402

T = import_transformers()
TEXT = ["the cat sat on the mat", "a dog ran in the park", "the sun is hot", "we like to read books",
        "it is a good day to play", "the quick brown fox jumps over the lazy dog"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from tokenizers import ByteLevelBPETokenizer

    root = tmp_path_factory.mktemp("lmeval")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXT * 20, vocab_size=300, min_frequency=2, special_tokens=["<eos>"])
    tok = T.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>")
    vocab = len(tok)
    cfg = T.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager",
                        eos_token_id=tok.eos_token_id, bos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    hf = root / "hf"
    model.save_pretrained(hf)
    tok.save_pretrained(hf)
    ours = root / "hs"
    assert cli_main(["import-hf", str(hf), str(ours), "--pad-vocab-multiple", "8"]) == 0
    return hf, ours


class _Req:
    def __init__(self, *args):
        self.args = args


def test_requests_match_lm_evals_transformers_model(folders):
    from lm_eval.models.huggingface import HFLM

    from hybridseq.interop.lm_eval import HybridSeqLM

    hf, ours = folders
    theirs = HFLM(pretrained=str(hf), device="cpu", batch_size=1, max_length=24)
    mine = HybridSeqLM(pretrained=str(ours), batch_size=3, max_length=24)
    assert mine.model.vocab_size > mine.vocab  # the padded rows are left out of the softmax
    ll = [_Req("the cat", " sat on the mat"), _Req("", "the sun"), _Req("a dog ran in the ", "park"),
          _Req("we like to read books " * 4, "it is a good day")]  # the last one is truncated
    a, b = mine.loglikelihood(ll), theirs.loglikelihood(ll)
    for (x, gx), (y, gy) in zip(a, b):
        assert x == pytest.approx(y, rel=1e-5, abs=1e-5) and gx == gy
    rolling = [_Req(" ".join(TEXT))]
    assert mine.loglikelihood_rolling(rolling)[0] == pytest.approx(
        theirs.loglikelihood_rolling(rolling)[0], rel=1e-5)
    gen = [_Req("the quick brown", {"until": ["park"], "max_gen_toks": 8, "do_sample": False})]
    assert mine.generate_until(gen) == theirs.generate_until(gen)


@pytest.mark.slow  # lm_eval indexes its built-in task catalogue (~20 s)
def test_hybridseq_eval_runs_a_local_task(folders, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _, ours = folders
    data = tmp_path / "data.jsonl"
    rows = [{"question": "the cat sat on the", "choices": [" mat", " sun"], "answer": 0},
            {"question": "the quick brown fox jumps over the lazy", "choices": [" dog", " day"], "answer": 0},
            {"question": "we like to read", "choices": [" books", " park"], "answer": 0}]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "tiny.yaml").write_text(
        "task: hybridseq_tiny\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n")
    out = tmp_path / "results.json"
    assert cli_main(["eval", str(ours), "--tasks", "hybridseq_tiny", "--include-path", str(tmp_path),
                     "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    assert 0.0 <= results["hybridseq_tiny"]["acc,none"] <= 1.0
    assert "hybridseq_tiny" in capsys.readouterr().out
    assert cli_main(["eval", str(ours), "--tasks", "no_such_task_here", "--include-path", str(tmp_path)]) == 2
