"""A cheap exit check: a per-layer confidence head on the state, the lens read only at the exit.

Reading a lens's distribution at every layer (final norm, 49k-token unembedding, softmax) costs
several blocks per check (:class:`~engramlab.lens.early_exit.ExitCost`), so confidence-threshold
exit can cost more than it saves. CALM (Schuster et al. 2022, "Confident Adaptive Language
Modeling", §3.5) offers a cheaper confidence measure: a small early-exit classifier on the
hidden state, trained to predict whether the layer's prediction is already the final one. Here
the classifier is one logistic unit per lens layer on the final-normed lens state projected on
its first ``n_components`` principal directions (as the ConsistentEE policy's state features in
:mod:`.learned_exit`), trained with binary cross-entropy on "the lens's top-1 here is the full
model's top-1", on tokens before the held-out slice. A token exits at the first layer whose
head probability reaches τ and only then pays one lens readout.

Deviation from CALM: the head reads a frozen model through a lens (CALM trains the model's own
early-exit heads) and its target is agreement with the full model, not with the label.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .early_exit import ExitCost
from .learned_exit import N_CONF, ExitData, ExitPolicy, outcome, policy_check_flops

DEFAULT_HEAD_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 1.01)


class ExitHead(ExitPolicy):
    """``p(lens top-1 at layer ℓ is the full model's)`` from the state alone, per layer: the
    policy's inputs without the confidence features (which need the readout)."""

    def __init__(self, n_layers: int, d_state: int, n_components: int = 16) -> None:
        super().__init__(n_layers, d_state, n_components, confidence=False)

    def check_flops(self) -> float:
        """What one check adds to the lens map: the projection of the state and the unit."""
        return policy_check_flops(self.n_components, self.center.shape[1], n_conf=0)


def train_head(data: ExitData, *, n_components: int = 16, steps: int = 300, lr: float = 0.05,
               weight_decay: float = 1e-3, seed: int = 0) -> ExitHead:
    """Fit an :class:`ExitHead` on ``data`` (the policy's per-layer projection, then
    full-batch binary cross-entropy on agreement with the full model)."""
    head = ExitHead(data.n_layers, data.feats.shape[-1] - N_CONF, n_components)
    head.fit_inputs(data.feats, seed=seed)
    z = head.inputs(data.feats).detach()
    target = data.agree.float()
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(head.logits(z), target).backward()
        opt.step()
    head.eval()
    head.requires_grad_(False)
    return head


def head_curve(head: ExitHead, data: ExitData,
               thresholds: Sequence[float] = DEFAULT_HEAD_THRESHOLDS,
               cost: ExitCost | None = None) -> list[dict[str, Any]]:
    """Agreement and compute saved per head threshold (the lens's top-1 at the exit layer)."""
    return [{"threshold": float(t), **outcome(data, head.exit_layers(data.feats, t), cost)}
            for t in thresholds]
