"""DeltaEdit (Cao et al., "On the Superimposed Noise Accumulation Problem in Sequential Knowledge
Editing of Large Language Models", AAAI 2026).

Sequential editing decays because the updates made so far also respond to a new fact's key: at
the last edited layer L the accumulated past update ΔW_past adds ``ΔW_past k`` — the
*superimposed noise* — to whatever the new edit writes there. DeltaEdit is AlphaEdit with one
change to the target optimisation. It keeps ΔW_past at L and a running band of the noise norm
``‖ΔW_past k‖`` over the requests seen (exponential mean and variance). A request whose noise
leaves the band (more than ``band.width`` running standard deviations from the mean, once
``band.warmup`` requests have been seen) optimises its target change δ away from the directions
the past updates write in most: after every step δ loses its component in the span of the
eigenvectors of ``G = ΔW_past ΔW_pastᵀ + n nᵀ`` (n the request's noise) whose eigenvalue exceeds
``band.floor``, at most ``band.space``·d_model of them. The update is then solved as AlphaEdit's.
ΔW_past and the band live in the :class:`~engramlab.edit.solve.EditState`, saved with it.

Deviations from the reference code (CaoD-USTC/DeltaEdit):

* the dominant directions come from an exact eigendecomposition of G (d_model × d_model), not a
  randomised low-rank SVD (``torch.svd_lowrank``, q = space·d_model);
* the band is part of the run's state instead of module globals, so two runs never share it, and
  ``band.warmup`` counts this run's requests (the reference counts every request of the process);
* the early stop is the library's (target NLL + KL below ``target.early_stop``); the reference
  also stops once the mean target probability passes 0.98;
* the reference lists its target layer twice (``[13, …, 17, 17]``); here, as in MEMIT, the
  target layer is the last of ``layers`` and the layer loop is the same.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch

from ..data.records import EditRequest
from ..errors import RequestError
from ..models.lm import LM
from .alphaedit import AlphaEdit
from .base import BandConfig, EditHParams
from .keys import at_subject
from .solve import EditState
from .targets import Targets


def dominant_directions(past: torch.Tensor, noise: torch.Tensor, band: BandConfig
                        ) -> torch.Tensor:
    """Orthonormal columns ``[d_model, m]``: the eigenvectors of ``past pastᵀ + noise noiseᵀ``
    with eigenvalue above ``band.floor``, the largest first, at most ``band.space``·d_model."""
    p = past.double()
    n = noise.double().to(p.device)[:, None]
    gram = p @ p.T + n @ n.T
    values, vectors = torch.linalg.eigh(gram)  # ascending
    keep = int((values > band.floor).sum())
    keep = min(keep, int(band.space * gram.shape[0]))
    return vectors[:, values.numel() - keep:].flip(1).float()


def band_decisions(band: dict[str, float], norms: Sequence[float | None], config: BandConfig
                   ) -> tuple[list[bool], dict[str, float]]:
    """For each request in order, whether its noise norm leaves the running band; and the band
    after them. A request outside the band does not move it (as in the reference); ``None``
    (no past update yet) only counts the request."""
    band = dict(band)
    out = []
    for norm in norms:
        band["seen"] = band.get("seen", 0.0) + 1
        if norm is None:
            out.append(False)
            continue
        if "mean" not in band:
            band["mean"], band["var"] = norm, 0.0
        mean, var = band["mean"], band["var"]
        leaves = (band["seen"] > config.warmup and var > 0
                  and abs(norm - mean) > config.width * math.sqrt(var))
        out.append(bool(leaves))
        if leaves:
            band["projected"] = band.get("projected", 0.0) + 1
            continue
        m = config.momentum
        band["mean"] = m * mean + (1 - m) * norm
        band["var"] = m * var + (1 - m) * (norm - band["mean"]) ** 2
    return out, band


class DeltaEdit(AlphaEdit):
    method = "deltaedit"

    def _state(self, lm: LM, hp: EditHParams, moments: dict, state: Any) -> EditState:
        state = super()._state(lm, hp, moments, state)
        for layer, past in state.past.items():
            if tuple(past.shape) != (lm.d_model, lm.d_mlp):
                raise RequestError(
                    f"edit state's past update at layer {layer} is {tuple(past.shape)}, this "
                    f"model's is {(lm.d_model, lm.d_mlp)}: the state was made for another model")
        return state

    def _targets(self, lm: LM, hp: EditHParams, requests: Sequence[EditRequest],
                 templates: list[str], point: str, state: EditState
                 ) -> tuple[Targets, EditState]:
        z_layer = max(hp.layers)
        past = state.past.get(z_layer)
        norms: list[float | None] = [None] * len(requests)
        noise = None
        if past is not None:
            key = f"mlp_key.{z_layer}"
            keys = at_subject(lm, requests, [key], ["{}"], hp.subject_pos)[key]
            noise = keys.double() @ past.double().T.to(keys.device)  # [n, d_model]
            norms = [float(x) for x in noise.norm(dim=1)]
        leaves, band = band_decisions(state.band, norms, hp.band)
        state = dataclasses.replace(state, band=band)  # the caller's state stays as it was
        if not any(leaves):  # plain AlphaEdit targets (shared with a sweep's memo)
            return super()._targets(lm, hp, requests, templates, point, state)
        assert past is not None and noise is not None
        avoid = [dominant_directions(past, noise[r], hp.band) if leave else None
                 for r, leave in enumerate(leaves)]
        targets = self.optimise(lm, hp, requests, point, templates, avoid=avoid)
        return targets, state

    def _after(self, lm: LM, hp: EditHParams, requests: Sequence[EditRequest],
               templates: list[str], state: EditState,
               factors: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> EditState:
        state = super()._after(lm, hp, requests, templates, state, factors)
        z_layer = max(hp.layers)
        u, v = factors[z_layer]
        # the factors come from different devices when the model is split or on a GPU
        update = (u.double().cpu() @ v.double().cpu().T).float()
        past = state.past.get(z_layer)
        return dataclasses.replace(
            state, past={**state.past, z_layer: update if past is None else past + update})
