"""Whole-model training speed: full training steps of a layout through the real engine.

    hybridseq bench train LAYOUT [key=value ...] [--steps N] [--warmup W] [--batch B]
                          [--seq-len L] [--vocab V] [--device D] [--compile] [--profile]

Each step is what ``hybridseq train`` runs (``train.engine.LocalEngine``): the forward under the
engine's autocast (bf16 on CUDA unless ``train.precision`` says otherwise), the trainer's
cross-entropy plus the MoE auxiliary loss, backward, gradient clipping, AdamW and the LR
schedule, on random token batches of (B, L) (B: ``train.batch_size``, L: the task's
``seq_len``, unless given). ``key=value`` overrides (``model.d_model=1024 layout="M*24"``) go
right after LAYOUT, before the options. ``--compile`` sets ``train.compile``
(``torch.compile(model)``, inductor); the warmup steps absorb the compilation.

Row ``train step``: ``step_ms`` (the mean over the N timed steps, host wall clock, the device
synchronised at the end; the engine's clip already reads the gradient norm on the host every
step), ``step_ms_median``, ``tokens_per_s``, ``TFLOPs`` achieved (3 x the model's closed-form
forward FLOPs per token, ``HybridLM.flops_per_token(L)``, x tokens/s), ``mfu`` (that over the
device's dense peak, ``train.perf.peak_flops``; empty where the peak is unknown, e.g. CPU,
unless HYBRIDSEQ_PEAK_TFLOPS is set) and ``peak_mem_gib`` (CUDA: max_memory_allocated over the
timed steps; CPU: the process's peak resident set).

``--profile``: ``--profile-steps`` more steps under torch.profiler, then one row per category
with its ``step_ms`` per step and ``pct`` of the profiled step (profiler overhead included, so
the profiled step is a little longer than the timed one). Categories come from kernel names
(CUDA) or op names (CPU) and the ops that launched them (``CATEGORIES``): GEMMs, scan/conv
(Mamba-1 scan, conv, Mamba-2 SSD), attention, MoE routing and permutation, norms and
elementwise, loss, optimizer (clip included), and host gaps = wall time minus device busy time
(CUDA: the union of kernel intervals; CPU: the time inside ops on the step's thread, so the gaps
are the host's Python between ops). The categories and the gaps add up to the profiled step.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from types import SimpleNamespace

import torch

# ---------------------------------------------------------------------------- categories
GEMM = "GEMMs"
SCAN = "scan/conv"
ATTENTION = "attention"
MOE = "MoE routing/permutation"
ELEMENTWISE = "norms/elementwise"
LOSS = "loss"
OPTIMIZER = "optimizer"
HOST_GAPS = "host gaps"

# Substrings (lower case) of a kernel's or op's name, or of the op that launched it. Scopes are
# looked up along the chain (the kernel or op itself, then the ops that contain it, nearest
# first); the kernels' own names are those of hybridseq's Triton kernels and autograd ops, of
# torch's and cuBLAS/CUTLASS kernels, and of mamba_ssm's and flash-attn's.
SCOPES_FIRST = [  # their matmuls belong to them (the chunked CPU scan's bmm, attention's)
    (SCAN, ("_scan_fwd", "_scan_bwd", "selectivescan", "selective_scan", "chunkedscan",
            "selective_fwd", "selective_bwd", "_conv_fwd", "_conv_bwd", "conv1d", "causalconv",
            "causal_conv", "_ssd", "ssd_", "ssdtriton", "chunk_scan",
            "chunk_state", "state_passing", "mamba_chunk", "convolution")),
    (ATTENTION, ("attention", "attn", "flash", "fmha", "sdpa", "flex_", "triton_tem_fused")),
]
GEMM_NAMES = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm",
              "aten::matmul", "aten::linear", "aten::einsum", "gemm", "xmma", "cutlass", "nvjet",
              "cublas", "wgmma", "sm90_", "sm80_", "ampere_", "hopper_", "_grouped_mm")
SCOPES_THEN = [
    (LOSS, ("cross_entropy", "crossentropy", "nll_loss", "log_softmax", "logsoftmax",
            "_lse_loss", "_dlogits")),
    (OPTIMIZER, ("optimizer.", "adamw", "_foreach", "multi_tensor_apply", "clip_grad",
                 "fused_adam", "zero_grad")),
    (MOE, ("gatherrows", "permutetriton", "unpermute", "routerlogits", "router_logits",
           "softmaxtopk", "softmax_topk", "topk", "argsort", "sort", "histc", "bincount",
           "_gather_sum", "_scatter_scale_dot", "_block_hist", "_bin_scan", "_scatter_kernel",
           "_logits_fwd", "_logits_dx", "_logits_dw", "sinkhorn", "groupedmlp")),
    (ELEMENTWISE, ("norm", "swiglu", "silu", "embedding")),
]
# Generic ops counted as MoE permutation when nothing up their chain says otherwise: the
# padded grouped GEMM's row scatter and gather on CPU, the histogram.
WEAK = [(MOE, ("aten::index_select", "aten::index_copy", "aten::repeat_interleave",
               "aten::scatter_add", "aten::index_add"))]
CATEGORIES = [GEMM, SCAN, ATTENTION, MOE, ELEMENTWISE, LOSS, OPTIMIZER]


def _match(name: str, scopes) -> str | None:
    low = name.lower()
    for cat, keys in scopes:
        if any(k in low for k in keys):
            return cat
    return None


def classify(chain) -> str:
    """The category of a kernel or op given ``chain``: its own name, then the names of the ops
    that contain it, nearest first. A scan/conv or attention scope anywhere up the chain wins
    (their internal matmuls are theirs); then a GEMM by its own name; then the loss, optimizer,
    MoE or norm scopes up the chain; then the generic ops of ``WEAK`` by their own name; else
    norms/elementwise."""
    chain = [c for c in chain if c]
    for name in chain:
        cat = _match(name, SCOPES_FIRST)
        if cat is not None:
            return cat
    if chain and any(k in chain[0].lower() for k in GEMM_NAMES):
        return GEMM
    for name in chain:
        cat = _match(name, SCOPES_THEN)
        if cat is not None:
            return cat
    return (_match(chain[0], WEAK) if chain else None) or ELEMENTWISE


def _union(intervals) -> float:
    """Total length of the union of (start, end) intervals."""
    total, end = 0.0, -math.inf
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def breakdown(items, wall_us: float, busy_us: float, steps: int) -> list[dict]:
    """Rows of ``--profile``: ``items`` (chain, microseconds) per kernel or op self time; the
    wall time and the device busy time of ``steps`` profiled steps (microseconds). One row per
    category (ms per step, % of the step), host gaps, and the profiled step itself."""
    per = {c: 0.0 for c in CATEGORIES}
    for chain, us in items:
        per[classify(chain)] += us
    per[HOST_GAPS] = max(0.0, wall_us - busy_us)
    steps = max(1, steps)
    rows = [{"what": "profile", "category": c, "step_ms": us / steps / 1e3,
             "pct": 100.0 * us / wall_us if wall_us > 0 else 0.0} for c, us in per.items()]
    rows.append({"what": "profile", "category": "profiled step", "step_ms": wall_us / steps / 1e3,
                 "pct": 100.0})
    return rows


def _chain(ev, fwd=None):
    """Names from ``ev`` up to its outermost op. A backward node's chain continues with that of
    the forward op that created it (``fwd``: (thread, sequence number) -> forward event), so
    the backward of e.g. a chunked scan's torch ops is counted with the scan."""
    out, linked = [], fwd is None
    while ev is not None:
        out.append(ev.name)
        if not linked and "Backward" in ev.name and getattr(ev, "sequence_nr", -1) >= 0:
            f = fwd.get((getattr(ev, "fwd_thread", None), ev.sequence_nr))
            if f is not None:
                out.extend(_chain(f))
                linked = True
        ev = ev.cpu_parent
    return out


