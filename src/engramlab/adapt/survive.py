"""Do edits survive fine-tuning? Edit, fine-tune, score again (Cheng et al., "Can Fine-Tuning
Erase Your Edits? On the Fragile Coexistence of Knowledge Editing and Adaptation").

:func:`survive` edits the cases into the model (one batch), fine-tunes the edited model
(:func:`~.finetune.finetune`), and scores the cases before and after the fine-tune. Survival is
the share of previously *successful* edit prompts (efficacy) and paraphrase prompts that still
prefer the new object after it; the downstream score is the same model's accuracy on a task's
test rows (:mod:`~engramlab.data.tasks`: questions about facts that were not edited, the greedy
next token starting the answer), before and after, so what the fine-tune gained or cost is a
number. ``overlap`` is the *why*: per edited parameter, the share of the
fine-tune's update (squared Frobenius norm) inside the edit's column space and inside its row
space, ‖P_U ΔW_f‖² / ‖ΔW_f‖² and ‖ΔW_f P_V‖² / ‖ΔW_f‖².
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.concepts import Probe
from ..data.corpus import TextCorpus
from ..data.records import EditCase
from ..data.tasks import TaskRow
from ..delta import WeightDelta
from ..edit.base import Editor
from ..evaluate.counterfact import HEADLINE, CaseScores, case_scores, summarize
from ..evaluate.erasure import accuracy
from ..models.lm import LM
from .finetune import FinetuneConfig, finetune


@dataclass
class SurvivalResult:
    edit: dict[str, Any]
    after_finetune: dict[str, Any]
    survival: dict[str, float | None]
    downstream: dict[str, float | None]
    overlap: list[dict[str, Any]]
    finetune_losses: list[float]

    def to_json(self) -> dict[str, Any]:
        return {"edit": {k: self.edit.get(k) for k in HEADLINE},
                "after_finetune": {k: self.after_finetune.get(k) for k in HEADLINE},
                "survival": self.survival, "downstream": self.downstream,
                "overlap": self.overlap}

    def lines(self) -> list[str]:
        def num(x: float | None) -> str:
            return "-" if x is None else f"{x:.3f}"

        out = [f"{'':<16}{'efficacy':>10}{'paraphrase':>12}{'neighbourhood':>15}"]
        for name, s in (("edited", self.edit), ("after fine-tune", self.after_finetune)):
            out.append(f"{name:<16}{num(s.get('efficacy')):>10}{num(s.get('paraphrase')):>12}"
                       f"{num(s.get('neighborhood')):>15}")
        out.append(f"survival: efficacy {num(self.survival['efficacy'])}, paraphrase "
                   f"{num(self.survival['paraphrase'])} of the edits that worked")
        out.append(f"downstream (facts not edited): {num(self.downstream['before'])} before, "
                   f"{num(self.downstream['after'])} after the fine-tune")
        for row in self.overlap:
            out.append(f"{row['parameter']}: {row['column_space']:.3f} of the fine-tune's "
                       f"update in the edit's column space, {row['row_space']:.3f} in its row "
                       "space")
        return out


def _successes(scores: Sequence[CaseScores]) -> dict[str, list[bool]]:
    """Per edit and paraphrase prompt, in a fixed order, whether the new object wins."""
    return {"efficacy": [x for s in scores for x in s.efficacy],
            "paraphrase": [x for s in scores for x in s.paraphrase]}


def _kept(before: list[bool], after: list[bool]) -> float | None:
    worked = [a for b, a in zip(before, after, strict=True) if b]
    return sum(worked) / len(worked) if worked else None


def downstream_accuracy(lm: LM, rows: Sequence[TaskRow]) -> float | None:
    """Share of ``rows`` whose completion the model starts with its greedy next token."""
    if not rows:
        return None
    return accuracy(lm, [Probe(r.prompt, r.completion) for r in rows])


def fact_rows(cases: Sequence[EditCase]) -> list[TaskRow]:
    """Edit cases as questions about their true objects (the facts as the model knew them)."""
    return [TaskRow(c.request.prompt.format(c.request.subject), c.request.target_true)
            for c in cases if c.request.target_true]


def overlap(edit: WeightDelta, update: WeightDelta) -> list[dict[str, Any]]:
    """Per parameter the edit changed: the share of ``update``'s squared norm in the edit's
    column space and in its row space (0 when the update leaves the parameter alone)."""
    rows = []
    for name, entry in edit.entries.items():
        other = update.entries.get(name)
        dense = entry.to_dense().double()
        if other is None:
            rows.append({"parameter": name, "column_space": 0.0, "row_space": 0.0})
            continue
        f = other.to_dense().double()
        total = float((f * f).sum())
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        keep = s > s.max() * 1e-6 if s.numel() else s.bool()
        cols, rows_ = u[:, keep], vh[keep].T
        col = float(((cols.T @ f) ** 2).sum()) / total if total else 0.0
        row = float(((f @ rows_) ** 2).sum()) / total if total else 0.0
        rows.append({"parameter": name, "column_space": col, "row_space": row})
    return rows


@dataclass
class EditedScores:
    """The edited model's scores before any fine-tune: its cases' and the downstream task's."""

    cases: list[CaseScores]
    downstream: float | None


def score_edited(lm: LM, edit: WeightDelta, cases: Sequence[EditCase],
                 downstream: Sequence[TaskRow] = ()) -> EditedScores:
    """Score ``cases`` and ``downstream`` with ``edit`` applied (the model is left as it was):
    what every fine-tune of one edit is compared with, measured once."""
    with edit.applied(lm):
        return EditedScores(case_scores(lm, cases), downstream_accuracy(lm, downstream))


def survive(lm: LM, editor: Editor, cases: Sequence[EditCase],
            data: TextCorpus | Sequence[TaskRow], config: FinetuneConfig | None = None, *,
            downstream: Sequence[TaskRow] = (), checkpoint: str | Path | None = None,
            edit: WeightDelta | None = None, edited_scores: EditedScores | None = None,
            progress: bool = False) -> SurvivalResult:
    """Edit ``cases`` (one batch), fine-tune the edited model on ``data`` (text or task rows),
    score again. ``downstream``: task rows about facts that are not edited, scored before and
    after the fine-tune. ``edit``: ``editor``'s edit of ``cases``, already made, and
    ``edited_scores`` its :func:`score_edited` (several fine-tunes of one edit need both
    once). The model is left as it was."""
    config = config or FinetuneConfig()
    if edit is None:
        edit = editor.edit(lm, [c.request for c in cases])
    if edited_scores is None:
        edited_scores = score_edited(lm, edit, cases, downstream)
    edited, before = edited_scores.cases, edited_scores.downstream
    with edit.applied(lm):
        tuned = finetune(lm, data, config, edited=edit, checkpoint=checkpoint,
                         progress=progress)
        with tuned.delta.applied(lm):
            after = case_scores(lm, cases)
            later = downstream_accuracy(lm, downstream)
    worked, still = _successes(edited), _successes(after)
    return SurvivalResult(
        edit=summarize(edited), after_finetune=summarize(after),
        survival={k: _kept(worked[k], still[k]) for k in worked},
        downstream={"before": before, "after": later},
        overlap=overlap(edit, tuned.delta), finetune_losses=tuned.losses)
