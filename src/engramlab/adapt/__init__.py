"""Adaptation: fine-tuning a loaded model (full, restricted to some parameters, LoRA, DoRA),
each fine-tune a :class:`~engramlab.WeightDelta` like an edit."""

from __future__ import annotations

from .adapters import load_adapter
from .finetune import (
    MODES,
    PRECISIONS,
    FinetuneConfig,
    FinetuneResult,
    finetune,
    trainable_names,
    training_rows,
)
from .survive import (
    EditedScores,
    SurvivalResult,
    downstream_accuracy,
    fact_rows,
    overlap,
    score_edited,
    survive,
)

__all__ = ["MODES", "PRECISIONS", "EditedScores", "FinetuneConfig", "FinetuneResult",
           "SurvivalResult", "downstream_accuracy", "fact_rows", "finetune", "load_adapter",
           "overlap", "score_edited", "survive", "trainable_names", "training_rows"]
