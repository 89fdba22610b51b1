"""ROME: Rank-One Model Editing (Meng et al. 2022, "Locating and Editing Factual Associations
in GPT", NeurIPS).

One MLP value weight is changed by a rank-one update that maps the subject's key k* (averaged
over context templates) to a value that makes the model say the new object. Several requests in
one :meth:`ROME.edit` call are inserted one after another, each computed on the weights the
previous ones left (the paper's multi-edit use); :meth:`ROME.edit_each` gives independent edits,
optimising all their target values in one batch.

Deviations:

* k* is used in both the numerator and the denominator of the update (see
  :mod:`engramlab.edit.solve`), so the update maps k* exactly to its target.
* ``consistent_targets`` (default on; ``--set consistent_targets=false`` restores the paper):
  the paper optimises δ as if every context template received all of it, but the rank-one
  update writes ``δ · uᵀk_i`` at a prompt whose key is k_i (u = C⁻¹k*/k*ᵀC⁻¹k*). On SmolLM2 that
  share is below 0.4 for one request in ten (the model's keys move a lot with context), so the
  edit misses its own prompt. We compute u first and optimise δ with each prompt scaled by its
  share — the objective becomes the edited model's own loss at those prompts.
* target values are optimised for many requests at once (exactly equivalent per request, see
  :mod:`engramlab.edit.targets`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..data.records import EditRequest
from ..delta import WeightDelta
from ..models.lm import LM
from .base import EditHParams, Editor
from .keys import at_subject
from .solve import cov_factor, rome_update, solve_cov
from .targets import KL_PROMPT


class ROME(Editor):
    method = "rome"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def cov_factor(self, lm: LM, layer: int, hp: EditHParams) -> torch.Tensor:
        """C₀'s Cholesky factor at ``layer`` (:func:`~.solve.cov_factor`), kept with the C₀
        it was made from: every edit at the layer then solves C₀⁻¹k without factorising.
        Factorised in float64 and kept in float32, as C₀ itself is (module docstring of
        :mod:`.base`): the rounding perturbs L Lᵀ about as much as C₀'s own."""
        cov = self.moments(lm, [layer], hp)[layer]
        held = self._factors.get(layer)
        if held is None or held[0] is not cov:  # C₀ was collected anew (another model)
            held = self._factors[layer] = (cov, cov_factor(cov).float())
        return held[1]

    def prepare(self, lm: LM) -> None:
        super().prepare(lm)
        hp = self.hparams_for(lm)
        if hp.use_cov:
            self.cov_factor(lm, hp.layers[0], hp)

    def edit_each(self, lm: LM, requests: Sequence[EditRequest]) -> list[WeightDelta]:
        hp = self.hparams_for(lm)
        layer = hp.layers[0]
        factor = self.cov_factor(lm, layer, hp) if hp.use_cov else None
        templates = self.templates(lm, hp)
        point = f"mlp_key.{layer}"
        per_template = at_subject(lm, requests, [point], templates, hp.subject_pos,
                                  reduce=False)[point]  # [n, T, d_mlp]
        keys = per_template.mean(1)
        # C⁻¹k on the keys' device, wherever C₀'s factor is kept
        cov_k = solve_cov(factor, keys.T).to(keys.device) if factor is not None \
            else keys.T.double()
        row_scale = None
        if hp.consistent_targets:
            kl_reqs = [EditRequest(prompt=KL_PROMPT, subject=r.subject, target_new="x",
                                   case_id=r.case_id) for r in requests]
            kl_keys = at_subject(lm, kl_reqs, [point], ["{}"], hp.subject_pos)[point]
            u = (cov_k / (keys.T.double() * cov_k).sum(0, keepdim=True)).T  # [n, d_mlp]
            all_keys = torch.cat([per_template, kl_keys[:, None]], 1).double()
            row_scale = torch.einsum("ntd,nd->nt", all_keys, u).float()
        targets = self.optimise(lm, hp, requests, f"mlp_out.{layer}", templates,
                                row_scale=row_scale)
        out = []
        for i, req in enumerate(requests):
            u, v = rome_update(keys[i], targets.delta[i], cov_k=cov_k[:, i])
            out.append(self._delta(lm, hp, {layer: (u, v)}, [req],
                                   target_nll=float(targets.nll[i]),
                                   target_steps=targets.steps[i]))
        return out

    def step(self, lm: LM, requests: Sequence[EditRequest], state: Any = None
             ) -> tuple[WeightDelta, Any]:
        if len(requests) == 1:
            return self.edit_each(lm, requests)[0], state
        applied: list[WeightDelta] = []
        try:
            for req in requests:
                applied.append(self.edit_each(lm, [req])[0].apply(lm))
        finally:
            for d in reversed(applied):
                d.revert(lm)
        total = applied[0]
        for d in applied[1:]:
            total = total + d
        total.meta.update(method=self.method, n_requests=len(requests),
                          case_ids=[r.case_id for r in requests])
        return total, state