def _forward_ops(events) -> dict:
    """(thread, sequence number) -> the innermost forward op that recorded it."""
    out, depth = {}, {}
    for e in events:
        seq = getattr(e, "sequence_nr", -1)
        if seq is None or seq < 0 or "Backward" in e.name or e.name.startswith("autograd::"):
            continue
        key = (e.thread, seq)
        d = len(_chain(e))
        if d > depth.get(key, -1):
            out[key], depth[key] = e, d
    return out


def profile_items(prof, device: torch.device):
    """(items, busy_us) of a torch.profiler run (see ``breakdown``). CUDA: every kernel (and
    memcpy/memset) with the chain of the CPU op that launched it, busy = the union of their
    intervals. CPU: every op's self time on the thread that ran the most, busy = the time
    covered by that thread's outermost ops."""
    from torch.autograd import DeviceType

    events = [e for e in prof.events() if not getattr(e, "is_async", False)]
    fwd = _forward_ops([e for e in events if e.device_type == DeviceType.CPU])
    if device.type == "cuda":
        cpu = {e.id: e for e in events if e.device_type == DeviceType.CPU}
        dev = [e for e in events if e.device_type == DeviceType.CUDA]
        if dev and any(getattr(e, "linked_correlation_id", 0) for e in dev):
            items = [([e.name] + _chain(cpu.get(getattr(e, "linked_correlation_id", 0)), fwd),
                      e.time_range.end - e.time_range.start) for e in dev]
        else:  # a torch without the link on device events: the kernels each CPU op launched
            items = [([k.name] + _chain(e, fwd), k.duration) for e in cpu.values()
                     for k in e.kernels]
        busy = _union((e.time_range.start, e.time_range.end) for e in dev)
        return items, busy
    by_thread: dict = {}
    for e in events:
        if e.device_type == DeviceType.CPU:
            by_thread.setdefault(e.thread, []).append(e)
    if not by_thread:
        return [], 0.0
    main = max(by_thread.values(),
               key=lambda evs: sum(e.cpu_time_total for e in evs if e.cpu_parent is None))
    items = [(_chain(e, fwd), e.self_cpu_time_total) for e in main]
    busy = _union((e.time_range.start, e.time_range.end) for e in main if e.cpu_parent is None)
    return items, busy


