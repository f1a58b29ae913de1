"""The typed form of a layout file: ``HybridConfig`` with its ``model`` and ``train`` sections
(the block specs are the kinds' own, ``hybridseq.blocks``; the task specs are the tasks',
``hybridseq.data.specs``).

A ``HybridConfig`` is what ``load_config`` returns: every section complete (defaults filled in),
checked, interpolations resolved, the layout parsed into ``stack`` and ``stage_starts``. It reads
by attribute (``cfg.model.d_model``, ``cfg.blocks.E.top_k``) and by key (``cfg["train"]["lr"]``),
and ``to_dict()`` gives the YAML form (what ``save_config`` writes and ``load_config`` reads back
to an equal config).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ..blocks import KINDS, BlockSpec
from ..data.specs import TaskSpec
from ..spec import Spec, describe, did_you_mean, fail, option

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass(eq=False)
class ModelSpec(Spec):
    d_model: int = option(64, ge=1)
    vocab_size: int | str = "auto"     # an int, or "auto": the task's vocabulary (bytes: 256)
    tie_embeddings: bool = True
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = option(1e-5, gt=0)
    init_std: float = option(0.02, gt=0)
    rescale_residual: bool = True      # output projections scaled by 1/sqrt(n_sublayers) at init
    pad_vocab_multiple: int = option(1, ge=1)  # round vocab_size up (64 helps tensor cores)
    checkpointing: list[str] = option([])      # block kinds whose sublayers recompute in backward
    # constant factors of some checkpoint families (Granite): the embedding output is multiplied
    # by embedding_multiplier, every sublayer's update by residual_multiplier before it is added,
    # and the logits are divided by logits_scaling
    embedding_multiplier: float = option(1.0, gt=0)
    residual_multiplier: float = option(1.0, gt=0)
    logits_scaling: float = option(1.0, gt=0)

    # keys that do not change what the weights mean: left out of ``config_hash``
    hash_exclude: ClassVar[tuple] = ("init_std", "rescale_residual", "checkpointing")
    # keys left out of ``config_hash`` while they hold these defaults
    hash_optional: ClassVar[dict] = {"embedding_multiplier": 1.0, "residual_multiplier": 1.0,
                                     "logits_scaling": 1.0}

    def check(self, *, file=None, key: str = "model", **context) -> None:
        vs = self.vocab_size
        if isinstance(vs, str) and vs != "auto":
            fail(file, f"{key}.vocab_size", f"{describe(vs)} is not allowed", "an integer >= 2 or 'auto'")
        if isinstance(vs, int) and vs < 2:
            fail(file, f"{key}.vocab_size", f"{vs} is too small", "an integer >= 2 or 'auto'")
        for i, kind in enumerate(self.checkpointing):
            if kind not in KINDS:
                suggestion = did_you_mean(str(kind), KINDS)
                fail(file, f"{key}.checkpointing[{i}]", f"unknown block kind {describe(kind)}",
                     f"did you mean '{suggestion}'?" if suggestion else "one of: " + ", ".join(KINDS))

    def padded_vocab(self, vocab_size: int | None = None) -> int:
        """``vocab_size`` (default: this section's, which must be an int) rounded up to
        ``pad_vocab_multiple``."""
        v = self.vocab_size if vocab_size is None else vocab_size
        return -(-int(v) // self.pad_vocab_multiple) * self.pad_vocab_multiple


@dataclass(eq=False)
class TrainSpec(Spec):
    task: Any = "selective_copy"       # checked into a TaskSpec by the loader
    steps: int = option(300, ge=1)
    batch_size: int = option(16, ge=1)
    grad_accum: int = option(1, ge=1)
    lr: float = option(1e-3, gt=0)
    min_lr_ratio: float = option(0.1, range=(0, 1))
    warmup_steps: int | None = option(None, ge=0)  # None: min(100, steps // 10)
    weight_decay: float = option(0.1, ge=0)
    betas: list[float] = option([0.9, 0.95])
    grad_clip: float = option(1.0, ge=0)
    eval_every: int = option(100, ge=0)
    eval_batches: int = option(4, ge=1)
    log_every: int = option(10, ge=1)
    save_every: int = option(0, ge=0)  # 0: only at the end
    keep_last: int = option(2, ge=0)
    out_dir: str | None = None         # None: runs/<name>-<YYYYmmdd-HHMMSS>
    seed: int = 0
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False
    tensorboard: bool = False          # also write TensorBoard scalars to <out_dir>/tensorboard
    on_nan: Literal["stop", "skip"] = "stop"   # a non-finite loss or gradient: stop, or skip the update
    nan_skip_limit: int = option(10, ge=1)     # on_nan: skip: stop after this many skips in a row

    def check(self, *, file=None, key: str = "train", **context) -> None:
        betas = self.betas
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                      and 0 <= b < 1 for b in betas):
            fail(file, f"{key}.betas", f"{describe(list(betas))} is not allowed",
                 "two numbers in [0, 1), like [0.9, 0.95]")
        self.betas = [float(b) for b in betas]
        if not _DEVICE.match(self.device):
            fail(file, f"{key}.device", f"{describe(self.device)} is not allowed", "auto, cpu, mps, cuda or cuda:N")
        if self.out_dir is not None and not self.out_dir.strip():
            fail(file, f"{key}.out_dir", "empty path", "a folder, or null for runs/<name>-<time>")


def _plain(value):
    """Pass-through sections (OmegaConf nodes) as plain containers."""
    if hasattr(value, "_metadata"):  # an OmegaConf container
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    return value


class Blocks(dict):
    """symbol -> block spec; also by attribute (``cfg.blocks.M``)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass
class HybridConfig:
    """A loaded, checked layout (module docstring)."""

    name: str
    model: ModelSpec
    blocks: Blocks
    layout: Any
    train: TrainSpec
    stack: list[str]
    stage_starts: list[int]
    description: str | None = None
    deepspeed: Any = None
    compare: Any = field(default=None)
    has_compare: bool = field(default=False, repr=False)
    source: str | None = field(default=None, repr=False, compare=False)  # the file it came from

    # --- reading -------------------------------------------------------------------------------
    @property
    def task(self) -> TaskSpec:
        return self.train.task

    def layers(self) -> list[tuple[str, BlockSpec]]:
        """(symbol, spec) per sublayer, in order."""
        return [(s, self.blocks[s]) for s in self.stack]

    @property
    def kinds(self) -> list[str]:
        """The block kind of each sublayer."""
        return [self.blocks[s].kind for s in self.stack]

    def to_dict(self) -> dict:
        out = {"name": self.name, "description": self.description, "model": self.model.to_dict(),
               "blocks": {s: spec.to_dict() for s, spec in self.blocks.items()},
               "layout": _plain(self.layout), "train": self.train.to_dict(),
               "deepspeed": _plain(self.deepspeed)}
        if self.has_compare:
            out["compare"] = _plain(self.compare)
        out["stack"] = list(self.stack)
        out["stage_starts"] = list(self.stage_starts)
        return out

    def __getitem__(self, key: str):
        if key == "compare" and not self.has_compare:
            raise KeyError(key)
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default=None):
        try:
            return self[key]
        except KeyError:
            return default

    def keys(self):
        keys = ["name", "description", "model", "blocks", "layout", "train", "deepspeed"]
        return keys + (["compare"] if self.has_compare else []) + ["stack", "stage_starts"]

    def __contains__(self, key) -> bool:
        return key in self.keys()

    def items(self):
        return [(k, self[k]) for k in self.keys()]

    # --- changing ------------------------------------------------------------------------------
    def with_vocab(self, vocab_size: int) -> "HybridConfig":
        """A copy whose ``model.vocab_size`` is the int ``vocab_size``."""
        from dataclasses import replace

        return replace(self, model=self.model.replace(vocab_size=int(vocab_size)))


__all__ = ["Blocks", "HybridConfig", "ModelSpec", "TrainSpec"]
