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
from torch import nn

from .early_exit import ExitCost
from .learned_exit import N_CONF, ExitData, outcome
from .readings import first_layer_where

DEFAULT_HEAD_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 1.01)


class ExitHead(nn.Module):
    """``p(lens top-1 at layer ℓ is the full model's)`` from the state, per layer."""

    def __init__(self, n_layers: int, d_state: int, n_components: int = 16) -> None:
        super().__init__()
        self.n_components = n_components
        self.weight = nn.Parameter(torch.zeros(n_layers, n_components))
        self.bias = nn.Parameter(torch.zeros(n_layers))
        self.register_buffer("center", torch.zeros(n_layers, d_state))
        self.register_buffer("basis", torch.zeros(n_layers, d_state, n_components))
        self.register_buffer("scale", torch.ones(n_layers, n_components))

    def check_flops(self) -> float:
        """What one check adds to the lens map: centring, projection and the unit."""
        d = self.center.shape[1]
        return 2.0 * d * self.n_components + d + 2.0 * self.n_components

    def _project(self, states: torch.Tensor) -> torch.Tensor:
        z = torch.einsum("lnd,ldk->lnk", states - self.center[:, None], self.basis)
        return z / self.scale[:, None]

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """[L, N] probabilities from [L, N, d] final-normed lens states."""
        z = self._project(states)
        return torch.sigmoid((z * self.weight[:, None]).sum(-1) + self.bias[:, None])

    def exit_layers(self, states: torch.Tensor, threshold: float) -> torch.Tensor:
        """First layer whose head probability reaches ``threshold`` (L: never exit)."""
        return first_layer_where(self(states) >= threshold)


def states_of(data: ExitData) -> torch.Tensor:
    """The final-normed lens states inside :class:`ExitData` features (no confidences)."""
    return data.feats[..., : data.feats.shape[-1] - N_CONF]


def train_head(data: ExitData, *, n_components: int = 16, steps: int = 300, lr: float = 0.05,
               weight_decay: float = 1e-3, seed: int = 0) -> ExitHead:
    """Fit an :class:`ExitHead` on ``data`` (its own PCA per layer, then full-batch BCE)."""
    states = states_of(data).float()
    n_layers, _, d = states.shape
    head = ExitHead(n_layers, d, n_components)
    torch.manual_seed(seed)
    with torch.no_grad():
        head.center.copy_(states.mean(1))
        for layer in range(n_layers):
            centred = states[layer] - head.center[layer]
            _, _, v = torch.linalg.svd(centred, full_matrices=False)
            head.basis[layer] = v[:n_components].T
        head.scale.copy_(head._project(states).std(1).clamp_min(1e-6))
    target = data.agree.float()
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    z = head._project(states).detach()
    for _ in range(steps):
        opt.zero_grad()
        logits = (z * head.weight[:, None]).sum(-1) + head.bias[:, None]
        F.binary_cross_entropy_with_logits(logits, target).backward()
        opt.step()
    head.eval()
    head.requires_grad_(False)
    return head


def head_curve(head: ExitHead, data: ExitData,
               thresholds: Sequence[float] = DEFAULT_HEAD_THRESHOLDS,
               cost: ExitCost | None = None) -> list[dict[str, Any]]:
    """Agreement and compute saved per head threshold (the lens's top-1 at the exit layer)."""
    states = states_of(data).float()
    with torch.no_grad():
        return [{"threshold": float(t), **outcome(data, head.exit_layers(states, t), cost)}
                for t in thresholds]
