"""Soft prompts: knowledge steered by a learned prompt instead of edited weights.

:mod:`.tasks` holds the labelled tasks (built from ParaRel × T-REx, or a user's JSONL),
:mod:`.soft` prompt tuning and its PEFT folder, :mod:`.prefix` prefix tuning (keys and values
in every block) and its folder, :mod:`.nearest` the reading of a prompt as vocabulary tokens,
:mod:`.progress` the progress bar every optimisation here reports to.
"""

from .nearest import nearest_ids, nearest_tokens
from .prefix import Prefix, PrefixConfig, load_prompt, tune_prefix
from .progress import step_progress
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

__all__ = ["DPConfig", "LabelRow", "LabelTask", "Prefix", "PrefixConfig", "SoftPrompt",
           "TuneConfig", "accuracy", "label_ids", "label_logits", "last_logits", "load_label_task",
           "load_prompt", "nearest_ids", "nearest_tokens", "step_progress", "tune", "tune_prefix"]
