"""Hugging Face interop: for each supported family a tiny randomly initialised transformers model
(weights perturbed, so that no norm is 1 and no bias 0), saved with ``save_pretrained`` and
imported with ``hs.from_hf``, gives the logits of transformers' own forward (fp32, 1e-5
relative); hybridseq's cached decoding (a prefill, then one-token steps) gives the full
forward's logits; ``hs.to_hf`` writes a folder transformers loads back to the same logits; and
greedy generation picks the same tokens. Then the edges: tied embeddings, vocab padding, dtype,
sharded checkpoints, the CLI, and the errors for what cannot be represented.

Skipped without transformers (``pip install -e '.[hf]'``). Slow families are marked; one fast
family per kind stays: Llama (dense attention), Qwen2-MoE (MoE), Mamba, Bamba (Mamba-2 hybrid).
"""
import json

import pytest
import torch

import hybridseq as hs
from hybridseq.cli import main as cli_main

pytest.importorskip("transformers")

from hybridseq.interop.hf import FAMILIES, HFError, HFUnsupported  # noqa: E402
from hybridseq.interop.hf_io import import_transformers  # noqa: E402

T = import_transformers()

VOCAB = 61
EAGER = {"attn_implementation": "eager", "experts_implementation": "eager"}
ATTN = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}

# family -> (config class, model class, config keywords)
CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        **ATTN, intermediate_size=48, num_hidden_layers=2, attention_bias=True, mlp_bias=True,
        rope_parameters=LLAMA3, max_position_embeddings=64)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        **ATTN, intermediate_size=48, num_hidden_layers=2, sliding_window=5)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        **ATTN, intermediate_size=48, num_hidden_layers=2, tie_word_embeddings=True, rope_parameters=YARN,
        max_position_embeddings=64)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        **ATTN, head_dim=16, intermediate_size=48, num_hidden_layers=2, attention_bias=True)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        **ATTN, intermediate_size=24, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        **ATTN, intermediate_size=40, moe_intermediate_size=16, shared_expert_intermediate_size=24,
        num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1], norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        **ATTN, intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=2, num_experts=4,
        num_experts_per_tok=2, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        **ATTN, intermediate_size=16, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, clip_qkv=1.5,
        eos_token_id=None, pad_token_id=None)),
    "mamba": ("MambaConfig", "MambaForCausalLM", dict(
        hidden_size=32, state_size=4, num_hidden_layers=2, time_step_rank=3, use_bias=True)),
    "falcon_mamba": ("FalconMambaConfig", "FalconMambaForCausalLM", dict(
        hidden_size=32, state_size=4, num_hidden_layers=2, mixer_rms_eps=1e-5, tie_word_embeddings=False)),
    "jamba": ("JambaConfig", "JambaForCausalLM", dict(
        **ATTN, intermediate_size=24, num_hidden_layers=4, num_experts=4, num_experts_per_tok=2,
        attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=0,
        mamba_d_state=4, mamba_dt_rank=4, use_mamba_kernels=False)),
    "bamba": ("BambaConfig", "BambaForCausalLM", dict(
        **ATTN, intermediate_size=24, num_hidden_layers=2, attn_layer_indices=[1], mamba_n_heads=4,
        mamba_d_head=16, mamba_d_state=8, mamba_n_groups=2, mamba_chunk_size=8)),
    "nemotron_h": ("NemotronHConfig", "NemotronHForCausalLM", dict(
        **ATTN, head_dim=16, intermediate_size=24, layers_block_type=["mamba", "mlp", "attention", "moe"],
        mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8, n_groups=2, chunk_size=8, n_routed_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=16, moe_shared_expert_intermediate_size=20,
        routed_scaling_factor=1.5)),
    "granitemoehybrid": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM", dict(
        **ATTN, intermediate_size=16, shared_intermediate_size=24, num_hidden_layers=2, num_local_experts=4,
        num_experts_per_tok=2, layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=16,
        mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=8, position_embedding_type="rope",
        embedding_multiplier=2.0, residual_multiplier=0.7, attention_multiplier=0.3, logits_scaling=1.7)),
}
FAST = {"llama", "qwen2_moe", "mamba", "bamba"}


