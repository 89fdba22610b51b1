"""Adaptation: fine-tuning a loaded model (full, restricted to some parameters, LoRA, DoRA),
each fine-tune a :class:`~engramlab.WeightDelta` like an edit."""

from __future__ import annotations

from .finetune import MODES, FinetuneConfig, FinetuneResult, finetune, trainable_names
from .survive import SurvivalResult, overlap, survive

__all__ = ["MODES", "FinetuneConfig", "FinetuneResult", "SurvivalResult", "finetune", "overlap",
           "survive", "trainable_names"]
