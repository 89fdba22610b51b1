"""The specificity budget every eraser is tuned against, and the three numbers it checks.

An eraser is only comparable to another at the same collateral cost, so all of them (concept
vectors' top_k × damping grid, the fine-tuning baselines' learning rate × step checkpoints)
choose the setting that lowers the concept's accuracy most while the control probes lose less
than ``max_control_drop`` and perplexity on the neutral text's tuning half rises less than
``max_perplexity_rise`` — by default the project's bar: 10 points, 10 %.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..data.concepts import Concept, Probe
from ..models.lm import LM


@dataclass(frozen=True)
class Budget:
    max_control_drop: float = 0.10
    max_perplexity_rise: float = 0.10

    def allows(self, base_control: float, control: float, base_perplexity: float,
               perplexity: float) -> bool:
        """Controls lose *less than* ``max_control_drop`` and perplexity rises less than
        ``max_perplexity_rise``; strict under rounding (1.0 - 117/130 computes to 0.0999…98,
        which a plain ``<`` would let pass as under 0.1)."""
        return (base_control - control < self.max_control_drop - 1e-9
                and perplexity < base_perplexity * (1 + self.max_perplexity_rise))


def budget_scores(lm: LM, concept: Concept, controls: Sequence[Probe],
                  neutral: Sequence[str]) -> tuple[float, float, float]:
    """(concept accuracy, control accuracy, perplexity) of the model as it is now."""
    from ..evaluate.erasure import accuracy, perplexity

    return accuracy(lm, concept.probes), accuracy(lm, controls), perplexity(lm, neutral)
