"""CounterFact and zsRE metrics, computed in batches.

Definitions follow ROME (Meng et al. 2022, §4.2, Appendix B):

* **score** (ES/PS/NS): share of prompts where P(new) > P(true) — for neighbourhood prompts
  the reverse, P(true) > P(new); averaged per case, then over cases.
* **relation specificity** (RS; the subject + relation awareness paper's R-Specificity): the
  same subject under other relations must keep what the unedited model said there: the share
  of relation prompts where P(that answer) > P(new), with its magnitude and token accuracy.
* **magnitude** (EM/PM/NM): mean of P(new) − P(true) (neighbourhood: P(true) − P(new)).
* Multi-token targets use the mean token log-probability, P = exp(mean log P(token)).
* **fluency**: weighted n-gram entropy of greedy generations (:mod:`.fluency`).

Other traditions, each under its own name so numbers are never confused:

* ``zsre_*`` (MEND / ROME zsRE tables): token-level top-1 accuracy of the target under teacher
  forcing — efficacy on the edit prompt, paraphrase, and specificity on neighbourhood prompts
  with their own answers.
* ``easyedit_*_acc``: EasyEdit's CounterFact accuracy — the same token-level accuracy of
  ``target_new`` on edit and paraphrase prompts, and for locality the token accuracy of the
  neighbourhood answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import mean
from typing import Any

from ..data.records import EditCase
from ..models.lm import LM
from .fluency import ngram_entropy
from .scoring import score_targets


@dataclass
class CaseScores:
    case_id: Any
    efficacy: list[bool] = field(default_factory=list)
    paraphrase: list[bool] = field(default_factory=list)
    neighborhood: list[bool] = field(default_factory=list)
    efficacy_magnitude: list[float] = field(default_factory=list)
    paraphrase_magnitude: list[float] = field(default_factory=list)
    neighborhood_magnitude: list[float] = field(default_factory=list)
    efficacy_acc: list[float] = field(default_factory=list)
    paraphrase_acc: list[float] = field(default_factory=list)
    neighborhood_acc: list[float] = field(default_factory=list)
    relation: list[bool] = field(default_factory=list)
    relation_magnitude: list[float] = field(default_factory=list)
    relation_acc: list[float] = field(default_factory=list)
    fluency: float | None = None
    generations: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"case_id": self.case_id}
        for name in ("efficacy", "paraphrase", "neighborhood", "relation"):
            for suffix in ("", "_magnitude", "_acc"):
                values = getattr(self, name + suffix)
                out[name + suffix] = mean(values) if values else None
        out["fluency"] = self.fluency
        if self.generations:
            out["generations"] = self.generations
        return out


METRICS = {
    "efficacy": "efficacy", "paraphrase": "paraphrase", "neighborhood": "neighborhood",
    "efficacy_magnitude": "efficacy_magnitude", "paraphrase_magnitude": "paraphrase_magnitude",
    "neighborhood_magnitude": "neighborhood_magnitude",
    "zsre_efficacy": "efficacy_acc", "zsre_paraphrase": "paraphrase_acc",
    "zsre_specificity": "neighborhood_acc",
    "easyedit_rewrite_acc": "efficacy_acc", "easyedit_rephrase_acc": "paraphrase_acc",
    "easyedit_locality_acc": "neighborhood_acc",
    "relation_specificity": "relation", "relation_specificity_magnitude": "relation_magnitude",
    "relation_specificity_acc": "relation_acc",
}
# groups scored as "keep the old answer rather than the new object"
KEEPING = ("neighborhood", "relation")
#: The three scores every editing report leads with.
HEADLINE = ("efficacy", "paraphrase", "neighborhood")


def case_scores(lm: LM, cases: Sequence[EditCase], *, fluency_tokens: int = 0,
                batch_size: int = 64, progress: bool = False) -> list[CaseScores]:
    """Per-case scores of the model as it is now (one batched scoring pass for all cases)."""
    prompts: list[str] = []
    targets: list[str] = []
    where: list[tuple[int, str, str]] = []  # (case index, group, which target)
    for c, case in enumerate(cases):
        req = case.request
        groups = [("efficacy", [req.text]), ("paraphrase", list(case.paraphrase_prompts))]
        for group, texts in groups:
            for text in texts:
                for which, target in (("new", req.target_new), ("true", req.target_true)):
                    if target is not None:
                        prompts.append(text)
                        targets.append(target)
                        where.append((c, group, which))
        answers = case.neighborhood_targets() if case.neighborhood_prompts else []
        kept = [("neighborhood", t, a)
                for t, a in zip(case.neighborhood_prompts, answers, strict=True)]
        kept += [("relation", t, a) for t, a in zip(case.relation_prompts,
                                                    case.relation_targets(), strict=True)
                 if a is not None]
        for group, text, answer in kept:
            for which, target in (("true", answer), ("new", req.target_new)):
                prompts.append(text)
                targets.append(target)
                where.append((c, group, which))
    scores = score_targets(lm, prompts, targets, batch_size=batch_size, progress=progress)
    out = [CaseScores(case.case_id) for case in cases]
    pending: dict[tuple[int, str, int], dict[str, Any]] = {}
    counters: dict[tuple[int, str, str], int] = {}
    for (c, group, which), s in zip(where, scores, strict=True):
        n = counters.get((c, group, which), 0)
        counters[(c, group, which)] = n + 1
        pending.setdefault((c, group, n), {})[which] = s
    for (c, group, _), pair in pending.items():
        res = out[c]
        new, true = pair.get("new"), pair.get("true")
        wanted = true if group in KEEPING else new
        assert wanted is not None
        getattr(res, group + "_acc").append(wanted.token_accuracy)
        if new is not None and true is not None:
            if group in KEEPING:
                getattr(res, group).append(true.logprob > new.logprob)
                getattr(res, group + "_magnitude").append(true.prob - new.prob)
            else:
                getattr(res, group).append(new.logprob > true.logprob)
                getattr(res, group + "_magnitude").append(new.prob - true.prob)
    if fluency_tokens > 0:
        gen_prompts = [(c, p) for c, case in enumerate(cases)
                       for p in (case.generation_prompts or case.paraphrase_prompts[:2])]
        if gen_prompts:
            texts = lm.generate([p for _, p in gen_prompts], max_new_tokens=fluency_tokens)
            per_case: dict[int, list[float]] = {}
            for (c, prompt), text in zip(gen_prompts, texts, strict=True):
                per_case.setdefault(c, []).append(ngram_entropy(prompt + text))
                out[c].generations.append(prompt + text)
            for c, values in per_case.items():
                out[c].fluency = mean(values)
    return out


def fill_relation_answers(lm: LM, cases: Sequence[EditCase], max_tokens: int = 4
                          ) -> list[EditCase]:
    """The cases with every missing relation answer filled in by ``lm`` as it is now (call it
    on the unedited model): the first word of its greedy continuation, with its leading space,
    or, when the continuation holds no word, its first character."""
    missing = [(c, i) for c, case in enumerate(cases)
               for i, a in enumerate(case.relation_targets()) if a is None]
    if not missing:
        return list(cases)
    texts = lm.generate([cases[c].relation_prompts[i] for c, i in missing],
                        max_new_tokens=max_tokens)
    filled: dict[int, list[str | None]] = {}
    for (c, i), text in zip(missing, texts, strict=True):
        words = text.split()
        answer = " " + words[0] if words else (text[:1] or " ")
        filled.setdefault(c, cases[c].relation_targets())[i] = answer
    return [dataclasses.replace(case, relation_answers=tuple(filled[c])) if c in filled
            else case for c, case in enumerate(cases)]


def summarize(results: Sequence[CaseScores] | Sequence[dict[str, Any]]
              ) -> dict[str, float | None]:
    """Mean over cases of each per-case mean (ROME's aggregation), under every metric name;
    ``results`` are case scores or their dicts (``RunResult.per_case``)."""
    rows = [r if isinstance(r, dict) else r.to_dict() for r in results]
    summary: dict[str, float | None] = {}
    for name, field_name in METRICS.items():
        values = [row[field_name] for row in rows if row[field_name] is not None]
        summary[name] = mean(values) if values else None
    flu = [row["fluency"] for row in rows if row["fluency"] is not None]
    summary["fluency"] = mean(flu) if flu else None
    summary["n"] = len(rows)
    return summary


def edit_scores(lm: LM, cases: Sequence[EditCase], *, fluency_tokens: int = 0
                ) -> dict[str, float | None]:
    """Aggregate CounterFact / zsRE / EasyEdit metrics of the model as it is now."""
    return summarize(case_scores(lm, cases, fluency_tokens=fluency_tokens))
