"""Where knowledge lives: analyses that read a model without changing it (causal tracing,
MLP specialisation, where an unlearned model's knowledge can be patched back, the direction
that tells reasoning from recall, and an atlas of what each MLP neuron reads and writes)."""

from __future__ import annotations

from .atlas import Atlas, AtlasConfig, build_atlas, plot_atlas
from .reasoning import (
    DEFAULT_ALPHAS,
    REASONING_KINDS,
    DirectionsConfig,
    DirectionsReport,
    Task,
    last_states,
    plot_directions,
    reasoning_directions,
    reasoning_tasks,
    recall_tasks,
    split_tasks,
    steered,
)
from .specialisation import (
    masked_pss,
    plot_specialisation,
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
    "DEFAULT_ALPHAS",
    "GROUPS",
    "REASONING_KINDS",
    "STATES",
    "Atlas",
    "AtlasConfig",
    "DirectionsConfig",
    "DirectionsReport",
    "Dissection",
    "FactTrace",
    "Task",
    "TraceConfig",
    "TraceReport",
    "build_atlas",
    "dissect",
    "last_states",
    "masked_pss",
    "plot_atlas",
    "plot_directions",
    "plot_dissection",
    "plot_fact",
    "plot_specialisation",
    "plot_trace",
    "reasoning_directions",
    "reasoning_tasks",
    "recall_tasks",
    "specialisation",
    "specialisation_lines",
    "specialisation_table",
    "split_tasks",
    "steered",
    "subject_embedding_std",
    "trace_fact",
    "trace_facts",
]
