"""MEMIT: Mass-Editing Memory in a Transformer (Meng et al. 2023, ICLR).

Many facts at once, spread over a range of layers: a target hidden state z is optimised at the
last layer of the range (residual stream, subject's last token); then, from the first layer to
the last, the remaining residual ``z − h`` is divided by the number of layers left and written
into each layer's value weight by ``ΔW = R Kᵀ (λC₀ + KKᵀ)⁻¹`` (solved in float64), re-reading
keys and residuals after each layer's update (Algorithm 1).

Deviation: the per-layer update is kept as rank-n factors (``u = R``, ``v = (λC₀+KKᵀ)⁻¹K``)
instead of a dense matrix: the same ΔW, (d_model + d_mlp)·n numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from ..data.records import EditRequest
from ..delta import WeightDelta
from ..models.lm import LM
from .base import EditHParams, Editor
from .keys import at_subject
from .solve import memit_update
from .targets import Targets


class MEMIT(Editor):
    method = "memit"
    # the target values of the latest step, at the last edited layer (None before any step)
    last_targets: Targets | None = None

    def _layer_update(self, hp: EditHParams, layer: int, keys: torch.Tensor,
                      resid: torch.Tensor, moments: dict, state: Any
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        return memit_update(keys, resid, moments[layer], hp.mom2_weight)

    def _state(self, lm: LM, hp: EditHParams, moments: dict, state: Any) -> Any:
        return state

    def _after(self, lm: LM, hp: EditHParams, requests: Sequence[EditRequest],
               templates: list[str], state: Any,
               factors: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> Any:
        """The state after this batch (called with the batch's updates applied)."""
        return state

    def _targets(self, lm: LM, hp: EditHParams, requests: Sequence[EditRequest],
                 templates: list[str], point: str, state: Any) -> tuple[Targets, Any]:
        """The batch's target values at ``point`` (and the state, which DeltaEdit updates)."""

        def compute() -> Targets:
            return self.optimise(lm, hp, requests, point, templates)

        if self.target_memo is None:
            return compute(), state
        setting = (dataclasses.astuple(hp.target), hp.targets, dataclasses.astuple(hp.relation))
        return self.target_memo.get(lm, requests, point, templates, setting, hp.subject_pos,
                                    compute), state

    def step(self, lm: LM, requests: Sequence[EditRequest], state: Any = None
             ) -> tuple[WeightDelta, Any]:
        hp = self.hparams_for(lm)
        layers = sorted(hp.layers)
        moments = self.moments(lm, layers, hp)
        state = self._state(lm, hp, moments, state)
        templates = self.templates(lm, hp)
        z_layer = layers[-1]
        z_point = f"resid.{z_layer}"
        targets, state = self._targets(lm, hp, requests, templates, z_point, state)
        self.last_targets = targets  # what a noise recorder reads after the step
        z = targets.value  # [n, d_model]
        factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        applied: list[WeightDelta] = []
        try:
            for i, layer in enumerate(layers):
                keys = at_subject(lm, requests, [f"mlp_key.{layer}"], templates,
                                  hp.subject_pos)[f"mlp_key.{layer}"]
                current = at_subject(lm, requests, [z_point], ["{}"], hp.subject_pos)[z_point]
                resid = (z - current) / (len(layers) - i)
                u, v = self._layer_update(hp, layer, keys.T, resid.T, moments, state)
                factors[layer] = (u, v)
                # applied unstamped: the final delta is stamped once, on the unedited weights
                one = WeightDelta(self._entries(lm, {layer: (u, v)}))
                applied.append(one.apply(lm, force=True))
            state = self._after(lm, hp, requests, templates, state, factors)
        finally:
            for d in reversed(applied):
                d.revert(lm)
        delta = self._delta(lm, hp, factors, requests, target_nll=targets.nll.tolist(),
                            target_steps=targets.steps)
        return delta, state
