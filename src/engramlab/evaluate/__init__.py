"""Metrics and reports: CounterFact / zsRE / EasyEdit scores, fluency, batched target scoring."""

from __future__ import annotations

from .counterfact import (
    CaseScores,
    case_scores,
    edit_scores,
    fill_relation_answers,
    summarize,
)
from .fluency import fluency, ngram_entropy
from .scoring import TargetScore, score_targets

__all__ = ["CaseScores", "TargetScore", "case_scores", "edit_scores", "fill_relation_answers",
           "fluency", "ngram_entropy", "score_targets", "summarize"]
