"""HybridLM: exact parameter counts, causality, batch independence, init, losses, checkpointing,
precision, build_model and save/load_pretrained."""
import math

import pytest
import torch
import torch.nn.functional as F

import hybridseq as hs
from hybridseq.errors import ConfigError, HybridSeqError
from hybridseq.model import flops_per_token, layer_table, param_counts, state_bytes

BLOCKS = {
    "M": {"kind": "mamba", "d_state": 4},
    "A": {"kind": "attention", "n_heads": 4, "n_kv_heads": 2},
    "W": {"kind": "attention", "n_heads": 2, "window": 3, "rope_theta": None, "qk_norm": True},
    "E": {"kind": "moe", "n_experts": 4, "top_k": 2, "d_ff": 16},
    "F": {"kind": "mlp", "d_ff": 40},
}


def cfg_for(layout, vocab=37, **model):
    return hs.load_config({"model": {"d_model": 16, "vocab_size": vocab, **model},
                           "blocks": BLOCKS, "layout": layout})


def real_count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("layout,model_kw", [
    ("M A W E F", {}),
    ("M E M E", {"tie_embeddings": False, "norm": "layernorm"}),
    ("A F", {"pad_vocab_multiple": 16}),
])
def test_param_counts_exact(layout, model_kw):
    cfg = cfg_for(layout, **model_kw)
    model = hs.build_model(cfg)
    total, active = param_counts(model.cfg)
    assert model.num_params() == total == real_count(model)
    per_expert = 3 * 16 * 16
    n_moe = layout.split().count("E")
    assert total - active == n_moe * (4 - 2) * per_expert
    assert model.num_params(active=True) == active
    if model_kw.get("pad_vocab_multiple"):
        assert model.vocab_size == 48 and model.embed.weight.shape[0] == 48
    assert model.layout == [BLOCKS[s]["kind"] for s in layout.split()]
    assert model.stack == layout.split()


def test_layer_table_flops_state_bytes():
    cfg = cfg_for("M A W E F")
    model = hs.build_model(cfg)
    rows = layer_table(model.cfg, seq_len=64)
    assert [r["kind"] for r in rows] == model.layout
    assert flops_per_token(model.cfg, 64) == sum(r["flops_per_token"] for r in rows) + 2 * 16 * 37
    cache = model.new_cache(batch_size=3, max_seq_len=20)
    assert cache.nbytes() == 3 * state_bytes(model.cfg, 20, dtype_bytes=4)
    assert model.state_bytes(20, 4) == state_bytes(model.cfg, 20, 4)


def test_model_causal_and_batch_independent():
    torch.manual_seed(1)
    model = hs.build_model(cfg_for("M A W E F M", init_std=0.2)).eval()
    ids = torch.randint(0, 37, (3, 14))
    t = 6
    with torch.no_grad():
        logits = model(ids).logits
        ids2 = ids.clone()
        ids2[:, t + 1:] = torch.randint(0, 37, (3, 14 - t - 1))
        logits2 = model(ids2).logits
        torch.testing.assert_close(logits2[:, :t + 1], logits[:, :t + 1], atol=1e-5, rtol=1e-5)
        assert (logits2[:, t + 1:] - logits[:, t + 1:]).abs().max() > 1e-3
        torch.testing.assert_close(model(ids[2:]).logits, logits[2:], atol=1e-5, rtol=1e-5)


def test_init_std_and_residual_rescale():
    cfg = cfg_for("F F F F M M M M", init_std=0.05)
    model = hs.build_model(cfg)
    n = 8
    assert model.embed.weight.std().item() == pytest.approx(0.05, rel=0.1)
    up = torch.cat([l.block.gate_up_proj.weight.flatten() for l in model.layers[:4]])
    down = torch.cat([l.block.down_proj.weight.flatten() for l in model.layers[:4]])
    assert up.std().item() == pytest.approx(0.05, rel=0.1)
    assert down.std().item() == pytest.approx(0.05 / math.sqrt(n), rel=0.1)
    m = model.layers[4].block
    torch.testing.assert_close(m.A_log, torch.log(torch.arange(1, 5.0)).repeat(m.d_inner, 1))
    assert torch.equal(m.D, torch.ones(m.d_inner))
    assert F.softplus(m.dt_proj.bias).min() >= 1e-3 * 0.999  # dt init kept
    assert m.conv_weight.abs().max() > 0.2  # conv keeps its own U(+-1/sqrt(d_conv)) init
    plain = hs.build_model(cfg_for("F F", init_std=0.05, rescale_residual=False))
    assert plain.layers[0].block.down_proj.weight.std().item() == pytest.approx(0.05, rel=0.15)
    tied = hs.build_model(cfg_for("F"))
    assert tied.lm_head is None and "lm_head.weight" not in tied.state_dict()


