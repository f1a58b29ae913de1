"""`hybridseq bench train`: whole training steps through the real engine on CPU at tiny sizes:
the row, tokens/s and MFU arithmetic, the profile's categories adding up to the profiled step,
--json through the CLI, and the category rules on CUDA-style kernel names."""
from __future__ import annotations

import argparse
import json
import os

import pytest

from hybridseq.bench import train as bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--steps", "2", "--warmup", "1", "--batch", "2", "--seq-len", "16"]


def run_args(*argv):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(list(argv))
    return bench.run(args)


def test_train_step_row(monkeypatch):
    monkeypatch.delenv("HYBRIDSEQ_PEAK_TFLOPS", raising=False)
    rows = run_args(os.path.join(ROOT, "layouts", "mamba.yaml"), "model.d_model=32", *TINY)
    assert len(rows) == 1
    r = rows[0]
    assert r["what"] == "train step" and r["device"] == "cpu" and r["precision"] == "fp32"
    assert (r["batch"], r["seq_len"]) == (2, 16) and r["params"] > 0
    assert r["step_ms"] > 0 and r["step_ms_median"] > 0
    assert r["tokens_per_s"] == pytest.approx(2 * 16 / (r["step_ms"] / 1e3))
    assert r["mfu"] is None  # no known peak on CPU
    assert r["TFLOPs"] > 0 and r["peak_mem_gib"] > 0


def test_mfu_with_a_given_peak(monkeypatch):
    monkeypatch.setenv("HYBRIDSEQ_PEAK_TFLOPS", "0.5")
    import hybridseq as hs

    path = os.path.join(ROOT, "layouts", "transformer.yaml")
    (r,) = run_args(path, *TINY, "--vocab", "50")
    model = hs.build_model(hs.load_config(path, overrides=["model.vocab_size=50"]))
    flops = model.flops_per_token(16)
    assert r["mfu"] == pytest.approx(3 * flops * r["tokens_per_s"] / 0.5e12)
    assert r["TFLOPs"] == pytest.approx(3 * flops * r["tokens_per_s"] / 1e12)


@pytest.mark.parametrize("layout", ["jamba", "granite-4-h"])
def test_profile_categories_add_up(layout):
    """Every category is reported, and the categories plus the host gaps add up to the profiled
    step (on CPU: op self times on the step's thread + the time between ops)."""
    rows = run_args(os.path.join(ROOT, "layouts", f"{layout}.yaml"), *TINY, "--profile",
                    "--profile-steps", "1")
    prof = {r["category"]: r for r in rows if r["what"] == "profile"}
    assert list(prof) == bench.CATEGORIES + [bench.HOST_GAPS, "profiled step"]
    step = prof.pop("profiled step")["step_ms"]
    total = sum(r["step_ms"] for r in prof.values())
    assert total == pytest.approx(step, rel=0.03)
    assert sum(r["pct"] for r in prof.values()) == pytest.approx(100, rel=0.03)
    for cat in (bench.GEMM, bench.SCAN, bench.OPTIMIZER, bench.LOSS):
        assert prof[cat]["step_ms"] > 0, cat


def test_cli_json(capsys):
    from hybridseq.cli import main

    code = main(["bench", "train", os.path.join(ROOT, "layouts", "mamba2.yaml"), "layout=M*2",
                 "--steps", "1", "--warmup", "0", "--batch", "2", "--seq-len", "8", "--json"])
    assert code in (0, None)
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["what"] == "train step" and rows[0]["layout"] == "mamba2"
    assert rows[0]["seq_len"] == 8


def test_bad_option_is_one_line_error():
    from hybridseq.errors import HybridSeqError

    with pytest.raises(HybridSeqError, match="--steps must be >= 1"):
        run_args(os.path.join(ROOT, "layouts", "mamba.yaml"), "--steps", "0")


# ---------------------------------------------------------------- the category rules

@pytest.mark.parametrize("chain, want", [
    (["_scan_fwd_kernel", "_SelectiveScanTriton"], bench.SCAN),
    (["_scan_bwd_kernel"], bench.SCAN),
    (["_conv_bwd_kernel", "_ConvProjFnBackward"], bench.SCAN),
    (["_ssd_chunk_scan_fwd_kernel", "hybridseq::ssd_scan_fwd"], bench.SCAN),
    (["aten::bmm", "_ChunkedScan"], bench.SCAN),                 # the CPU scan's own matmul
    (["sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "aten::mm",
      "_ConvProjFnBackward"], bench.GEMM),                        # x_proj inside the Mamba node
    (["nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT", "aten::addmm", "aten::linear"], bench.GEMM),
    (["cutlass3x_sm90_tensorop_gemm_grouped", "aten::_grouped_mm", "_GroupedMLP"], bench.GEMM),
    (["flash_fwd_kernel", "aten::_flash_attention_forward"], bench.ATTENTION),
    (["cudnn_generated_fort_native_sdpa_sm90_knob_7", "aten::_cudnn_attention_forward"],
     bench.ATTENTION),
    (["_softmax_topk_fwd_kernel", "_SoftmaxTopk"], bench.MOE),
    (["_bin_scan_kernel"], bench.MOE),                           # the expert sort, not a scan
    (["_gather_sum_kernel", "_UnpermuteTriton"], bench.MOE),
    (["_logits_dw_kernel", "_RouterLogitsBackward"], bench.MOE),
    (["aten::index_select", "aten::embedding"], bench.ELEMENTWISE),
    (["multi_tensor_apply_kernel", "aten::_foreach_mul_"], bench.OPTIMIZER),
    (["vectorized_elementwise_kernel", "aten::lerp_", "Optimizer.step#AdamW.step"],
     bench.OPTIMIZER),
    (["_lse_loss_kernel", "hybridseq::linear_cross_entropy_fwd"], bench.LOSS),
    (["nll_loss_forward_reduce_cuda_kernel_2d", "aten::nll_loss_forward"], bench.LOSS),
    (["_rmsnorm_gated_fwd_kernel", "_RMSNormGated"], bench.ELEMENTWISE),
    (["_swiglu_fwd_kernel", "_SwiGLU"], bench.ELEMENTWISE),
    (["vectorized_elementwise_kernel", "aten::mul"], bench.ELEMENTWISE),
    (["Memcpy HtoD (Pageable -> Device)"], bench.ELEMENTWISE),
])
def test_classify_kernel_names(chain, want):
    assert bench.classify(chain) == want


def test_breakdown_rows():
    items = [(["aten::mm"], 3000.0), (["_scan_fwd_kernel"], 2000.0),
             (["multi_tensor_apply_kernel", "Optimizer.step#AdamW.step"], 1000.0)]
    rows = bench.breakdown(items, wall_us=8000.0, busy_us=6000.0, steps=2)
    got = {r["category"]: r for r in rows}
    assert got[bench.GEMM]["step_ms"] == pytest.approx(1.5)
    assert got[bench.SCAN]["pct"] == pytest.approx(25.0)
    assert got[bench.HOST_GAPS]["step_ms"] == pytest.approx(1.0)
    assert got["profiled step"]["step_ms"] == pytest.approx(4.0)
    assert sum(r["step_ms"] for c, r in got.items() if c != "profiled step") == pytest.approx(4.0)


def test_union_of_intervals():
    assert bench._union([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == pytest.approx(4.0)
