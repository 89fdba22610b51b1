"""Subject + relation aware targets: TOP's two-stage optimisation (Liu et al., "Unveiling and
Eliminating the Shortcut Learning for Locate-Then-Edit Knowledge Editing via Both Subject and
Relation Awareness", 2025, arXiv:2506.04042; reference code sunshower-liu/TOP).

A one-stage target (ROME eq. 4) lets the change δ at the subject's last token carry the whole
new fact, so the edit learns "subject ⇒ o*" (the *subject feature*) and fires under every
relation the subject appears with. TOP finds the change in two stages:

1. **Relation feature.** A change δ₁ to the residual stream after block ``B + offset`` (B the
   block of the editor's own point) at the prompt's **last** token, where the relation has been
   read, is optimised with the one-stage loss (target NLL over the context templates, KL on
   "{subject} is a" read at its last token, weight decay, clamp) so that the model says o*. Its
   value on the plain prompt, ``h*_rel``, is what the relation position must hold for the new
   fact.
2. **Subject feature.** δ₂ at the editor's own point on the subject's last token is optimised
   so that the plain prompt's last-token residual after block ``B + offset`` reaches h*_rel:
   ``relation.weight · ‖h_rel(δ₂) − h*_rel‖₂`` plus the weight decay and clamp (and
   ``relation.target_weight`` × the one-stage loss, 0 in the paper). The subject can now move
   the prediction only through what the relation's token reads from it, which keeps it from
   becoming a shortcut for every relation.

The editor's solve then writes δ₂ exactly as it writes a one-stage target, so every editor
(ROME, MEMIT, AlphaEdit, DeltaEdit) gets a relation-aware variant through ``targets:
two_stage``.

Deviations from the reference code:

* TOP rewrites each of its layers with its own ROME update in turn; here the two-stage target
  feeds each editor's own solve (for MEMIT and AlphaEdit B is the last edited layer).
* Both stages use the editor's ``target`` settings (TOP's two step counts are equal in all its
  presets) and the library's early stop: stage 2 stops once ``relation.weight`` × the distance
  (plus the weighted target NLL + KL) is below ``target.early_stop``, without the weight decay
  (TOP tests the full loss against 0.05).
* ``relation.target_weight`` (not in TOP) lets the one-stage loss join stage 2; at weight 0 the
  relation term is off and stage 2 is the one-stage optimisation itself.
* TOP's stage 1 reads its KL prompt at the last token less the target's length (its lookup
  arithmetic, written for the rewriting prompts); here the KL prompt is read at its last token,
  the same position for one-token targets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..data.records import EditRequest
from ..errors import RequestError
from ..models.lm import LM
from ..trace import parse_point
from .targets import Anchor, TargetConfig, Targets, optimise_targets

TARGET_MODES = ("one_stage", "two_stage")


@dataclass
class RelationConfig:
    """TOP's second-stage settings (defaults: the paper's GPT-2 XL values)."""

    offset: int = 1  # blocks after the edited point's block whose output holds the relation feature
    weight: float = 0.1  # of ‖h_rel − h*_rel‖ (TOP's vec_loss_factor)
    target_weight: float = 0.0  # of the one-stage loss in stage 2 (not in TOP)


def check_mode(mode: str) -> None:
    if mode not in TARGET_MODES:
        raise RequestError(f"targets={mode!r}; use one of {', '.join(TARGET_MODES)}")


def relation_point(lm: LM, point: str, offset: int) -> str:
    """Where the relation feature is read: the residual after block ``B + offset``."""
    block = parse_point(lm, point)[1]
    if offset < 1 or block + offset >= lm.n_layers:
        raise RequestError(
            f"relation.offset={offset}: the relation feature must be read after a later block "
            f"than the edited one ({block}) in this {lm.n_layers}-block model; use an offset "
            f"from 1 to {lm.n_layers - 1 - block}")
    return f"resid.{block + offset}"


def two_stage_targets(lm: LM, requests: Sequence[EditRequest], point: str,
                      templates: Sequence[str], config: TargetConfig,
                      relation: RelationConfig, *, subject_pos: str = "last",
                      row_scale: torch.Tensor | None = None,
                      avoid: Sequence[torch.Tensor | None] | None = None,
                      progress: bool = False) -> Targets:
    """TOP's target at ``point``: the relation feature h*_rel first, then the subject's change
    that makes the relation position reach it (arguments as :func:`.targets.optimise_targets`,
    whose ``row_scale`` and ``avoid`` apply to the second stage)."""
    read = relation_point(lm, point, relation.offset)
    first = optimise_targets(lm, requests, read, templates, config, subject_pos="prompt_last",
                             progress=progress)
    anchor = Anchor(read, first.value, relation.weight, relation.target_weight)
    if relation.target_weight == 0:
        # only the plain prompt's relation reading enters the loss: the other templates and
        # the KL prompt would be run for nothing
        if "{}" not in templates:
            raise ValueError("the context templates must include the plain template '{}'")
        plain = list(templates).index("{}")
        return optimise_targets(
            lm, requests, point, ["{}"], dataclasses.replace(config, kl_factor=0.0),
            subject_pos=subject_pos, avoid=avoid, anchor=anchor, progress=progress,
            row_scale=None if row_scale is None else row_scale[:, [plain]])
    return optimise_targets(lm, requests, point, templates, config, subject_pos=subject_pos,
                            row_scale=row_scale, avoid=avoid, anchor=anchor, progress=progress)


def edit_targets(lm: LM, requests: Sequence[EditRequest], point: str, templates: Sequence[str],
                 config: TargetConfig, mode: str, relation: RelationConfig, *,
                 subject_pos: str = "last", row_scale: torch.Tensor | None = None,
                 avoid: Sequence[torch.Tensor | None] | None = None,
                 progress: bool = False) -> Targets:
    """The editor's targets: one-stage (ROME eq. 4) or TOP's two-stage (``mode``)."""
    check_mode(mode)
    if mode == "one_stage":
        return optimise_targets(lm, requests, point, templates, config, subject_pos=subject_pos,
                                row_scale=row_scale, avoid=avoid, progress=progress)
    return two_stage_targets(lm, requests, point, templates, config, relation,
                             subject_pos=subject_pos, row_scale=row_scale, avoid=avoid,
                             progress=progress)
