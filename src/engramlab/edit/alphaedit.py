"""AlphaEdit: Null-Space Constrained Knowledge Editing (Fang et al. 2025, ICLR).

MEMIT's targets and layer loop, but each layer's update is projected onto the null space of the
preserved knowledge's keys, so what the unedited model knew is (to the threshold) untouched, and
the keys of earlier edits enter the solve, so later batches do not overwrite earlier ones:
``ΔWᵀ = (P (KKᵀ + K_pK_pᵀ) + αI)⁻¹ P K Rᵀ``. P comes from the unedited model's key statistics
(eigenvectors of C₀ with eigenvalue below ``nullspace_threshold``); the history lives in an
:class:`~engramlab.edit.solve.EditState` that :meth:`AlphaEdit.step` takes and returns.

Deviations: P from ``eigh`` rather than an SVD (identical for the symmetric C₀); the system solved
in P's range, an m × m positive-definite solve (the same ΔW; see :mod:`.solve`); updates kept
as rank-n factors. As in the reference code, K_p is recomputed on the edited weights after each
batch, averaged over context templates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..data.records import EditRequest
from ..errors import RequestError
from ..models.lm import LM
from .base import EditHParams
from .keys import at_subject
from .memit import MEMIT
from .solve import EditState, alphaedit_update


class AlphaEdit(MEMIT):
    method = "alphaedit"

    def _state(self, lm: LM, hp: EditHParams, moments: dict, state: Any) -> EditState:
        if state is None:
            return EditState.from_moments(moments, hp.nullspace_threshold,
                                        model_signature=lm.signature())
        if not isinstance(state, EditState):
            raise RequestError(f"AlphaEdit needs an EditState, got {type(state).__name__}")
        missing = set(hp.layers) - set(state.bases)
        if missing:
            raise RequestError(f"edit state has no null space for layer(s) {sorted(missing)}; "
                               "it was made for other layers")
        sig = state.meta.get("model_signature")
        if sig and sig != lm.signature():
            raise RequestError("edit state was made for another model architecture")
        return state

    def _layer_update(self, hp: EditHParams, layer: int, keys: torch.Tensor,
                      resid: torch.Tensor, moments: dict, state: EditState
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        prev = state.keys_cov[layer] if state.n_edits else None
        return alphaedit_update(keys, resid, state.bases[layer], prev, hp.alpha)

    def _after(self, lm: LM, hp: EditHParams, requests: Sequence[EditRequest],
               templates: list[str], state: EditState,
               factors: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> EditState:
        points = [f"mlp_key.{layer}" for layer in hp.layers]
        keys = at_subject(lm, requests, points, templates, hp.subject_pos)
        return state.updated({layer: keys[f"mlp_key.{layer}"].T for layer in hp.layers},
                             len(requests))
