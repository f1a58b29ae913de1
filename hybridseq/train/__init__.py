"""Training: the loop (``trainer``), its single-process engine (``engine``), AdamW groups
(``optim``), warmup+cosine (``schedule``), atomic checkpoints (``checkpoint``), logs (``metrics``)."""
from .trainer import Trainer, TrainingInterrupted, train

__all__ = ["Trainer", "TrainingInterrupted", "train"]
