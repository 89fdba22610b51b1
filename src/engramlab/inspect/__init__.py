"""Where knowledge lives: analyses that read a model without changing it (causal tracing,
and where an unlearned model's knowledge can be patched back)."""

from __future__ import annotations

from .tracing import (
    GROUPS,
    STATES,
    FactTrace,
    TraceConfig,
    TraceReport,
    plot_fact,
    plot_trace,
    subject_embedding_std,
    trace_fact,
    trace_facts,
)
from .unlearning import Dissection, dissect, plot_dissection

__all__ = [
    "GROUPS",
    "STATES",
    "Dissection",
    "FactTrace",
    "TraceConfig",
    "TraceReport",
    "dissect",
    "plot_dissection",
    "plot_fact",
    "plot_trace",
    "subject_embedding_std",
    "trace_fact",
    "trace_facts",
]
