"""``hybridseq plan``: memory per GPU of a DeepSpeed run, before renting the GPUs.

    hybridseq plan LAYOUT --gpus N --zero S [--ep E] [--micro-batch B] [--seq-len L]
                   [--precision bf16|fp32] [--offload] [--gpu-mem GiB] [key=value ...] [--json]

Notation: ``P`` parameters of the model (``hybridseq show``'s total, tied embeddings once),
split into ``P_e`` routed-expert weights (``w_in``/``w_out`` of every MoE layer) and
``P_d = P - P_e`` (everything else, replicated on every rank); ``G`` GPUs (data-parallel world),
``E`` the expert-parallel size (each rank holds ``P_e / E`` expert weights; they are
data-parallel over ``G / E`` ranks, the expert-data-parallel group).

Bytes per parameter: hybridseq trains bf16 through DeepSpeed's ``torch_autocast`` mode (see
``deepspeed_engine.py``: DeepSpeed's native bf16 mode would cast the fp32-only Mamba parameters),
so weights and gradients are fp32 (``w = 4``, ``g = 4``; the weights *are* the fp32 master copy)
and AdamW keeps m and v (``o = 8``); ``precision`` (bf16 or fp32) changes only the activations.
(DeepSpeed's native bf16 would be 2 + 2 + 12: the same 16 bytes in total, split differently.)
Per GPU, with ``P_r = P_d + P_e / E`` the parameters a rank owns and ``D_r`` the size of the
group that shards them (``G`` for dense weights, ``G / E`` for experts), summed over both kinds:

    ZeRO-0 (plain data parallel):  w * P_r  +  g * P_r      +  o * P_r
    ZeRO-1 (optimizer sharded):    w * P_r  +  g * P_r      +  o * P_r / D_r
    ZeRO-2 (+ gradients sharded):  w * P_r  +  g * P_r / D_r +  o * P_r / D_r
    ZeRO-3 (+ weights sharded):    w * P_r / D_r + g * P_r / D_r + o * P_r / D_r

(the ZeRO paper's model). ``--offload`` moves the optimizer states to host memory (the
``zero3-offload`` config): ``o`` then counts in ``host_optimizer_gib``, not on the GPU.

Activations (training, one micro-batch of ``B`` sequences of ``L`` tokens, ``a = 2`` bytes per
saved element in bf16, 4 in fp32), saved elements per token and sublayer: ``2 d`` (the residual
input and the normed input) plus the block's own ``spec.activation_elements(d)`` (each kind
documents its count: e.g. mamba ``7 e d + r + 2 n``, attention ``2 h h_d + 2 h_kv h_d``, mlp
``3 f`` for swiglu, moe ``k (2 d + (n_in + 1) f) + E`` plus its shared experts), and once per
token for the LM head ``V`` (bf16 logits) + ``2 V`` (fp32 copy for the loss).

A sublayer whose kind is in ``model.checkpointing`` keeps only its input (``d``) and recomputes
the rest. The estimate leaves out the CUDA context (~0.5-1 GiB), the allocator's fragmentation,
communication buckets and temporary buffers: keep 10-20% headroom.
"""
from __future__ import annotations

import json

from ..errors import HybridSeqError

GIB = 1024 ** 3

BYTES = {  # (weights, gradients, optimizer states) bytes per parameter; see the module doc
    "bf16": (4, 4, 8),
    "fp32": (4, 4, 8),
}


def expert_params(cfg) -> int:
    """Routed-expert weights of the whole model (every expert of every sublayer)."""
    from .accounting import _typed

    c = _typed(cfg)
    return sum(spec.expert_params(c.model.d_model) for _, spec in c.layers())


def activation_elements_per_token(cfg) -> dict:
    """Saved activation elements per token: ``{"blocks": sum over sublayers, "head": LM head}``
    (the formula in the module docstring)."""
    from .accounting import _typed, resolve_vocab_size

    c = _typed(cfg)
    d = c.model.d_model
    checkpointed = set(c.model.checkpointing)
    total = 0
    for _, spec in c.layers():
        total += d if spec.kind in checkpointed else 2 * d + spec.activation_elements(d)
    return {"blocks": total, "head": 3 * resolve_vocab_size(c)}