# ---------------------------------------------------------------------------- the bench
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("layout", help="a layout file, e.g. layouts/jamba.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, right after LAYOUT (model.d_model=1024 ...)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps first (compilation, autotuning; default 3)")
    parser.add_argument("--batch", type=int, default=None, help="default: train.batch_size")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the task's seq_len")
    parser.add_argument("--vocab", type=int, default=None,
                        help="model.vocab_size (default: the layout's, 'auto' = the task's)")
    parser.add_argument("--device", default=None,
                        help="default: train.device (auto: cuda if any)")
    parser.add_argument("--compile", action="store_true", help="train.compile: torch.compile(model)")
    parser.add_argument("--profile", action="store_true",
                        help="where the step time goes (torch.profiler), by category")
    parser.add_argument("--profile-steps", type=int, default=3, help="profiled steps (default 3)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mem_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    except (ImportError, OSError):
        return None


def build(args) -> SimpleNamespace:
    """What ``run`` times, for ``args``: ``cfg``, ``model``, ``engine``, ``step`` (one training
    step, returning the engine's step record), ``batch``, ``seq_len``, ``device`` and
    ``compiled`` (whether the engine compiled the model)."""
    from ..api import build_model
    from ..config import load_config
    from ..errors import HybridSeqError
    from ..train.engine import LocalEngine, resolve_device
    from ..train.trainer import lm_loss

    for name, least in (("steps", 1), ("warmup", 0), ("batch", 1), ("seq_len", 1), ("vocab", 1),
                        ("profile_steps", 1)):
        v = getattr(args, name, None)
        if v is not None and v < least:
            raise HybridSeqError(f"bench train: --{name.replace('_', '-')} must be >= {least}, "
                                 f"got {v}")
    overrides = list(args.overrides or [])
    if args.vocab is not None:
        overrides.append(f"model.vocab_size={int(args.vocab)}")
    cfg = load_config(args.layout, overrides=overrides)
    device = resolve_device(args.device or cfg.train.device)
    batch = int(args.batch or cfg.train.batch_size)
    seq_len = int(args.seq_len or getattr(cfg.train.task, "seq_len", 256))
    torch.manual_seed(int(cfg.train.seed))
    model = build_model(cfg).to(device).train()
    total = int(args.warmup) + int(args.steps) + (int(args.profile_steps) if args.profile else 0)
    tc = {**cfg.train.to_dict(), "steps": max(1, total), "device": str(device)}
    if args.compile:
        tc["compile"] = True
    engine = LocalEngine(model, tc, cfg=model.cfg, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    vocab = int(model.vocab_size_unpadded)
    batches = [(torch.randint(0, vocab, (batch, seq_len), device=device, generator=gen),
                torch.randint(0, vocab, (batch, seq_len), device=device, generator=gen))
               for _ in range(2)]
    count = [0]

    def step() -> dict:
        inputs, targets = batches[count[0] % len(batches)]
        count[0] += 1
        out = engine.forward(inputs)
        loss = lm_loss(out.logits, targets)
        if getattr(out, "aux_loss", None) is not None:
            loss = loss + out.aux_loss
        engine.backward(loss)
        return engine.step()

    return SimpleNamespace(cfg=cfg, model=model, engine=engine, step=step, batch=batch,
                           seq_len=seq_len, device=device, compiled=bool(tc.get("compile")))


def run(args) -> list[dict]:
    from ..train.perf import peak_flops
    from .common import timing

    b = build(args)
    cfg, model, engine, step, batch, seq_len, device = (b.cfg, b.model, b.engine, b.step, b.batch,
                                                        b.seq_len, b.device)
    for _ in range(int(args.warmup)):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync_each = timing() == "sync"
    times = []
    t0 = last = time.perf_counter()
    for _ in range(int(args.steps)):
        step()
        if sync_each:
            _sync(device)
        now = time.perf_counter()
        times.append((now - last) * 1e3)
        last = now
    _sync(device)
    total_ms = (time.perf_counter() - t0) * 1e3
    step_ms = total_ms / max(1, int(args.steps))
    tokens_per_s = batch * seq_len / (step_ms / 1e3)
    flops = float(model.flops_per_token(seq_len))
    peak = peak_flops(device, engine.precision)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    rows = [{"what": "train step", "category": None, "layout": cfg.name, "device": str(device),
             "precision": engine.precision, "compile": b.compiled,
             "batch": batch, "seq_len": seq_len, "params": n_params, "step_ms": step_ms,
             "step_ms_median": statistics.median(times), "tokens_per_s": tokens_per_s,
             "TFLOPs": 3.0 * flops * tokens_per_s / 1e12,
             "mfu": (3.0 * flops * tokens_per_s / peak) if peak else None,
             "peak_mem_gib": _peak_mem_gib(device)}]
    if args.profile:
        rows += profile_rows(step, device, int(args.profile_steps))
    return rows


def profile_rows(step, device: torch.device, steps: int) -> list[dict]:
    """``steps`` more steps under torch.profiler, broken down by category (``breakdown``)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    steps = max(1, steps)
    _sync(device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        wall_us = (time.perf_counter() - t0) * 1e6
    items, busy = profile_items(prof, device)
    return breakdown(items, wall_us, busy, steps)


if __name__ == "__main__":  # python -m hybridseq.bench.train: the same as `hybridseq bench train`
    from .common import script_main

    script_main(add_arguments, run, __doc__)
