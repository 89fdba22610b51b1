"""One erasure run end to end: erase, then measure behaviour and what is left inside.

``run_erasure`` is what ``engram erase`` prints: accuracies before and after, perplexity,
paraphrases, adversarial framings, relearning (on the concept's paragraph, and on half of its
facts scored on the other half, with the unedited model under the same fine-tune as the
reference), and the inside-looking probes of :mod:`engramlab.evaluate.erasure` (the change
of the concept's vectors, coefficient patching; that module says which contrasts are
structural). The concept's vectors used as its trace are the ones the concept-vectors finder
validates on the unedited model, so every method is judged against the same trace.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_dir
from ..data.concepts import Concept, Probe, controls_for, general_text, unseen_controls_for
from ..delta import WeightDelta
from ..errors import ConceptError, SettingsError
from ..evaluate import erasure as E
from ..models.lm import LM
from ..report import Report, Table
from .budget import BUDGET_KEYS, Budget
from .concept_vectors import ConceptVectors, find_concept_vectors
from .features import FeatureEraser
from .finetune import FineTuneUnlearner

METHODS = ("concept-vectors", "features", "ga", "npo", "rmu")


def make_eraser(method: str, *, layers: Sequence[int] | None = None,
                **settings: Any) -> ConceptVectors | FeatureEraser | FineTuneUnlearner:
    """An eraser by name with its settings; ``max_control_drop``, ``max_perplexity_rise`` and
    ``max_near_drop`` set its :class:`~.budget.Budget`."""
    key = method.lower()
    classes = {"concept-vectors": ConceptVectors, "features": FeatureEraser,
               "ga": FineTuneUnlearner, "npo": FineTuneUnlearner, "rmu": FineTuneUnlearner}
    if key not in classes:
        raise ConceptError(f"unknown erasure method {method!r}; choose one of {METHODS}")
    cls = classes[key]
    known = {f.name for f in dataclasses.fields(cls) if f.init} - {"method", "layers", "budget"}
    unknown = sorted(set(settings) - known - set(BUDGET_KEYS))
    if unknown:
        raise SettingsError(f"unknown setting(s) {unknown} for {key}; known: "
                            f"{sorted(known | set(BUDGET_KEYS))}")
    # the budget's three numbers are given as settings of their own (--set max_near_drop=null)
    limits = {k: settings.pop(k) for k in BUDGET_KEYS if k in settings}
    if limits:
        settings = {**settings, "budget": Budget(**limits)}
    if cls is FineTuneUnlearner:
        settings = {**settings, "method": key}
    return cls(layers=list(layers) if layers else None, **settings)


def behaviour(lm: LM, concept: Concept, controls: Sequence[Probe], neutral: Sequence[str],
              unseen: Sequence[Probe] = ()) -> dict[str, float | None]:
    """Accuracies and perplexity; ``unseen_control_accuracy`` (None without ``unseen``) is on
    controls no eraser tuned on (:func:`~engramlab.data.concepts.unseen_controls_for`), and
    ``near_control_accuracy`` (None without them) on the evaluation half of the concept's near
    controls: the same kind of fact about its neighbours, never tuned on. The tuning half,
    which the tuners keep inside their budget, is ``near_control_tune_accuracy``;
    ``kind_accuracy`` (None without them) is on the concept's category probes.
    ``paragraph_perplexity`` lists each neutral paragraph's own perplexity, so damage to one
    topic is not averaged away."""
    nlls = E.text_nlls(lm, neutral)
    near_eval, near_tune = concept.near("eval"), concept.near("tune")
    return {"target_accuracy": E.accuracy(lm, concept.probes),
            "paraphrase_accuracy": E.accuracy(lm, concept.paraphrases),
            "control_accuracy": E.accuracy(lm, controls),
            "unseen_control_accuracy": E.accuracy(lm, unseen) if unseen else None,
            "near_control_accuracy": E.accuracy(lm, near_eval) if near_eval else None,
            "near_control_tune_accuracy": E.accuracy(lm, near_tune) if near_tune else None,
            "kind_accuracy": E.accuracy(lm, concept.kind) if concept.kind else None,
            "perplexity": E.pooled_perplexity(nlls),
            "paragraph_perplexity": [math.exp(n / c) for n, c in nlls if c]}


@dataclasses.dataclass
class _Setting:
    """One concept, split into the probes a tuner sees and the probes it is judged on, with
    everything else the measurements read; the same for every method compared on it."""

    lm: LM
    concept: Concept
    tuned: Concept
    held: list[Probe]
    controls: list[Probe]
    unseen: list[Probe]
    neutral: list[str]

    @classmethod
    def of(cls, lm: LM, concept: Concept, split_seed: int | None) -> _Setting:
        tuned, held = (concept, list(concept.probes)) if split_seed is None \
            else concept.split(split_seed)
        return cls(lm, concept, tuned, list(held), list(controls_for(concept)),
                   list(unseen_controls_for(concept)), list(general_text(split="eval")))

    @property
    def evaluated(self) -> Concept:
        return dataclasses.replace(self.concept, probes=self.held)

    def figures(self) -> dict[str, Any]:
        """:func:`behaviour` on the held-out probes, plus the tuning probes' accuracy."""
        out = behaviour(self.lm, self.evaluated, self.controls, self.neutral, self.unseen)
        out["target_tuned_accuracy"] = E.accuracy(self.lm, self.tuned.probes)
        return out