def plan(cfg, *, gpus: int, zero: int, ep: int = 1, micro_batch: int | None = None,
         seq_len: int | None = None, precision: str = "bf16", offload: bool = False) -> dict:
    """Memory per GPU (bytes and GiB) of training ``cfg`` on ``gpus`` GPUs with ZeRO stage ``zero``
    and expert-parallel size ``ep``. Raises ``HybridSeqError`` for impossible settings."""
    from .accounting import _typed, account, train_seq_len

    if gpus < 1:
        raise HybridSeqError(f"--gpus must be >= 1, got {gpus}")
    if zero not in (0, 1, 2, 3):
        raise HybridSeqError(f"--zero must be 0, 1, 2 or 3, got {zero}")
    if precision not in BYTES:
        raise HybridSeqError(f"--precision must be one of {', '.join(BYTES)}, got {precision!r}")
    if ep < 1 or gpus % ep:
        raise HybridSeqError(f"--ep {ep} must divide --gpus {gpus}")
    if ep > 1 and zero == 3:
        raise HybridSeqError("--ep > 1 needs --zero 1 or 2 (DeepSpeed's expert parallelism does not run "
                             "under ZeRO-3; ZeRO-3 partitions the experts with the other weights)")
    cfg = _typed(cfg)
    B = int(micro_batch or cfg.train.batch_size)
    L = int(seq_len or train_seq_len(cfg))
    totals = account(cfg, seq_len=L)["totals"]
    P = int(totals["params"])
    P_e = expert_params(cfg)
    if ep > 1:
        bad = [s for s in set(cfg.stack) if cfg.blocks[s].expert_params(1)
               and cfg.blocks[s].n_experts % ep]
        if bad:
            raise HybridSeqError(f"--ep {ep} does not divide n_experts of block(s) {', '.join(sorted(bad))}")
    P_d = P - P_e
    w, g, o = BYTES[precision]
    groups = [(P_d, gpus), (P_e / ep, gpus // ep)]  # (params a rank owns, group that shards them)
    params_b = grads_b = optim_b = 0.0
    for n, dp in groups:
        params_b += w * n / (dp if zero >= 3 else 1)
        grads_b += g * n / (dp if zero >= 2 else 1)
        optim_b += o * n / (dp if zero >= 1 else 1)
    host_optim_b = 0.0
    if offload:
        host_optim_b, optim_b = optim_b, 0.0
    a = 2 if precision == "bf16" else 4
    per_tok = activation_elements_per_token(cfg)
    act_b = B * L * (a * per_tok["blocks"] + 2 * per_tok["head"])
    total_b = params_b + grads_b + optim_b + act_b
    return {
        "gpus": gpus, "zero": zero, "ep": ep, "micro_batch": B, "seq_len": L, "precision": precision,
        "offload": offload, "params": P, "expert_params": P_e, "dense_params": P_d,
        "params_gib": params_b / GIB, "grads_gib": grads_b / GIB, "optimizer_gib": optim_b / GIB,
        "activations_gib": act_b / GIB, "total_gib": total_b / GIB, "host_optimizer_gib": host_optim_b / GIB,
        "activation_elements_per_token": per_tok,
    }


def add_arguments(parser) -> None:
    parser.add_argument("items", nargs="+", metavar="LAYOUT [key=value ...]",
                        help="layout YAML file, then dotted overrides")
    parser.add_argument("--gpus", type=int, required=True, help="number of GPUs (data-parallel world size)")
    parser.add_argument("--zero", type=int, default=2, choices=(0, 1, 2, 3), help="ZeRO stage (default 2)")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size (ZeRO 1/2; default 1)")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="sequences per GPU per micro-step (default train.batch_size)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the task's)")
    parser.add_argument("--precision", default="bf16", choices=tuple(BYTES))
    parser.add_argument("--offload", action="store_true", help="optimizer states in host memory (zero3-offload)")
    parser.add_argument("--gpu-mem", type=float, default=None,
                        help="GiB per GPU: say whether the plan fits (e.g. 80 for H100, 141 for H200)")
    parser.add_argument("--json", action="store_true")


def run(args) -> int:
    from ..config import load_config

    layout, overrides = args.items[0], args.items[1:]
    cfg = load_config(layout, overrides=overrides)
    p = plan(cfg, gpus=args.gpus, zero=args.zero, ep=args.ep, micro_batch=args.micro_batch,
             seq_len=args.seq_len, precision=args.precision, offload=args.offload)
    if args.gpu_mem:
        p["gpu_mem_gib"] = float(args.gpu_mem)
        p["fits"] = p["total_gib"] <= 0.9 * float(args.gpu_mem)
    if args.json:
        print(json.dumps(p, indent=2))
        return 0
    from .accounting import human

    print(f"{cfg.get('name') or layout}: {human(p['params'])} parameters "
          f"({human(p['expert_params'])} in routed experts), {p['gpus']} GPU(s), ZeRO-{p['zero']}, "
          f"EP {p['ep']}, {p['precision']}, micro-batch {p['micro_batch']} x {p['seq_len']} tokens")
    rows = [("parameters", p["params_gib"]), ("gradients", p["grads_gib"]),
            ("optimizer states", p["optimizer_gib"]), ("activations", p["activations_gib"]),
            ("total per GPU", p["total_gib"])]
    for name, gib in rows:
        print(f"  {name:<17} {human(gib * GIB, 'B'):>12}")
    if p["offload"]:
        print(f"  {'host (offload)':<17} {human(p['host_optimizer_gib'] * GIB, 'B'):>12} optimizer states per rank "
              "in CPU memory")
    if "fits" in p:
        verdict = "fits" if p["fits"] else "does NOT fit"
        print(f"{verdict} in {p['gpu_mem_gib']:g} GiB with 10% headroom"
              + ("" if p["fits"] else ": raise --zero, add GPUs, lower --micro-batch, or checkpoint activations "
                 "(model.checkpointing=[mamba,moe,...])"))
    print("estimate: CUDA context, fragmentation and communication buffers not included (keep 10-20% headroom)")
    return 0
