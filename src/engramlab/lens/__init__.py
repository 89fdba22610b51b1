"""Reading the layers: what each layer already predicts (logit lens, tuned lens, shortcuts)."""

from __future__ import annotations

from .base import Lens
from .early_exit import ExitReadings, exit_readings, saved_at, threshold_curve
from .evaluate import LensReport, evaluate_lenses, plot_report
from .learned_exit import ExitData, ExitPolicy, exit_data, policy_curve, train_policy
from .logit import LogitLens
from .shortcut import OneJump, RegressionMoments, Shortcut
from .show import LayerView, layer_view, plot_view
from .states import LayerStates, corpus_batches, layer_states, lens_points
from .train import KINDS, fit_lens
from .tuned import TunedLens, train_tuned

__all__ = [
    "KINDS",
    "ExitData",
    "ExitPolicy",
    "ExitReadings",
    "LayerStates",
    "LayerView",
    "Lens",
    "LensReport",
    "LogitLens",
    "OneJump",
    "RegressionMoments",
    "Shortcut",
    "TunedLens",
    "corpus_batches",
    "evaluate_lenses",
    "exit_data",
    "exit_readings",
    "fit_lens",
    "layer_states",
    "layer_view",
    "lens_points",
    "plot_report",
    "plot_view",
    "policy_curve",
    "saved_at",
    "threshold_curve",
    "train_policy",
    "train_tuned",
]