def _trace(s: _Setting, eraser: Any, n: int, once: Any, key: tuple
           ) -> list[tuple[int, int]]:
    """The concept's vectors every method is judged against: the concept-vectors finder's
    ranking on the tuning probes (the eraser's own, when it ranked by activation)."""
    ranked = eraser.candidates.get("activation", []) if isinstance(eraser, ConceptVectors) \
        and eraser.layers is None and not eraser.check else []
    trace = once(key, lambda: ranked[:n] if len(ranked) >= n  # the same ranking
                 else find_concept_vectors(s.lm, s.tuned, controls=s.controls, n_candidates=n,
                                           check=False))
    return [(c.layer, c.index) for c in trace]


def _erased(s: _Setting, delta: WeightDelta, trace_ids: list[tuple[int, int]],
            relearn_steps: int, relearn_lr: float) -> dict[str, Any]:
    """Everything measured with ``delta`` applied (and after, patching), model left as it was."""
    lm = s.lm
    originals = torch.stack([lm.layout.value_weight(i)[:, j].detach().clone()
                             for i, j in trace_ids]) if trace_ids else torch.zeros(0)
    with delta.applied(lm):
        post = s.figures()
        adversarial = E.adversarial_accuracies(lm, s.evaluated)
        cosines = E.value_cosines(lm, trace_ids, originals) if trace_ids else []
        relearned = E.relearned_accuracy(lm, s.concept.forget_text, s.held,
                                         steps=relearn_steps, lr=relearn_lr)
        heldout = E.relearn_heldout(lm, s.concept.probes, steps=relearn_steps, lr=relearn_lr)
    return {"post": post, "adversarial": adversarial, "cosines": cosines,
            "relearned": relearned, "heldout": heldout,
            "patched": E.coefficient_patch_accuracy(lm, delta, s.held)}


def _chosen_setting(delta: WeightDelta) -> dict[str, Any]:
    """The setting an eraser chose (e.g. concept vectors' selection, top_k, factor), from the
    delta's metadata without its provenance."""
    return {k: v for k, v in delta.meta.items()
            if isinstance(v, str | int | float) and not k.startswith("model")
            and k not in ("method", "concept", "created", "engramlab_version")}


def run_erasure(lm: LM, concept: Concept, method: str = "concept-vectors", *,
                layers: Sequence[int] | None = None, relearn_steps: int = 10,
                relearn_lr: float = 3e-5, trace_vectors: int = 16,
                out: str | Path | None = None, eraser: Any = None,
                split_seed: int | None = 0, unedited: dict | None = None,
                **settings: Any) -> dict[str, Any]:
    """Erase ``concept`` with ``method`` (or a ready ``eraser``) and report; the model is
    left unedited.

    The concept's probes are split (:meth:`Concept.split`, ``split_seed``): the eraser, its
    tuner and the trace see only the tuning part; ``target_accuracy`` is on the other part,
    as are the adversarial framings, relearning and patching figures (``target_tuned_accuracy``
    is the tuning part, for comparison). ``split_seed=None`` tunes and reports on every probe
    (the report says so). ``unedited``, a dict kept by the caller across runs on one model,
    holds the unedited model's figures so the methods compared on a concept and split measure
    them once."""
    start = time.perf_counter()
    s = _Setting.of(lm, concept, split_seed)
    memo = {} if unedited is None else unedited
    model_concept = (lm.fingerprint(), json.dumps(concept.to_dict(), sort_keys=True))

    def once(key: tuple, compute: Any) -> Any:
        if (model_concept, *key) not in memo:
            memo[(model_concept, *key)] = compute()
        return memo[(model_concept, *key)]

    pre = dict(once(("pre", split_seed), s.figures))
    if pre["target_accuracy"] == 0:
        raise ConceptError(f"the model answers none of {concept.name!r}'s held-out probes "
                           "before erasure: there is nothing to erase; check the probes")
    # the unedited model under the same relearning: what "fully recovered" looks like
    reference = once(("relearn", relearn_steps, relearn_lr),  # all probes: no split
                     lambda: E.relearn_heldout(lm, concept.probes, steps=relearn_steps,
                                               lr=relearn_lr))
    if eraser is None:
        eraser = make_eraser(method, layers=layers, **settings)
    t = time.perf_counter()
    delta: WeightDelta = eraser.erase(lm, s.tuned)  # returned, not applied: weights unchanged
    erase_s = time.perf_counter() - t
    trace_ids = _trace(s, eraser, trace_vectors, once, ("trace", split_seed, trace_vectors))
    after = _erased(s, delta, trace_ids, relearn_steps, relearn_lr)
    cosines = after["cosines"]
    report = {
        "method": method, "concept": concept.name, "pre": pre, "post": after["post"],
        "split": {"seed": split_seed, "tuned_probes": len(s.tuned.probes),
                  "held_out_probes": len(s.held),
                  "reported_on": "every probe (no split)" if split_seed is None else
                  "the held-out probes (target, adversarial, relearning, patching) and the "
                  "paraphrases; the tuner saw only the tuning probes"},
        "relearn": {"target_accuracy": after["relearned"], "steps": relearn_steps,
                    "heldout": {**after["heldout"], "unedited": reference["target_accuracy"]}},
        "adversarial": {"target_accuracy": max(after["adversarial"].values()),
                        **after["adversarial"]},
        "trace": {"concept_vector_cosine": sum(cosines) / len(cosines) if cosines else None,
                  "coefficient_patch_accuracy": after["patched"],
                  "vectors": [list(v) for v in trace_ids]},
        "delta": {"params": len(delta.entries), "norm": delta.norm(),
                  "setting": _chosen_setting(delta)},
        "perplexity_worst_rise": E.worst_rise(pre["paragraph_perplexity"],
                                              after["post"]["paragraph_perplexity"]),
        "erase_seconds": erase_s,
        "seconds": time.perf_counter() - start,
    }
    if out is not None:
        with atomic_dir(out) as tmp:
            delta.save(Path(tmp) / "delta")
            (Path(tmp) / "report.json").write_text(json.dumps(report, indent=1))
            html_report(report, lm.label).write(Path(tmp) / "report.html")
    return report


