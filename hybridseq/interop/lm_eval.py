"""An lm-evaluation-harness model for hybridseq checkpoints, registered as ``hybridseq``.

    import hybridseq.interop.lm_eval                      # registers the model with lm_eval
    lm_eval.simple_evaluate(model="hybridseq", model_args="pretrained=models/jamba", tasks=[...])
    hybridseq eval models/jamba --tasks hellaswag,lambada_openai [--limit N] [--device cuda]

``pretrained``: a hybridseq model folder, checkpoint, or run folder (its latest checkpoint). The
tokenizer is the folder's transformers tokenizer files (``tokenizer.json`` ...; ``import-hf``
copies them), or ``tokenizer=<folder or hub-less local path>``; a model trained on the byte
tokenizer (``train.task: text`` with ``tokenizer: bytes``) and no tokenizer files reads UTF-8
bytes. The three request types:

- ``loglikelihood(context, continuation)``: the continuation's summed log-probability and whether
  greedy decoding would produce it; the context is left-truncated to ``max_length`` tokens with
  the continuation, an empty context is the tokenizer's BOS (else EOS) token;
- ``loglikelihood_rolling(text)``: the text's log-probability in windows of ``max_length``
  (lm_eval's rolling windows: every token scored once, each with as much context as fits);
- ``generate_until(context, {until, max_gen_toks, do_sample, temperature})``: hybridseq's cached
  generation (greedy unless ``do_sample``), stopped at the first ``until`` string or EOS.

Padded vocabulary rows (``model.pad_vocab_multiple``) are left out of every softmax.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..errors import HybridSeqError
from .hf_io import _unshadow_kernels

_unshadow_kernels()  # lm_eval imports transformers, which imports the ``kernels`` distribution
try:  # lm_eval is optional: without it this module still imports (and registers nothing)
    from lm_eval.api.model import LM as _LMBase
    from lm_eval.api.registry import register_model as _register

    HAVE_LM_EVAL = True
except ImportError:  # pragma: no cover - exercised where lm_eval is missing
    _LMBase = object
    HAVE_LM_EVAL = False

    def _register(*names):
        return lambda cls: cls


class _Bytes:
    """UTF-8 bytes as token ids (hybridseq's ``bytes`` text tokenizer)."""

    bos_token_id = None
    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


class _HFTokenizer:
    def __init__(self, folder: str):
        from .hf_io import import_transformers

        tok = import_transformers().AutoTokenizer.from_pretrained(folder)
        self.tok = tok
        self.bos_token_id = tok.bos_token_id
        self.eos_token_id = tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(folder: str, cfg, tokenizer: str | None = None):
    """The tokenizer of a checkpoint folder (module docstring)."""
    from .hf_io import TOKENIZER_FILES

    path = tokenizer or folder
    if tokenizer == "bytes":
        return _Bytes()
    if any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES[:5]):
        return _HFTokenizer(path)
    try:
        task = cfg.train.task
        if task.name == "text" and getattr(task, "tokenizer", "bytes") == "bytes":
            return _Bytes()
    except AttributeError:
        pass
    raise HybridSeqError(f"{folder}: no tokenizer files (tokenizer.json ...) and not a byte-level model; "
                         "give tokenizer=<folder with tokenizer files>")


