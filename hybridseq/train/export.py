"""Export a training checkpoint to one model folder: ``model.safetensors`` + resolved ``config.yaml``
(+ the checkpoint's ``tokenizer.json``, when it has one).

    hybridseq export RUN_DIR_OR_CHECKPOINT OUT [--from-shards]
    from hybridseq.train.export import export;  export("runs/bm", "models/bm")
    model = hs.load_pretrained("models/bm")          # one process, any device

``RUN_DIR`` means its latest checkpoint (``RUN_DIR/checkpoints/latest``). Every checkpoint that
``hybridseq train`` or ``launch/train.py`` writes already holds the gathered weights
(``model.safetensors``; under ZeRO-3 the engine gathers the shards at each save). With
``--from-shards``, or when a checkpoint has only DeepSpeed's files (``ds/``), the weights are
rebuilt on one CPU process from the ZeRO partitions of the fp32 master weights
(``deepspeed.utils.zero_to_fp32``), whatever the stage and the number of ranks that wrote them
(not for expert-parallel runs, whose ranks hold different experts: use their model.safetensors).
The result is written with ``hs.save_pretrained`` (atomic; validated against the config).
"""
from __future__ import annotations

import os

from ..errors import HybridSeqError
from .checkpoint import DS_DIR, latest_checkpoint, resolve_checkpoint  # noqa: F401 (re-exported)

DS_TAG = "zero"


def state_dict_from_zero_shards(checkpoint: str) -> dict:
    """The fp32 weights of a DeepSpeed checkpoint (``checkpoint/ds``), merged on CPU from the ZeRO
    partitions of any stage. Keys are the model's ``state_dict`` keys."""
    ds_dir = os.path.join(checkpoint, DS_DIR)
    if not os.path.isdir(ds_dir):
        raise HybridSeqError(f"{checkpoint}: no DeepSpeed shards ({DS_DIR}/ folder)")
    if any(f.startswith("experts_rank") for f in os.listdir(checkpoint)):
        raise HybridSeqError(f"{checkpoint}: an expert-parallel run's shards cannot be merged by zero_to_fp32 "
                             "(each rank holds different experts); export its gathered model.safetensors "
                             "(leave out --from-shards)")
    from ..extras import require

    require("deepspeed", "merging ZeRO shards (--from-shards)")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from .deepspeed_engine import check_deepspeed_files

    check_deepspeed_files(ds_dir)  # DeepSpeed unpickles them: only plain data may pass

    sd = get_fp32_state_dict_from_zero_checkpoint(ds_dir, tag=DS_TAG)
    return {k: v.contiguous() for k, v in sd.items()}


def export(path: str, out: str, from_shards: bool = False) -> str:
    """Write ``out/model.safetensors`` + ``out/config.yaml`` from a run or checkpoint folder."""
    import torch

    from ..api import load_pretrained, save_pretrained
    from ..config import load_config
    from ..model import HybridLM

    ck = resolve_checkpoint(path)
    if os.path.abspath(out) == os.path.abspath(ck):
        raise HybridSeqError("export: OUT must differ from the checkpoint folder")
    has_weights = os.path.isfile(os.path.join(ck, "model.safetensors"))
    if has_weights and not from_shards:
        model = load_pretrained(ck)
    else:
        cfg = load_config(os.path.join(ck, "config.yaml"))
        model = HybridLM(cfg)
        state = state_dict_from_zero_shards(ck)
        own = model.state_dict()
        missing = sorted(set(own) - set(state))
        # non-parameter entries (persistent buffers) are not in the optimizer shards
        buffers = {k for k, _ in model.named_buffers()}
        if [k for k in missing if k not in buffers]:
            raise HybridSeqError(f"{ck}: the ZeRO shards miss {missing[:3]}")
        with torch.no_grad():
            model.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in state.items() if k in own}},
                                  strict=True)
        tok = os.path.join(ck, "tokenizer.json")  # load_pretrained keeps it; here it is read by hand
        if os.path.isfile(tok):
            with open(tok, "rb") as fh:
                model.tokenizer_json = fh.read()
    save_pretrained(model, None, out)
    return out


def add_arguments(parser) -> None:
    parser.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT")
    parser.add_argument("out", metavar="OUT", help="folder to write model.safetensors + config.yaml into")
    parser.add_argument("--from-shards", action="store_true",
                        help="rebuild the weights from the DeepSpeed ZeRO shards (fp32 master weights)")


def run(args) -> int:
    out = export(args.path, args.out, from_shards=args.from_shards)
    print(f"exported {resolve_checkpoint(args.path)} -> {out} (load with hs.load_pretrained({out!r}))")
    return 0


if __name__ == "__main__":
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m hybridseq.train.export", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    try:
        sys.exit(run(parser.parse_args()))
    except HybridSeqError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