def html_report(report: dict[str, Any], model: str) -> Report:
    """The erasure report as a self-contained ``report.html``."""
    shown = (("held-out probes", "target_accuracy"), ("tuning probes", "target_tuned_accuracy"),
             ("paraphrases", "paraphrase_accuracy"), ("controls", "control_accuracy"),
             ("unseen controls", "unseen_control_accuracy"),
             ("near controls (held-out half)", "near_control_accuracy"),
             ("perplexity (neutral text, held-out half)", "perplexity"))
    return Report(
        title=f"{report['method']} erasure of {report['concept']!r} on {model}",
        note=f"reported on {report['split']['reported_on']}",
        params={"method": report["method"], "concept": report["concept"],
                "split seed": report["split"]["seed"], **report["delta"]["setting"],
                "seconds": report["seconds"]},
        tables=[Table("Behaviour before and after", ["", "before", "after"],
                      [[label, report["pre"].get(key), report["post"].get(key)]
                       for label, key in shown])],
        text=report_lines(report, model))


def report_lines(report: dict[str, Any], model: str) -> list[str]:
    """A :func:`run_erasure` report as text lines (what ``engram erase`` prints)."""
    pre, post = report["pre"], report["post"]
    setting = ", ".join(f"{k} {v}" for k, v in report["delta"]["setting"].items())
    split = report["split"]
    lines = [f"{report['method']} erasure of {report['concept']!r} on {model} "
             f"({report['erase_seconds']:.1f} s{'; ' + setting if setting else ''})",
             f"tuned on {split['tuned_probes']} probes, reported on "
             + ("the same probes (--no-split)" if split["seed"] is None else
                f"the other {split['held_out_probes']} (split seed {split['seed']})"),
             f"{'':<10}{'held-out':>9}{'tuned':>7}{'paraphr.':>10}{'controls':>10}"
             f"{'unseen':>8}{'near':>8}{'perplexity':>12}"]
    for name, r in (("before", pre), ("after", post)):
        unseen, near = r["unseen_control_accuracy"], r.get("near_control_accuracy")
        lines.append(f"{name:<10}{r['target_accuracy']:>9.3f}{r['target_tuned_accuracy']:>7.3f}"
                     f"{r['paraphrase_accuracy']:>10.3f}"
                     f"{r['control_accuracy']:>10.3f}"
                     f"{'-' if unseen is None else f'{unseen:.3f}':>8}"
                     f"{'-' if near is None else f'{near:.3f}':>8}{r['perplexity']:>12.2f}")
    tr = report["trace"]
    cos = tr["concept_vector_cosine"]
    lines += [f"worst single paragraph perplexity rise {report['perplexity_worst_rise']:+.1%}",
              f"adversarial (best framing) {report['adversarial']['target_accuracy']:.3f}; "
              f"after relearning {report['relearn']['target_accuracy']:.3f}",
              "relearning on half the facts, the other half: {before:.3f} -> "
              "{target_accuracy:.3f} (unedited model: {unedited:.3f})".format(
                  **report["relearn"]["heldout"]),
              f"inside: concept-vector cosine {'-' if cos is None else f'{cos:.3f}'}, "
              f"coefficient patching {tr['coefficient_patch_accuracy']:.3f}"]
    return lines
