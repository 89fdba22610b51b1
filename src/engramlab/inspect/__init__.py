"""Where knowledge lives: analyses that read a model without changing it (causal tracing)."""

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

__all__ = [
    "GROUPS",
    "STATES",
    "FactTrace",
    "TraceConfig",
    "TraceReport",
    "plot_fact",
    "plot_trace",
    "subject_embedding_std",
    "trace_fact",
    "trace_facts",
]
