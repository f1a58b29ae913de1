"""Training: the loop (``trainer``), its single-process engine (``engine``), AdamW groups
(``optim``), warmup+cosine (``schedule``), atomic checkpoints (``checkpoint``), logs (``metrics``),
the closed-form accounting (``accounting``, ``plan``). The loop's modules load on first use, so
``hybridseq show`` and ``plan`` do not import torch."""


def __getattr__(name):
    if name in ("Trainer", "TrainingInterrupted", "train"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Trainer", "TrainingInterrupted", "train"]
