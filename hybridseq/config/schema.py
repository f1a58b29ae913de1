"""Defaults for every key of the DSL: model, block kinds, train, tasks.

These dicts ARE the schema: a key that is not here is unknown (an error, with a "did you mean").
Values of ``None`` mean "derived" (documented per key). Types are checked against the default's
type, or against ``TYPES`` where the default is None or several types are allowed.
"""
from __future__ import annotations

MODEL_DEFAULTS: dict = {
    "d_model": 64,
    "vocab_size": "auto",          # int, or "auto": the task's vocabulary (bytes: 256)
    "tie_embeddings": True,
    "norm": "rmsnorm",             # rmsnorm | layernorm
    "norm_eps": 1e-5,
    "init_std": 0.02,
    "rescale_residual": True,      # output projections scaled by 1/sqrt(n_sublayers) at init (one per residual branch)
    "pad_vocab_multiple": 1,       # round vocab_size up to a multiple (64 helps tensor cores)
    "checkpointing": [],           # block kinds whose sublayers use activation checkpointing
}

BLOCK_DEFAULTS: dict[str, dict] = {
    "mamba": {
        "d_state": 16,
        "d_conv": 4,
        "expand": 2,
        "dt_rank": "auto",         # ceil(d_model / 16)
        "dt_min": 0.001,
        "dt_max": 0.1,
        "dt_init": "random",       # random | constant
        "dt_scale": 1.0,
        "dt_init_floor": 1e-4,
        "conv_bias": True,
        "bias": False,
        "impl": "auto",            # auto | triton | torch
    },
    "attention": {
        "n_heads": 4,
        "n_kv_heads": None,        # None: = n_heads (MHA); fewer: GQA
        "head_dim": None,          # None: d_model // n_heads
        "rope_theta": 10000.0,     # None: no positional encoding (Jamba)
        "window": None,            # None: full causal; N: sliding window of N tokens (incl. self)
        "qk_norm": False,
        "bias": False,
        "impl": "auto",            # auto | flash_attn | sdpa | flex | torch
    },
    "moe": {
        "n_experts": 8,
        "top_k": 2,
        "d_ff": None,              # None: like mlp
        "activation": "swiglu",    # swiglu | gelu
        "router": "softmax",       # softmax | sigmoid | sinkhorn
        "renormalize": True,       # renormalise the top-k weights to sum to 1 (softmax router)
        "capacity_factor": None,   # None: dropless; a number: capacity = cf * tokens * top_k / E
        "aux_loss_coef": 0.01,
        "z_loss_coef": 0.001,
        "bias_update_rate": 0.001, # sigmoid router: aux-loss-free balancing bias step
        "shared_experts": 0,
        "shared_d_ff": None,       # None: = d_ff
        "ep_size": 1,              # expert-parallel group size
        "impl": "auto",            # auto | grouped | megablocks | loop
    },
    "mlp": {
        "d_ff": None,              # None: swiglu -> round_up(8/3 * d_model, 8); gelu -> 4 * d_model
        "activation": "swiglu",
        "bias": False,
    },
}

# Keys whose default is None or that accept several types: name -> tuple of allowed types.
TYPES: dict[str, tuple] = {
    "model.vocab_size": (int, str),
    "mamba.dt_rank": (int, str),
    "attention.n_kv_heads": (int, type(None)),
    "attention.head_dim": (int, type(None)),
    "attention.rope_theta": (float, int, type(None)),
    "attention.window": (int, type(None)),
    "moe.d_ff": (int, type(None)),
    "moe.capacity_factor": (float, int, type(None)),
    "moe.shared_d_ff": (int, type(None)),
    "mlp.d_ff": (int, type(None)),
    "train.warmup_steps": (int, type(None)),
    "train.out_dir": (str, type(None)),
    "task.text.path": (str, type(None)),   # task keys are named task.<task name>.<key>
}

CHOICES: dict[str, tuple] = {
    "model.norm": ("rmsnorm", "layernorm"),
    "mamba.impl": ("auto", "triton", "torch"),
    "mamba.dt_init": ("random", "constant"),
    "attention.impl": ("auto", "flash_attn", "sdpa", "flex", "torch"),
    "moe.activation": ("swiglu", "gelu"),
    "moe.router": ("softmax", "sigmoid", "sinkhorn"),
    "moe.impl": ("auto", "grouped", "megablocks", "loop"),
    "mlp.activation": ("swiglu", "gelu"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
}

# Megatron-LM hybrid pattern characters -> (symbol, kind) with default specs.
MEGATRON_SYMBOLS: dict[str, tuple[str, str]] = {
    "M": ("M", "mamba"),
    "*": ("A", "attention"),
    "-": ("F", "mlp"),
    "E": ("E", "moe"),
}

TASK_DEFAULTS: dict[str, dict] = {
    # Mamba paper, selective copying: n_data data tokens (from `vocab` symbols) scattered among
    # noise in the first seq_len positions, then n_data markers after which they are recalled.
    "selective_copy": {"seq_len": 256, "n_data": 16, "vocab": 16},
    # Mamba paper, induction heads: a random sequence over `vocab` symbols containing a special
    # token followed by a key; at the end the special token again: predict the key.
    "induction_heads": {"seq_len": 256, "vocab": 16},
    # Multi-query associative recall (Zoology): n_pairs key-value pairs, then queries.
    "mqar": {"seq_len": 128, "n_pairs": 8, "vocab": 256},
    # Language modelling on a local text file/folder (bytes) or memmap .bin token file.
    "text": {"path": None, "seq_len": 256, "tokenizer": "bytes", "dtype": "uint16", "val_fraction": 0.05},
}

TRAIN_DEFAULTS: dict = {
    "task": "selective_copy",      # a name, or {name: ..., <task keys>}
    "steps": 300,
    "batch_size": 16,
    "grad_accum": 1,
    "lr": 1e-3,
    "min_lr_ratio": 0.1,
    "warmup_steps": None,          # None: min(100, steps // 10)
    "weight_decay": 0.1,
    "betas": [0.9, 0.95],
    "grad_clip": 1.0,
    "eval_every": 100,
    "eval_batches": 4,
    "log_every": 10,
    "save_every": 0,               # 0: only at the end
    "keep_last": 2,
    "out_dir": None,               # None: runs/<name>-<YYYYmmdd-HHMMSS>
    "seed": 0,
    "device": "auto",              # auto | cpu | cuda | cuda:N
    "precision": "auto",           # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    "compile": False,
    "tensorboard": False,          # also write TensorBoard scalars to <out_dir>/tensorboard
}

# Top-level keys of a layout file. `stack` and `stage_starts` are computed from `layout` (given
# values are ignored, so a saved config loads again); `deepspeed` and `compare` pass through.
TOP_LEVEL_KEYS: tuple = (
    "name", "description", "model", "blocks", "layout", "train", "deepspeed", "compare",
    "stack", "stage_starts",
)

# Keys that do not change what the weights mean (initialisation, training-only coefficients,
# parallelism, kernel choice): left out of `config_hash`, which identifies a model.
HASH_EXCLUDE: dict[str, tuple] = {
    "model": ("init_std", "rescale_residual", "checkpointing"),
    "mamba": ("impl", "dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor"),
    "attention": ("impl",),
    "moe": ("impl", "aux_loss_coef", "z_loss_coef", "bias_update_rate", "ep_size"),
    "mlp": (),
}