def tiny_hf(family: str, **extra):
    cfg_cls, model_cls, kw = CASES[family]
    cfg = getattr(T, cfg_cls)(vocab_size=VOCAB, **{**kw, **extra}, **EAGER)
    torch.manual_seed(0)
    model = getattr(T, model_cls)(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every weight moved off its init (norms off 1, biases off 0)
        for name, p in model.named_parameters():
            scale = 0.02 if name.endswith(("A_log", "dt_bias", "dt_proj.bias")) else 0.1
            p.add_(torch.randn(p.shape, generator=g) * scale)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.add_(torch.randn(b.shape, generator=g) * 0.1)
    return model


def saved(tmp_path, family: str, **extra):
    model = tiny_hf(family, **extra)
    folder = tmp_path / family
    model.save_pretrained(folder)
    return model, folder


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def ids_for(batch=2, length=11, seed=3):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def check_family(tmp_path, family: str):
    theirs, folder = saved(tmp_path, family)
    ours, cfg = hs.from_hf(folder)
    assert cfg.model.vocab_size == VOCAB and ours.embed.weight.dtype == torch.float32
    ids = ids_for()
    with torch.no_grad():
        ref = theirs(ids).logits
        got = ours(ids).logits
    assert rel(got, ref) < 1e-5, (family, rel(got, ref))

    # cached decoding: prefill 5 tokens, then one token at a time, against the full forward
    cache = ours.new_cache(batch_size=2, max_seq_len=ids.shape[1])
    steps = []
    with torch.no_grad():
        steps.append(ours(ids[:, :5], cache=cache).logits)
        for t in range(5, ids.shape[1]):
            steps.append(ours(ids[:, t:t + 1], cache=cache).logits)
    cached = torch.cat(steps, 1)
    assert rel(cached, ref) < 1e-5, (family, "cached", rel(cached, ref))

    # export -> transformers' from_pretrained -> the same logits
    out = tmp_path / f"{family}-export"
    hs.to_hf(ours, out)
    back = T.AutoModelForCausalLM.from_pretrained(out, **EAGER).eval()
    assert type(back).__name__ == FAMILIES[family].architecture
    with torch.no_grad():
        again = back(ids).logits
    assert rel(again, ref) < 1e-5, (family, "export", rel(again, ref))

    # greedy generation: the same tokens
    prompt = ids[:, :4]
    with torch.no_grad():
        mine = ours.generate(prompt, max_new_tokens=6, temperature=0.0)
        hf = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                             min_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(mine, hf), (family, mine, hf)
    return rel(got, ref)


@pytest.mark.parametrize("family", [pytest.param(f, marks=() if f in FAST else pytest.mark.slow)
                                    for f in CASES])
def test_family_logits_cache_export_generate(tmp_path, family):
    check_family(tmp_path, family)


def test_families_cover_the_table():
    assert set(CASES) == set(FAMILIES)


# ----------------------------------------------------------------------------------------------
# the layouts that come out
# ----------------------------------------------------------------------------------------------
def test_imported_layouts_use_the_block_options(tmp_path):
    _, folder = saved(tmp_path, "qwen2_moe")
    _, cfg = hs.from_hf(folder)
    assert cfg.stack == ["A", "E", "A", "F"]
    assert cfg.blocks.A.bias == "qkv"
    assert cfg.blocks.E.shared_expert_gate and cfg.blocks.E.shared_experts == 1
    assert not cfg.blocks.E.renormalize
    _, folder = saved(tmp_path, "bamba")
    _, cfg = hs.from_hf(folder)
    assert cfg.kinds == ["mamba2", "mlp", "attention", "mlp"]
    assert cfg.blocks.A.partial_rotary == 0.5


def test_tied_embeddings_and_vocab_padding(tmp_path):
    theirs, folder = saved(tmp_path, "mamba")  # Mamba ties its head by default
    ours, cfg = hs.from_hf(folder, pad_vocab_multiple=16)
    assert cfg.model.tie_embeddings and ours.lm_head is None
    assert ours.vocab_size == 64 and ours.vocab_size_unpadded == VOCAB
    assert torch.count_nonzero(ours.embed.weight[VOCAB:]) == 0
    ids = ids_for()
    with torch.no_grad():
        assert rel(ours(ids).logits[..., :VOCAB], theirs(ids).logits) < 1e-5
    out = tmp_path / "padded-export"
    hs.to_hf(ours, out)
    with open(out / "config.json") as f:
        conf = json.load(f)
    assert conf["vocab_size"] == VOCAB and conf["tie_word_embeddings"] is True
    back = T.AutoModelForCausalLM.from_pretrained(out, **EAGER).eval()
    assert back.get_input_embeddings().weight.shape[0] == VOCAB


def test_dtype_bfloat16_import_keeps_fp32_parameters(tmp_path):
    theirs, folder = saved(tmp_path, "mamba")
    ours, _ = hs.from_hf(folder, dtype="bfloat16")
    blk = ours.layers[0].block
    assert ours.embed.weight.dtype == torch.bfloat16 and blk.in_proj.weight.dtype == torch.bfloat16
    assert blk.A_log.dtype == torch.float32 and blk.D.dtype == torch.float32
    assert blk.A_log._keep_fp32 and blk.A_log._no_weight_decay and blk.conv_weight._no_reinit  # tags kept
    ids = ids_for()
    with torch.no_grad():
        assert rel(ours(ids).logits.float(), theirs(ids).logits) < 0.05
    out = tmp_path / "bf16-export"
    hs.to_hf(ours, out)
    with open(out / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    back = T.AutoModelForCausalLM.from_pretrained(out, **EAGER).eval()
    assert back.get_input_embeddings().weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert rel(back(ids).logits.float(), theirs(ids).logits) < 0.05


def test_sharded_checkpoint_and_tokenizer_files_travel(tmp_path):
    theirs = tiny_hf("llama")
    folder = tmp_path / "sharded"
    theirs.save_pretrained(folder, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    out = tmp_path / "hs-model"
    assert cli_main(["import-hf", str(folder), str(out)]) == 0
    assert (out / "config.yaml").is_file() and (out / "tokenizer.json").is_file()
    ours = hs.load_pretrained(out)
    ids = ids_for()
    with torch.no_grad():
        assert rel(ours(ids).logits, theirs(ids).logits) < 1e-5
    back = tmp_path / "hf-again"
    assert cli_main(["export-hf", str(out), str(back)]) == 0
    assert (back / "tokenizer.json").is_file()
    again = T.AutoModelForCausalLM.from_pretrained(back, **EAGER).eval()
    with torch.no_grad():
        assert rel(again(ids).logits, theirs(ids).logits) < 1e-5


# ----------------------------------------------------------------------------------------------
# errors: never silently dropped
# ----------------------------------------------------------------------------------------------
def _edit_config(folder, **changes):
    path = folder / "config.json"
    conf = json.loads(path.read_text())
    conf.update(changes)
    path.write_text(json.dumps(conf))


def _edit_tensors(folder, fn):
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    state = load_file(path)
    fn(state)
    save_file(state, path, metadata={"format": "pt"})


def test_unknown_architecture_is_named(tmp_path):
    _, folder = saved(tmp_path, "llama")
    _edit_config(folder, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(HFUnsupported, match="gpt2"):
        hs.from_hf(folder)
    assert cli_main(["import-hf", str(folder), str(tmp_path / "x")]) == 2


def test_left_over_and_missing_tensors_are_named(tmp_path):
    _, folder = saved(tmp_path, "llama")
    _edit_tensors(folder, lambda s: s.update({"model.layers.0.self_attn.rotary.extra": torch.zeros(3)}))
    with pytest.raises(HFError, match="rotary.extra"):
        hs.from_hf(folder)
    _edit_tensors(folder, lambda s: (s.pop("model.layers.0.self_attn.rotary.extra"),
                                     s.pop("model.layers.1.mlp.up_proj.weight")))
    with pytest.raises(HFError, match="layers.1.mlp.up_proj.weight"):
        hs.from_hf(folder)


def test_config_values_we_cannot_represent_are_named(tmp_path):
    _, folder = saved(tmp_path, "llama")
    _edit_config(folder, hidden_act="gelu")
    with pytest.raises(HFUnsupported, match="hidden_act"):
        hs.from_hf(folder)
    _edit_config(folder, hidden_act="silu", rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0})
    with pytest.raises(HFUnsupported, match="dynamic"):
        hs.from_hf(folder)


def test_export_says_why_no_family_fits(tmp_path):
    cfg = hs.load_config({"model": {"d_model": 16, "vocab_size": 37},
                          "blocks": {"M": {"kind": "mamba", "d_state": 4}, "A": {"kind": "attention", "n_heads": 2},
                                     "F": {"kind": "mlp", "d_ff": 32, "activation": "gelu"}},
                          "layout": "M A F"})
    model = hs.build_model(cfg)
    with pytest.raises(HFUnsupported, match="no transformers family fits") as e:
        hs.to_hf(model, tmp_path / "nope")
    assert "MambaForCausalLM" in str(e.value) and "LlamaForCausalLM" in str(e.value)
    with pytest.raises(HFUnsupported, match="does not fit MixtralForCausalLM"):
        hs.to_hf(model, tmp_path / "nope", family="mixtral")
    assert not (tmp_path / "nope").exists()


def test_export_of_a_native_layout_round_trips(tmp_path):
    """A layout made in hybridseq (not imported) that fits a family: Llama with GQA and tied
    embeddings exports, and transformers computes its logits."""
    cfg = hs.load_config({"model": {"d_model": 32, "vocab_size": VOCAB, "norm_eps": 1e-6},
                          "blocks": {"A": {"kind": "attention", "n_heads": 4, "n_kv_heads": 2},
                                     "F": {"kind": "mlp", "d_ff": 40}},
                          "layout": "(A F)*2"})
    torch.manual_seed(0)
    model = hs.build_model(cfg).eval()
    out = tmp_path / "native"
    hs.to_hf(model, out)
    back = T.AutoModelForCausalLM.from_pretrained(out, **EAGER).eval()
    assert type(back).__name__ == "LlamaForCausalLM"
    ids = ids_for()
    with torch.no_grad():
        assert rel(back(ids).logits, model(ids).logits) < 1e-5


def test_labels_follow_transformers(tmp_path):
    """``model(ids, labels=ids)`` is transformers' shifted next-token loss."""
    theirs, folder = saved(tmp_path, "llama")
    ours, _ = hs.from_hf(folder)
    ids = ids_for()
    labels = ids.clone()
    labels[:, :3] = -100
    with torch.no_grad():
        a = ours(ids, labels=labels).loss
        b = theirs(ids, labels=labels).loss
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
