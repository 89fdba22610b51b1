"""MLP specialisation: how much a concept depends on value vectors of its own.

After Hong et al. 2025, who compare twenty LLMs by how specialised their MLP parameters are:
mask the value vectors most relevant to a concept and compare the relative accuracy drop on that
concept's questions with the relative drop on questions about everything else,

    PSS = (acc_c − acc_c^masked) / acc_c − (acc_g − acc_g^masked) / acc_g

Positive: the masked vectors serve this concept more than the rest of the model's knowledge;
0: masking them costs both alike (or nothing: vectors that are zero already). Normalising by
each accuracy lets models that know different amounts be compared.

How it is measured here, so that no figure is read on what chose the vectors:

* the concept's probes are split (:meth:`~engramlab.data.Concept.split`); the ``top_k`` vectors
  are ranked on the tuning half (:func:`~engramlab.erase.find_concept_vectors`, ``selection``,
  without the ablation check) and acc_c is read on the held-out half;
* acc_g is read on the other bundled concepts' paraphrases, which the ranking never sees (the
  ranking contrasts with their probes); a concept file with its own controls gives the ranking
  the even ones and reads acc_g on the odd ones;
* masking the same number of random value vectors from the same layers gives the score a
  baseline (``random_pss``, mean over ``random_draws`` draws).

Deviations: the relevance ranking is this toolkit's activation ranking of concept vectors and
the question sets are the bundled concepts, not the paper's benchmarks.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..data.concepts import Concept, Probe, controls_for, unseen_controls_for
from ..erase.concept_vectors import find_concept_vectors, vectors_delta
from ..errors import ConceptError
from ..evaluate.erasure import accuracy
from ..models.lm import LM


def _relative_drop(before: float, after: float) -> float:
    return (before - after) / before if before > 0 else math.nan


def masked_pss(lm: LM, vectors: Sequence[tuple[int, int]], concept_probes: Sequence[Probe],
               general: Sequence[Probe], before: tuple[float, float] | None = None
               ) -> dict[str, float]:
    """The accuracies with ``vectors`` (layer, index) zeroed and the score they give, against
    ``before`` (the two accuracies of the model as it is; read when not given)."""
    if before is None:
        before = accuracy(lm, concept_probes), accuracy(lm, general)
    with vectors_delta(lm, vectors, damping=0.0).applied(lm):
        after = accuracy(lm, concept_probes), accuracy(lm, general)
    drop_c, drop_g = _relative_drop(before[0], after[0]), _relative_drop(before[1], after[1])
    return {"concept_after": after[0], "general_after": after[1], "concept_drop": drop_c,
            "general_drop": drop_g, "pss": drop_c - drop_g}


def specialisation(lm: LM, concept: Concept, *, top_k: int = 16, split_seed: int = 0,
                   selection: str = "activation", layers: Sequence[int] | None = None,
                   random_draws: int = 3, seed: int = 0) -> dict[str, Any]:
    """One concept's parameter specialisation score (see the module docstring)."""
    if top_k < 1:
        raise ConceptError(f"top_k must be at least 1, got {top_k}")
    tuned, held = concept.split(split_seed)
    if concept.controls:
        ranking_controls, general = concept.controls[0::2], concept.controls[1::2]
    else:
        ranking_controls, general = controls_for(concept), unseen_controls_for(concept)
    if not general:
        raise ConceptError(f"no questions about anything else to compare {concept.name!r} "
                           "with: give the concept at least two controls")
    before = accuracy(lm, held), accuracy(lm, general)
    if before[0] == 0:
        raise ConceptError(f"the model answers none of {concept.name!r}'s held-out probes: "
                           "there is no knowledge of it to mask")
    found = find_concept_vectors(lm, tuned, layers=layers, controls=ranking_controls,
                                 n_candidates=top_k, selection=selection, check=False)
    vectors = [(c.layer, c.index) for c in found[:top_k]]
    out: dict[str, Any] = {"concept": concept.name, "top_k": len(vectors),
                           "selection": selection, "split_seed": split_seed,
                           "held_out_probes": len(held), "general_probes": len(general),
                           "concept_before": before[0], "general_before": before[1],
                           **masked_pss(lm, vectors, held, general, before),
                           "vectors": [list(v) for v in vectors]}
    gen = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(random_draws):
        rand = [(layer, int(torch.randint(lm.layout.d_mlp, (1,), generator=gen)))
                for layer, _ in vectors]  # as many per layer as the concept's
        draws.append(masked_pss(lm, rand, held, general, before)["pss"])
    out["random_pss"] = statistics.fmean(draws) if draws else None
    return out


def specialisation_table(lm: LM, concepts: Sequence[Concept], **kw: Any) -> dict[str, Any]:
    """:func:`specialisation` for each concept, and the mean and spread over them."""
    rows = [specialisation(lm, c, **kw) for c in concepts]
    scores = [r["pss"] for r in rows if not math.isnan(r["pss"])]
    randoms = [r["random_pss"] for r in rows if r["random_pss"] is not None]
    return {"model": lm.name, "concepts": rows,
            "mean_pss": statistics.fmean(scores) if scores else None,
            "sd_pss": statistics.stdev(scores) if len(scores) > 1 else None,
            "mean_random_pss": statistics.fmean(randoms) if randoms else None}


def specialisation_lines(table: dict[str, Any]) -> list[str]:
    """The table as text (what ``engram specialise`` prints)."""
    lines = [f"{table['model']}: MLP specialisation (mask each concept's top value vectors)",
             f"{'concept':<22}{'k':>4}{'concept':>9}{'general':>9}{'PSS':>8}{'random':>8}"]
    for r in table["concepts"]:
        lines.append(f"{r['concept']:<22}{r['top_k']:>4}{r['concept_drop']:>9.2f}"
                     f"{r['general_drop']:>9.2f}{r['pss']:>8.2f}{r['random_pss']:>8.2f}")
    if table["mean_pss"] is not None:
        sd = table["sd_pss"]
        lines.append(f"mean PSS {table['mean_pss']:.2f}" + (f" ± {sd:.2f}" if sd else "")
                     + f" (random vectors {table['mean_random_pss']:.2f})")
    return lines


def plot_specialisation(table: dict[str, Any], out: str | Path, title: str = "") -> Path:
    """Each concept's score beside masking as many random vectors, as bars."""
    from ..figures import figure

    rows = table["concepts"]
    with figure(out, figsize=(max(5.5, 0.6 * len(rows) + 2), 4)) as (_, ax):
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["pss"] for r in rows], width=0.4, label="top vectors")
        ax.bar([i + 0.2 for i in x], [r["random_pss"] or 0 for r in rows], width=0.4,
               label="random vectors")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(list(x), [r["concept"] for r in rows], rotation=45, ha="right")
        ax.set(ylabel="PSS (concept drop − general drop)",
               title=title or f"{table['model']}: MLP specialisation")
        ax.legend()
    return Path(out)
