"""Soft prompts: knowledge steered by a learned prompt instead of edited weights.

:mod:`.tasks` holds the labelled tasks (built from ParaRel × T-REx, or a user's JSONL),
:mod:`.soft` prompt tuning and its PEFT folder, :mod:`.nearest` the reading of a prompt as
vocabulary tokens.
"""

from .nearest import nearest_ids, nearest_tokens
from .soft import (
           DPConfig,
           SoftPrompt,
           TuneConfig,
           accuracy,
           label_ids,
           label_logits,
           last_logits,
           tune,
)
from .tasks import LabelRow, LabelTask, load_label_task

__all__ = ["DPConfig", "LabelRow", "LabelTask", "SoftPrompt", "TuneConfig", "accuracy", "label_ids",
           "label_logits", "last_logits", "load_label_task", "nearest_ids", "nearest_tokens",
           "tune"]
