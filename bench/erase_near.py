"""How specific is concept-vector erasure? Its tuning grid scored on the near controls. Prints JSON.

The tuner (``ConceptVectors``) keeps the *other bundled concepts'* probes within 10 points, but
never sees the concept's near controls (the same kind of fact about its neighbours: other
capitals for Paris). For each concept this scores every grid point the tuner can choose
(selection × top_k × damping) on the concept's probes, its near controls and its controls, and
reports the strongest erasure inside the control budget (what the tuner picked before near
controls entered its budget, up to its perplexity check) next to the strongest that also keeps
``--near-keep`` of the near controls. Each point also carries the two halves' accuracies
(``near_tune``: what the tuner now checks; ``near_eval``: what reports show).

    .venv/bin/python bench/erase_near.py --concepts "Paris,Japan" [--near-keep 0.9] [--out F]
        [--png F]   # per concept: concept accuracy against near-control accuracy, every point
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import engramlab as eg
from engramlab.data.concepts import controls_for, general_text, get_concept
from engramlab.erase.budget import Budget
from engramlab.erase.concept_vectors import ConceptVectors, find_concept_vectors, vectors_delta
from engramlab.erase.vectors import vector_evidence
from engramlab.evaluate import erasure as E


def grid(lm: eg.LM, name: str, cv: ConceptVectors) -> tuple[float, list[dict]]:
    """The unedited model's control accuracy, and every grid point's scores."""
    concept = get_concept(name)
    if not concept.near_controls:
        raise SystemExit(f"{name!r} has no near controls")
    controls = controls_for(concept)
    evidence = vector_evidence(lm, concept, controls, None, neutral=general_text(split="tune"))
    rows = []
    for selection in cv.selections:
        found = find_concept_vectors(lm, concept, controls=controls,
                                     n_candidates=max(cv.n_candidates, *cv.top_ks),
                                     selection=selection, check=False, evidence=evidence)
        for k in cv.top_ks:
            for damping in cv.dampings:
                delta = vectors_delta(lm, [(v.layer, v.index) for v in found[:k]],
                                      damping=damping)
                with delta.applied(lm):
                    # one pass over the near controls, shared out to Concept.near's halves
                    hit = dict(zip(concept.near_controls,
                                   E.probe_hits(lm, concept.near_controls), strict=True))
                    rows.append({"selection": selection, "top_k": k, "damping": damping,
                                 "target": E.accuracy(lm, concept.probes),
                                 "near": _share([hit[p] for p in concept.near("all")]),
                                 "near_tune": _share([hit[p] for p in concept.near("tune")]),
                                 "near_eval": _share([hit[p] for p in concept.near("eval")]),
                                 "control": E.accuracy(lm, controls)})
    return E.accuracy(lm, controls), rows


def _share(hits: list[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


def tradeoff_png(out: dict, path: str, budget: Budget) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(out["concepts"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        res = out["concepts"][name]
        for ok, colour, label in ((True, "tab:blue", "controls within budget"),
                                  (False, "tab:gray", "over the control budget")):
            pts = [r for r in res["grid"]
                   if budget.keeps_controls(res["control_before"], r["control"]) == ok]
            ax.scatter([r["target"] for r in pts], [r["near"] for r in pts], s=14, c=colour,
                       alpha=0.7, label=label)
        ax.axhline(out["near_keep"], ls=":", c="k", lw=0.8)
        ax.set(title=name, xlabel="concept accuracy after erasure (lower: erased)",
               ylabel="near-control accuracy", xlim=(-0.05, 1.05), ylim=(-0.05, 1.05))
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Concept vectors: every grid point of the tuner, scored on near controls")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--concepts", default="Paris")
    ap.add_argument("--near-keep", type=float, default=0.9)
    ap.add_argument("--out", default=None)
    ap.add_argument("--png", default=None)
    args = ap.parse_args()
    lm = eg.load_model(args.model, progress=False)
    cv = ConceptVectors()  # its grid and budget
    budget = Budget(cv.budget.max_control_drop, cv.budget.max_perplexity_rise)
    out: dict = {"model": lm.name, "near_keep": args.near_keep,
                 "max_control_drop": cv.budget.max_control_drop, "concepts": {}}
    for name in [c.strip() for c in args.concepts.split(",") if c.strip()]:
        start = time.perf_counter()
        base, rows = grid(lm, name, cv)
        within = [r for r in rows if budget.keeps_controls(base, r["control"])]
        keeping = [r for r in within if r["near"] >= args.near_keep - 1e-9]
        out["concepts"][name] = {
            "control_before": base,
            "best_within_controls": min(within, key=lambda r: r["target"]) if within else None,
            "best_keeping_near": min(keeping, key=lambda r: r["target"]) if keeping else None,
            "grid": rows, "seconds": time.perf_counter() - start}
        best = out["concepts"][name]
        print(name, json.dumps(best["best_within_controls"]), json.dumps(best["best_keeping_near"]),
              flush=True, file=sys.stderr)
    text = json.dumps(out, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    if args.png:
        tradeoff_png(out, args.png, budget)


if __name__ == "__main__":
    main()
