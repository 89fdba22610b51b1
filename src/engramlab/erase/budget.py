"""The specificity budget every eraser is tuned against, and the three numbers it checks.

An eraser is only comparable to another at the same collateral cost, so all of them (concept
vectors' top_k × damping grid, the fine-tuning baselines' learning rate × step checkpoints)
choose the setting that lowers the concept's accuracy most while the control probes lose less
than ``max_control_drop``, the tuning half of the concept's near controls (the same kind of fact
about its neighbours) loses less than ``max_near_drop``, and perplexity on (part of) the neutral
text's tuning half rises less than ``max_perplexity_rise``: by default 10 points, 15 points and
10 %. The near controls are a group of their own because, pooled with the other concepts'
controls, losing every neighbouring capital would cost Paris only a few points of the pooled
budget. Their bar is 15 points, about one probe of a tuning half: 10 points would allow not a
single flipped answer (the measurements are in ``docs/erasure.md``).
``max_near_drop=None`` leaves them out.
:class:`BudgetSearch` is that choice, shared by both tuners: each scores its own settings with
it, and it records every trial and keeps the best one inside the budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..data.concepts import Concept, Probe
from ..delta import WeightDelta
from ..evaluate.erasure import EntryStates, accuracy, first_block, perplexity
from ..models.lm import LM

NEAR_DROP = 0.15  # near controls: at most one probe of an 8-11 probe tuning half


BUDGET_KEYS = ("max_control_drop", "max_perplexity_rise", "max_near_drop")


@dataclass(frozen=True)
class Budget:
    max_control_drop: float = 0.10
    max_perplexity_rise: float = 0.10
    max_near_drop: float | None = NEAR_DROP

    def allows(self, base_control: float, control: float, base_perplexity: float,
               perplexity: float) -> bool:
        """Controls lose *less than* ``max_control_drop`` and perplexity rises less than
        ``max_perplexity_rise``; strict under rounding (1.0 - 117/130 computes to 0.0999…98,
        which a plain ``<`` would let pass as under 0.1)."""
        return (self.keeps_controls(base_control, control)
                and perplexity < base_perplexity * (1 + self.max_perplexity_rise))

    def keeps_controls(self, base_control: float, control: float) -> bool:
        """The control half of :meth:`allows`, with the same strictness."""
        return base_control - control < self.max_control_drop - 1e-9

    def keeps_near(self, base_near: float | None, near: float | None) -> bool:
        """Near controls lose less than ``max_near_drop`` (strictly, as the others); always
        true without near controls or with the check off."""
        if self.max_near_drop is None or base_near is None or near is None:
            return True
        return base_near - near < self.max_near_drop - 1e-9

    def describe(self, concept: Concept) -> str:
        """What a setting must keep, for a tuner's "nothing fits the budget" message."""
        near = ""
        if self.max_near_drop is not None and concept.near("tune"):
            near = (f", its near controls within {self.max_near_drop} (--set max_near_drop=null "
                    "leaves them out)")
        return (f"{concept.name!r}'s controls within {self.max_control_drop}{near} and "
                f"perplexity within {self.max_perplexity_rise:.0%}")


def budget_scores(lm: LM, concept: Concept, controls: Sequence[Probe], neutral: Sequence[str],
                  entries: EntryStates | None = None) -> tuple[float, float, float]:
    """(concept accuracy, control accuracy, perplexity) of the model as it is now."""
    return (accuracy(lm, concept.probes, entries=entries),
            accuracy(lm, controls, entries=entries), perplexity(lm, neutral, entries))


class BudgetSearch:
    """Trials of one tuner against the model as it was when the search began.

    ``score`` measures the model as it is now (with a setting applied), appends the trial to
    ``trials`` and, when it is inside the budget and erases more than every earlier one (ties
    keep the earlier, milder setting), keeps ``best = (setting, keep())``: ``keep`` captures
    what the caller needs to rebuild it (e.g. a copy of trained weights) only when it wins."""

    def __init__(self, budget: Budget, lm: LM, concept: Concept, controls: Sequence[Probe],
                 neutral: Sequence[str]) -> None:
        self.budget, self.lm, self.concept = budget, lm, concept
        self.controls, self.neutral = list(controls), list(neutral)
        self.entries = EntryStates()
        # the tuning half only: the other half is what reports show
        self.near = concept.near("tune") if budget.max_near_drop is not None else []
        _, self.base_control, self.base_perplexity = budget_scores(lm, concept, self.controls,
                                                                   self.neutral)
        self.base_near = self._near()
        self.trials: list[dict[str, object]] = []
        self.best: tuple[dict[str, Any], Any] | None = None
        self.best_target = float("inf")  # the best trial's concept accuracy

    def score(self, setting: dict[str, Any], keep: Callable[[], Any] = lambda: None, *,
              from_block: int = 0) -> tuple[bool, float]:
        """(inside the budget, concept accuracy) of the current model under ``setting``.

        ``from_block``: the current model equals the one the search began with in every block
        before it (and outside the blocks), so the scoring passes start there from states
        kept across trials (:class:`~engramlab.evaluate.erasure.EntryStates`); 0 runs them
        whole."""
        self.entries.block = from_block
        try:
            t, c, p = budget_scores(self.lm, self.concept, self.controls, self.neutral,
                                    self.entries)
            near = self._near()
        finally:
            self.entries.block = 0
        ok = (self.budget.allows(self.base_control, c, self.base_perplexity, p)
              and self.budget.keeps_near(self.base_near, near))
        self.trials.append({**setting, "target_accuracy": t, "control_accuracy": c,
                            "near_control_accuracy": near, "perplexity": p, "ok": ok})
        if ok and t < self.best_target:
            self.best, self.best_target = (setting, keep()), t
        return ok, t

    def score_delta(self, setting: dict[str, Any], delta: WeightDelta) -> tuple[bool, float]:
        """:meth:`score` with ``delta`` applied, from the first block it changes."""
        with delta.applied(self.lm):
            return self.score(setting, from_block=first_block(self.lm, delta))

    def _near(self) -> float | None:
        return accuracy(self.lm, self.near, entries=self.entries) if self.near else None