def test_loss_is_ce_plus_aux_and_ignores_minus_100():
    model = hs.build_model(cfg_for("M E A", init_std=0.1))
    ids = torch.randint(0, 37, (2, 9))
    labels = torch.randint(0, 37, (2, 9))
    labels[:, :4] = -100
    out = model(ids, labels=labels)
    # labels are shifted inside (transformers' convention): logits[t] is scored against labels[t + 1]
    ce = F.cross_entropy(out.logits[:, 3:-1].reshape(-1, 37), labels[:, 4:].reshape(-1))
    assert out.aux_loss.dim() == 0 and out.aux_loss.item() > 0
    torch.testing.assert_close(out.loss, ce + out.aux_loss)
    assert any(k.startswith("1.") for k in out.metrics)  # the MoE layer's metrics
    dense = hs.build_model(cfg_for("M F"))
    assert dense(ids).aux_loss.item() == 0.0 and dense(ids).loss is None


def test_activation_checkpointing_same_gradients():
    torch.manual_seed(0)
    base = hs.build_model(cfg_for("M E F A", init_std=0.1))
    ckpt = hs.build_model(cfg_for("M E F A", init_std=0.1, checkpointing=["mamba", "moe", "mlp"]))
    ckpt.load_state_dict(base.state_dict())
    ids = torch.randint(0, 37, (2, 8))
    grads = []
    for m in (base, ckpt):
        m.train()
        m.zero_grad()
        m(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)


def test_bfloat16_keeps_fp32_params_and_runs():
    model = hs.build_model(cfg_for("M E A")).bfloat16()
    tagged = [(n, p) for n, p in model.named_parameters() if getattr(p, "_keep_fp32", False)]
    names = {n.split(".", 3)[-1] for n, _ in tagged}
    assert {"A_log", "D", "dt_proj.bias"} <= names
    assert all(p.dtype == torch.float32 for _, p in tagged)
    assert model.embed.weight.dtype == torch.bfloat16
    out = model(torch.randint(0, 37, (2, 6)))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


def test_build_model_vocab_resolution():
    auto = {"model": {"d_model": 16, "vocab_size": "auto"}, "blocks": {"F": {"kind": "mlp"}},
            "layout": "F"}
    cfg = hs.load_config({**auto, "train": {"task": {"name": "selective_copy", "vocab": 10}}})
    from hybridseq.data import task_vocab_size

    assert hs.build_model(cfg).vocab_size == task_vocab_size(cfg.train.task)
    assert hs.build_model(cfg, vocab_size=300).vocab_size == 300
    assert hs.build_model(hs.load_config(auto, overrides=["model.pad_vocab_multiple=64"]),
                          vocab_size=300).vocab_size == 320
    with pytest.raises(ConfigError, match="vocab_size"):
        hs.HybridLM(cfg)  # "auto" is resolved by build_model only


def test_save_and_load_pretrained(tmp_path):
    cfg = cfg_for("M W E", init_std=0.1, tie_embeddings=False)
    model = hs.build_model(cfg)
    ids = torch.randint(0, 37, (2, 7))
    folder = tmp_path / "m"
    hs.save_pretrained(model, cfg, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "model.safetensors"]
    again = hs.load_pretrained(folder)
    assert not again.training and again.config_hash == model.config_hash
    torch.testing.assert_close(again(ids).logits, model.eval()(ids).logits, atol=0, rtol=0)
    # overwrite in place with a bf16 model: dtype kept, fp32 params kept
    hs.save_pretrained(model.bfloat16(), None, folder)
    b16 = hs.load_pretrained(folder)
    assert b16.embed.weight.dtype == torch.bfloat16 and b16.layers[0].block.A_log.dtype == torch.float32
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folders left
    with pytest.raises(HybridSeqError, match="does not describe this model"):
        hs.save_pretrained(model, cfg_for("M W"), tmp_path / "x")
    with pytest.raises(HybridSeqError, match="missing"):
        hs.load_pretrained(tmp_path / "nothing")
