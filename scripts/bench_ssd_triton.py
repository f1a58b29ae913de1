"""GPU timing of the Triton SSD scan (kernels/ssd/triton_ssd.py): forward and forward+backward at
the Mamba-2 benchmark shapes, a per-kernel breakdown (torch.profiler) and block-shape sweeps over
``TUNING``.

    python scripts/bench_ssd_triton.py                      # times + breakdown, both shapes
    python scripts/bench_ssd_triton.py --sweep scan_fwd     # sweep one kernel's blocks
    python scripts/bench_ssd_triton.py --shapes 8x2048x32x64x128 --z

Shapes are BxLxHxPxN (ngroups 1, bf16, chunk 256, D (H,), dt_bias, softplus; --z adds the gate).
Times: triton.testing.do_bench medians (ms), inputs rotated among 3 sets so that repeated runs
do not read a warm L2. mamba_ssm's mamba_chunk_scan_combined is timed beside when importable.
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch

SHAPES = ("8x2048x32x64x128", "2x8192x64x64x128")


def make(b, l, h, p, n, z, dtype=torch.bfloat16, dev="cuda"):
    x = torch.randn(b, l, h, p, device=dev, dtype=dtype)
    return dict(
        x=x, dt=torch.randn(b, l, h, device=dev, dtype=dtype) * 0.5,
        A=-torch.rand(h, device=dev) * 4 - 0.5,
        B=torch.randn(b, l, 1, n, device=dev, dtype=dtype),
        C=torch.randn(b, l, 1, n, device=dev, dtype=dtype),
        D=torch.randn(h, device=dev), dt_bias=torch.randn(h, device=dev) - 2.0,
        z=torch.randn(b, l, h, p, device=dev, dtype=dtype) if z else None)


def timer(fn, sets, rep=200):
    import triton

    it = itertools.cycle(sets)
    return triton.testing.do_bench(lambda: fn(next(it)), warmup=50, rep=rep,
                                   return_mode="median")


def ours(t, grad):
    from hybridseq.kernels.ssd.triton_ssd import ssd_scan_triton

    if not grad:
        with torch.no_grad():
            return ssd_scan_triton(t["x"], t["dt"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"],
                                   dt_bias=t["dt_bias"], dt_softplus=True, chunk_size=256)
    ins = {k: v.detach().requires_grad_() for k, v in t.items() if v is not None}
    y = ssd_scan_triton(ins["x"], ins["dt"], ins["A"], ins["B"], ins["C"], D=ins["D"],
                        z=ins.get("z"), dt_bias=ins["dt_bias"], dt_softplus=True, chunk_size=256)
    y.backward(t["gy"])


def theirs(t, grad):
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    ins = {k: (v.detach().requires_grad_(grad) if v is not None else None) for k, v in t.items()
           if k != "gy"}
    y = mamba_chunk_scan_combined(ins["x"], ins["dt"], ins["A"], ins["B"], ins["C"], 256,
                                  D=ins["D"], z=ins["z"], dt_bias=ins["dt_bias"],
                                  dt_softplus=True)
    if grad:
        y.backward(t["gy"])


def breakdown(fn, t):
    """Per-kernel GPU time (us per call) over 5 calls, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn(t)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn(t)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0):
            tot = getattr(e, "self_device_time_total", None) or e.self_cuda_time_total
            rows.append((tot / 5, e.count // 5, e.key[:60]))
    rows.sort(reverse=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--z", action="store_true")
    ap.add_argument("--sweep", default=None, help="a TUNING key: time its candidate blocks")
    ap.add_argument("--no-breakdown", action="store_true")
    ap.add_argument("--tuning", default=None, help="JSON dict merged into TUNING")
    args = ap.parse_args()
    from hybridseq.kernels.ssd import triton_ssd as T

    if args.tuning:
        T.TUNING.update({k: (tuple(v) if isinstance(v, list) else v)
                         for k, v in json.loads(args.tuning).items()})
    try:
        import mamba_ssm  # noqa: F401
        have_mamba = True
    except Exception:
        have_mamba = False
    table = []
    for shp in args.shapes:
        b, l, h, p, n = map(int, shp.split("x"))
        sets = [make(b, l, h, p, n, args.z) for _ in range(3)]
        for s in sets:
            s["gy"] = torch.randn_like(s["x"])
        if args.sweep:
            cands = SWEEPS[args.sweep]
            for cfg in cands:
                T.TUNING[args.sweep] = cfg
                try:
                    grad = args.sweep not in ("scan_fwd", "state_fwd")
                    ms = timer(lambda t, grad=grad: ours(t, grad), sets)
                except Exception as e:  # a shape that does not compile (shared memory)
                    print(f"row {shp} {args.sweep}={cfg}: {type(e).__name__}: {str(e)[:120]}",
                          flush=True)
                    continue
                print(f"row {shp} {args.sweep}={cfg} {'fwd+bwd' if grad else 'fwd'} "
                      f"{ms:.3f} ms", flush=True)
                table.append((shp, f"{args.sweep}={cfg}", ms))
            T.TUNING[args.sweep] = None
            continue
        fwd = timer(lambda t: ours(t, False), sets)
        both = timer(lambda t: ours(t, True), sets)
        print(f"row {shp} triton fwd {fwd:.3f} ms fwd+bwd {both:.3f} ms", flush=True)
        table.append((shp, "triton fwd", fwd))
        table.append((shp, "triton fwd+bwd", both))
        if have_mamba:
            mf = timer(lambda t: theirs(t, False), sets)
            mb = timer(lambda t: theirs(t, True), sets)
            table.append((shp, "mamba_ssm fwd", mf))
            table.append((shp, "mamba_ssm fwd+bwd", mb))
        if not args.no_breakdown:
            print(f"kernels {shp} fwd+bwd (us per call):")
            for us, cnt, name in breakdown(lambda t: ours(t, True), sets[0])[:14]:
                print(f"   {us:9.1f} x{cnt}  {name}")
    print("\nshape                 what                               ms")
    for shp, what, ms in table:
        print(f"{shp:21s} {what:34s} {ms:8.3f}")


# candidate block shapes per kernel for --sweep (see TUNING in triton_ssd.py)
SWEEPS = {
    "state_fwd": [(64, 64, 64, 4, 2), (64, 32, 64, 4, 2), (64, 64, 32, 4, 2), (128, 64, 64, 4, 2),
                  (64, 64, 128, 8, 2), (32, 64, 64, 4, 2), (64, 64, 64, 8, 3)],
    "state_bwd": [(64, 64, 64, 4, 2), (64, 32, 64, 4, 2), (64, 64, 32, 4, 2), (128, 64, 64, 4, 2),
                  (64, 64, 128, 8, 2), (32, 64, 64, 4, 2), (64, 64, 64, 8, 3)],
    "scan_fwd": [(64, 64, 64, 4, 2), (128, 64, 64, 8, 2), (64, 32, 64, 4, 3), (128, 32, 64, 4, 2),
                 (64, 64, 32, 4, 2), (128, 64, 64, 4, 2), (64, 64, 64, 4, 3)],
    "col_bwd": [(64, 8, 1), (64, 4, 1), (32, 4, 1), (32, 8, 2), (64, 8, 2), (128, 8, 1)],
    "row_bwd": [(64, 64, 8, 1), (64, 64, 4, 1), (64, 32, 4, 2), (128, 64, 8, 1), (64, 64, 8, 2),
                (32, 64, 4, 2)],
    "head_split": [1, 2, 4, 8],
}

if __name__ == "__main__":
    main()
