"""Where knowledge lives: analyses that read a model without changing it (causal tracing,
MLP specialisation, and where an unlearned model's knowledge can be patched back)."""

from __future__ import annotations

from .specialisation import (
    masked_pss,
    specialisation,
    specialisation_lines,
    specialisation_table,
)
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
    "masked_pss",
    "plot_dissection",
    "plot_fact",
    "plot_trace",
    "specialisation",
    "specialisation_lines",
    "specialisation_table",
    "subject_embedding_std",
    "trace_fact",
    "trace_facts",
]
