"""Concept erasure, every method on the same concepts: behaviour, what is left inside, cost.

Prints one JSON object: per concept and method the ``run_erasure`` report (accuracies before and
after, paraphrases, controls, perplexity, adversarial framings, relearning, concept-vector
cosine, coefficient patching), seconds per concept, per-method means over
the concepts (``summary``), the time to sample the ``features`` method's SAE corpus and to train
its per-layer MLP-output SAEs (once per model, cached, shared by all concepts; an empty
``ENGRAMLAB_CACHE`` measures it cold) and peak RSS. With ``--png`` it also draws the concept-vectors
trade-off curve (concept accuracy against control accuracy and perplexity over its tuning grid).

    .venv/bin/python bench/erase.py [--concepts "Harry Potter"] [--methods concept-vectors,ga]
        [--out docs/results/erase_smollm2_cpu.json] [--png docs/results/erase_tradeoff.png]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import engramlab as eg
from engramlab._io import atomic_file
from engramlab.data import get_concept
from engramlab.erase.concept_vectors import ConceptVectors
from engramlab.erase.features import FeatureEraser
from engramlab.erase.run import METHODS, make_eraser, run_erasure


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def tradeoff_png(trials: dict[str, list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in trials.items():
        t = [r["target_accuracy"] for r in rows]
        axes[0].scatter([r["control_accuracy"] for r in rows], t, label=name)
        axes[1].scatter([r["perplexity"] for r in rows], t, label=name)
    axes[0].set_xlabel("control accuracy")
    axes[1].set_xlabel("perplexity on neutral text (tuning half)")
    for ax in axes:
        ax.set_ylabel("concept accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("concept vectors: top_k × damping grid")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summary(result: dict) -> dict:
    """Per method, the mean over concepts of each headline figure (concepts where the method
    raised are counted in ``failed``)."""
    keys = {
        "pre_target": lambda r: r["pre"]["target_accuracy"],
        "post_target": lambda r: r["post"]["target_accuracy"],
        "post_paraphrase": lambda r: r["post"]["paraphrase_accuracy"],
        "control_drop": lambda r: r["pre"]["control_accuracy"] - r["post"]["control_accuracy"],
        "unseen_control_drop": lambda r: None if r["post"].get("unseen_control_accuracy")
        is None else r["pre"]["unseen_control_accuracy"] - r["post"]["unseen_control_accuracy"],
        "near_control_drop": lambda r: None if r["post"].get("near_control_accuracy")
        is None else r["pre"]["near_control_accuracy"] - r["post"]["near_control_accuracy"],
        "near_tune_drop": lambda r: None if r["post"].get("near_control_tune_accuracy")
        is None else r["pre"]["near_control_tune_accuracy"]
        - r["post"]["near_control_tune_accuracy"],
        "kind_drop": lambda r: None if r["post"].get("kind_accuracy") is None
        else r["pre"]["kind_accuracy"] - r["post"]["kind_accuracy"],
        "worst_paragraph_rise": lambda r: r.get("perplexity_worst_rise"),
        "perplexity_rise": lambda r: r["post"]["perplexity"] / r["pre"]["perplexity"] - 1,
        "adversarial": lambda r: r["adversarial"]["target_accuracy"],
        "relearn_paragraph": lambda r: r["relearn"]["target_accuracy"],
        "heldout_before": lambda r: r["relearn"].get("heldout", {}).get("before"),
        "heldout_after": lambda r: r["relearn"].get("heldout", {}).get("target_accuracy"),
        "heldout_unedited": lambda r: r["relearn"].get("heldout", {}).get("unedited"),
        "vector_cosine": lambda r: r["trace"]["concept_vector_cosine"],
        "coefficient_patch": lambda r: r["trace"]["coefficient_patch_accuracy"],
        "erase_seconds": lambda r: r["erase_seconds"],
    }
    methods: dict[str, dict] = {}
    for per in result["concepts"].values():
        for method, r in per.items():
            m = methods.setdefault(method, {"concepts": 0, "failed": 0,
                                            **{k: [] for k in keys}})
            if "error" in r:
                m["failed"] += 1
                continue
            m["concepts"] += 1
            for k, f in keys.items():
                m[k].append(f(r))
    return {method: {k: (_mean(v) if isinstance(v, list) else v) for k, v in m.items()}
            for method, m in methods.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--concepts", default="Harry Potter")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--relearn-steps", type=int, default=10)
    ap.add_argument("--split-seed", type=int, default=0,
                    help="which half of each concept's probes the tuners see (the other half "
                         "is scored)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--png", default=None)
    args = ap.parse_args()

    lm = eg.load_model(args.model, progress=False)
    result: dict = {"model": lm.name, "concepts": {}}
    saes = None
    if "features" in args.methods.split(","):
        # the disentangler is trained once per model (and cached): its time is reported
        # apart, and counted in no concept's seconds. Cached parts (the sampled corpus, SAEs
        # of an earlier run) make this figure small; ENGRAMLAB_CACHE=<empty dir> measures it.
        t = time.perf_counter()
        fitter = FeatureEraser()  # its corpus and SAE settings: exactly what erase would use
        corpus = fitter.corpus(lm, progress=False)
        result["corpus_seconds"] = time.perf_counter() - t
        saes = fitter.fit_saes(lm, corpus, progress=False)
        result["dictionary_seconds"] = time.perf_counter() - t - result["corpus_seconds"]
    trials: dict[str, list[dict]] = {}
    for name in args.concepts.split(","):
        concept = get_concept(name.strip())
        per: dict = {}
        for method in args.methods.split(","):
            settings = {}
            if method == "concept-vectors":
                eraser = ConceptVectors()
                settings["eraser"] = eraser
            elif method == "features":
                settings["eraser"] = FeatureEraser(saes=saes)
            else:  # the fine-tuning baselines, tuned under the same budget
                settings["eraser"] = make_eraser(method)
            t = time.perf_counter()
            try:
                report = run_erasure(lm, concept, method, relearn_steps=args.relearn_steps,
                                     split_seed=args.split_seed, **settings)
            except eg.EngramError as exc:  # a method that finds nothing is a result too
                per[method] = {"error": str(exc)}
            else:
                report["wall_seconds"] = time.perf_counter() - t
                report["tuning"] = getattr(settings["eraser"], "trials", [])
                if method == "concept-vectors":
                    trials[concept.name] = eraser.trials
                per[method] = report
                print(f"{concept.name} {method}: post {report['post']} "
                      f"({report['erase_seconds']:.1f} s)", file=sys.stderr, flush=True)
            result["concepts"][concept.name] = per
            result["summary"] = summary(result)
            result["peak_rss_mb"] = peak_rss_mb()
            if args.out:  # after every method: a long run cut short keeps what it finished
                with atomic_file(args.out) as tmp:
                    tmp.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    if args.png and trials:
        tradeoff_png(trials, args.png)


if __name__ == "__main__":
    main()
