"""Block timings: one block of each kind, forward and forward+backward, per implementation.

Default: d_model 1024, batch 8, seqlen 2048, bf16 (the Mamba block of the kernel issue).
Rows: ``mamba`` with ``impl`` triton and torch (chunked PyTorch scan), ``attention`` (auto
backend; ``--attn-impls`` for more), ``moe`` (``--moe-impls``), ``mlp``. ``TFLOPs`` uses the
block's closed-form ``flops_per_token`` (x3 for forward+backward).

Timed regions (unchanged since the first BENCHMARKS.md entry, so rows compare across runs): ``fwd``
is ``blk(x)`` under ``no_grad``; ``fwd+bwd`` is ``torch.autograd.grad(blk(x), [x, *params], dy)``,
bf16 parameters (A_log, D, dt bias fp32), no autocast; ``common.time_fn`` medians, L2 flushed
(``--back-to-back R``: R calls per timed sample, the time per call: the steady state of a model
whose host runs ahead of the GPU, without the launch latency before one call's first kernels).
``--mamba-impls mamba_ssm`` times ``mamba_ssm.modules.mamba_simple.Mamba`` (d_state 16, d_conv 4,
expand 2, its fast path when causal_conv1d is importable; cast to the bench dtype as a whole) when
mamba_ssm imports, the same timed regions; a status row otherwise.
``--mamba-impls triton-unfused`` is the Triton block with plain autograd around the kernels
(``MambaBlock(..., fuse_conv_proj=False)``: the path before the fused conv/x_proj/dt_proj node), for an in-run
before/after. ``--profile`` prints, per Mamba row, every kernel of one fwd+bwd (torch.profiler).
"""
from __future__ import annotations

import argparse

import torch

from .common import add_back_to_back_argument, time_fn

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    parser.add_argument("--kinds", default="mamba,attention,moe,mlp", help="comma list of block kinds")
    parser.add_argument("--mamba-impls", default="triton,torch")
    parser.add_argument("--attn-impls", default="auto")
    parser.add_argument("--moe-impls", default="auto")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--device", default=None)
    add_back_to_back_argument(parser, "block's fwd and fwd+bwd")
    parser.add_argument("--profile", action="store_true",
                        help="print the kernels of one Mamba fwd+bwd (torch.profiler) per impl")


def _specs(args):
    yield from (("mamba", {"impl": i}) for i in args.mamba_impls.split(",") if i)
    yield from (("attention", {"n_heads": args.heads, "impl": i}) for i in args.attn_impls.split(",") if i)
    yield from (("moe", {"n_experts": args.experts, "top_k": args.top_k, "impl": i})
                for i in args.moe_impls.split(",") if i)
    yield "mlp", {}


def _profile(fn, label, device) -> None:
    """Print the kernels (CUDA) or ops (CPU) of one ``fn()`` with their self times."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        with profile(activities=acts) as prof:
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
        ev = prof.key_averages()
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        try:
            table = ev.table(sort_by=key, row_limit=40)
        except Exception:  # newer torch names it device time
            table = ev.table(sort_by="self_device_time_total", row_limit=40)
        print(f"== profile: {label} (one fwd+bwd)\n{table}", flush=True)
    except Exception as e:  # the profile is a diagnostic: never fail the bench on it
        print(f"== profile: {label}: failed: {type(e).__name__}: {e}", flush=True)


def _mamba_ssm_block(d_model: int):
    """mamba_ssm's Mamba mixer with our MambaBlock's default sizes (raises ImportError when absent)."""
    from mamba_ssm.modules.mamba_simple import Mamba  # type: ignore

    return Mamba(d_model=d_model, d_state=16, d_conv=4, expand=2)


def run(args) -> list[dict]:
    from ..blocks import kind_spec

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _DTYPES[args.dtype]
    kinds = set(args.kinds.split(","))
    d, b, l = args.d_model, args.batch, args.seqlen
    rows = []
    for kind, spec in _specs(args):
        if kind not in kinds:
            continue
        row = {"block": kind, "impl": spec.get("impl", "-"), "shape": f"B{b} L{l} d{d}"}
        try:
            unfused = kind == "mamba" and spec["impl"] == "triton-unfused"
            if unfused:
                spec = {**spec, "impl": "triton"}
            if kind == "mamba" and spec["impl"] == "mamba_ssm":
                blk = _mamba_ssm_block(d).to(device=device, dtype=dtype)
                typed = kind_spec(kind).from_mapping({}, d_model=d)
            else:
                typed = kind_spec(kind).from_mapping(spec, key=kind, d_model=d)
                if unfused:
                    from ..blocks.mamba.block import MambaBlock

                    blk = MambaBlock(d, typed, fuse_conv_proj=False)
                else:
                    blk = typed.build(d)
                blk = blk.to(device=device, dtype=dtype)
            x = torch.randn(b, l, d, device=device, dtype=dtype, requires_grad=True)
            dy = torch.randn(b, l, d, device=device, dtype=dtype)
            params = [p for p in blk.parameters() if p.requires_grad]

            def fwd():
                with torch.no_grad():
                    blk(x)

            def fwd_bwd():
                torch.autograd.grad(blk(x), [x, *params], dy)

            fwd_bwd()
            r = getattr(args, "back_to_back", 1)
            t_f = time_fn(fwd, iters=args.iters, device=device, back_to_back=r)["median_ms"]
            t_fb = time_fn(fwd_bwd, iters=args.iters, device=device, back_to_back=r)["median_ms"]
            if args.profile and kind == "mamba":
                _profile(fwd_bwd, f"mamba {row['impl']}", device)
        except Exception as e:  # an impl that cannot run here: say why, keep going
            rows.append({**row, "status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:90]}"})
            continue
        flops = typed.flops_per_token(d, l) * b * l
        rows.append({**row, "fwd_ms": t_f, "fwd_bwd_ms": t_fb,
                     "fwd_TFLOPs": flops / t_f / 1e9, "fwd_bwd_TFLOPs": 3 * flops / t_fb / 1e9,
                     "tokens_per_s_fwd_bwd": b * l / t_fb * 1e3, "status": "ok"})
        del blk, x, dy
    return rows


if __name__ == "__main__":  # python -m hybridseq.bench.block: the same as `hybridseq bench block`
    from .common import script_main

    script_main(add_arguments, run, __doc__)