@_register("hybridseq")
class HybridSeqLM(_LMBase):
    """lm_eval's ``LM`` over a hybridseq checkpoint (module docstring). Arguments (lm_eval's
    ``model_args``): ``pretrained`` (required), ``device`` (default cpu), ``batch_size`` (rows
    per forward for loglikelihood, default 1), ``max_length`` (default 2048), ``dtype`` (auto,
    float32, bfloat16, float16), ``tokenizer`` (a folder, or ``bytes``)."""

    def __init__(self, pretrained: str | None = None, device: str = "cpu", batch_size: int | str = 1,
                 max_length: int | str = 2048, dtype: str = "auto", tokenizer: str | None = None,
                 model=None, **kwargs):
        if not HAVE_LM_EVAL:
            raise HybridSeqError("this needs lm-evaluation-harness: pip install lm-eval")
        super().__init__()
        from ..api import load_pretrained
        from ..train.checkpoint import resolve_checkpoint
        from .hf_io import DTYPES

        if model is None:
            if not pretrained:
                raise HybridSeqError("hybridseq lm_eval model: give pretrained=<model folder>")
            folder = resolve_checkpoint(str(pretrained))
            model = load_pretrained(folder)
        else:
            folder = pretrained
        if dtype not in ("auto", None):
            if dtype not in DTYPES:
                raise HybridSeqError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
            model = model.to(DTYPES[dtype])
        self.model = model.to(device).eval()
        self._device = torch.device(device)
        self.tokenizer = load_tokenizer(str(folder), model.cfg, tokenizer) if folder or tokenizer else _Bytes()
        self.batch_size = max(1, int(str(batch_size).split(":")[0]) if str(batch_size) != "auto" else 1)
        self.max_length = int(max_length)
        self.vocab = int(model.vocab_size_unpadded)

    # --- tokens --------------------------------------------------------------------------------
    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        for t in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id):
            if t is not None:
                return int(t)
        return 0

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation, a trailing space of the context moved to the
        continuation (as lm_eval's own models encode them)."""
        n_space = len(context) - len(context.rstrip())
        if n_space:
            continuation = context[-n_space:] + continuation
            context = context[:-n_space]
        whole = self.tokenizer.encode(context + continuation)
        ctx = self.tokenizer.encode(context)
        return ctx, whole[len(ctx):]

    # --- scoring -------------------------------------------------------------------------------
    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), greedy) per (context ids, continuation ids)."""
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        rows = []
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                out[i] = (0.0, True)
                continue
            ctx = ctx or [self.prefix_token_id]
            ids = (ctx + cont)[-(self.max_length + 1):][:-1]
            rows.append((i, ids, cont))
        rows.sort(key=lambda r: -len(r[1]))
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            width = max(len(r[1]) for r in chunk)
            batch = torch.zeros(len(chunk), width, dtype=torch.long)
            for j, (_, ids, _) in enumerate(chunk):
                batch[j, :len(ids)] = torch.tensor(ids)  # right padding: causal, so it changes nothing before it
            logits = self.model(batch.to(self._device)).logits[..., :self.vocab].float()
            logp = F.log_softmax(logits, dim=-1)
            for j, (i, ids, cont) in enumerate(chunk):
                n = len(cont)
                lp = logp[j, len(ids) - n:len(ids)]
                target = torch.tensor(cont, device=lp.device)
                total = lp.gather(-1, target[:, None]).sum().item()
                greedy = bool((lp.argmax(-1) == target).all().item())
                out[i] = (total, greedy)
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        pairs = [self._pair(*req.args) for req in requests]
        return self._score(pairs)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for req in requests:
            (text,) = req.args[:1]
            tokens = self.tokenizer.encode(text)
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            out.append(sum(lp for lp, _ in self._score([(list(a), list(b)) for a, b in windows])))
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False):
        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0)) if sample else 0.0
            ids = self.tokenizer.encode(context) or [self.prefix_token_id]
            ids = ids[-max(1, self.max_length - max_new):]
            prompt = torch.tensor([ids], dtype=torch.long, device=self._device)
            eos = self.eot_token_id
            gen = self.model.generate(prompt, max_new_tokens=max_new, temperature=temperature or 0.0,
                                      top_k=kwargs.get("top_k"), top_p=kwargs.get("top_p"),
                                      eos_token_id=None if eos is None else int(eos))
            new = gen[0, len(ids):].tolist()
            if eos is not None and int(eos) in new:
                new = new[:new.index(int(eos))]
            text = self.tokenizer.decode(new)
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            out.append(text)
        return out


# --- ``hybridseq eval`` (hybridseq.cli's plugin interface) ------------------------------------
def add_arguments(p) -> None:
    p.add_argument("run", help="a hybridseq model folder, checkpoint, or run folder")
    p.add_argument("--tasks", required=True, help="lm_eval task names, comma-separated")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if < 1)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--tokenizer", default=None, help="a folder with tokenizer files, or 'bytes'")
    p.add_argument("--include-path", default=None, help="a folder of extra lm_eval task YAML files")
    p.add_argument("--output", default=None, help="write the results JSON here")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def run(args) -> int:
    if not HAVE_LM_EVAL:
        raise HybridSeqError("hybridseq eval needs lm-evaluation-harness: pip install lm-eval")
    import json

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise HybridSeqError("hybridseq eval: --tasks is empty")
    lm = HybridSeqLM(pretrained=args.run, device=args.device, batch_size=args.batch_size,
                     max_length=args.max_length, dtype=args.dtype, tokenizer=args.tokenizer)
    manager = TaskManager(include_path=args.include_path) if args.include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise HybridSeqError(f"hybridseq eval: unknown lm_eval task(s): {', '.join(unknown)}")
    res = simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                          task_manager=manager, log_samples=False, bootstrap_iters=0)
    results = res["results"] if res else {}
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2, default=str)
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    else:
        for task, metrics in results.items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                              if isinstance(v, float) and "stderr" not in k)
            print(f"{task}: {shown}")
    return 0


__all__ = ["HAVE_LM_EVAL", "HybridSeqLM", "load_tokenizer"]
