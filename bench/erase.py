"""Concept erasure, every method on the same concepts and the same probe splits.

For each concept, method and split seed, ``run_erasure`` tunes on one half of the concept's
probes and reports the other half (and the paraphrases, which no tuner sees). The run folder's
``result.json`` holds every report (``parts``), per method the mean over concepts with its
spread over the split seeds (``summary``: mean, sd over seeds of the per-seed mean, and the
range over concepts), and per concept the mean and sd over seeds (``per_concept``). Means are
over the concepts on which every method of the run finished for that seed, so no method is
averaged over easier concepts than another. Beside it, ``recovery.png`` (per method, every
held-out figure with its spread over seeds) and ``concepts.png`` (held-out probes and
paraphrases per concept and method).

Methods: ``concept-vectors`` (its tuner picks among the activation, answer and distinct
rankings), ``concept-vectors:vocab`` (Hong et al.'s own selection: vocabulary projection of the
value vectors onto the concept's tokens), ``features``, ``ga``, ``npo``, ``rmu`` (all three MLP
matrices) and ``rmu:down`` (down projections only, as the WMDP reference code).
``--concepts`` takes bundled names, ``all``, or paths to concept files of your own.

The run is saved after every part and resumes: parts already in the run folder are kept (a
changed setting needs ``--fresh``). Long: all seven methods on one concept and seed take
11-30 minutes of one CPU core (the fastest parts, and the median of parts that shared two cores
with two or three other jobs), so three seeds of the eleven bundled concepts take 6-17 hours of one
core; the SAEs of ``features`` take about 25 minutes once per model.

    .venv/bin/python bench/erase.py --concepts all --seeds 0,1,2 --save erase/smollm2_cpu
        [--methods concept-vectors,ga] [--markdown]
    .venv/bin/python bench/erase.py --table erase/smollm2_cpu   # a saved run's table, no model
    .venv/bin/python bench/erase.py --plot erase/smollm2_cpu    # redraw its figures, no model
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import engramlab as eg
import entry
from engramlab.data import get_concept, load_concept
from engramlab.data.concepts import Concept, bundled_concepts
from engramlab.erase.concept_vectors import ConceptVectors
from engramlab.erase.features import FeatureEraser
from engramlab.erase.run import make_eraser, run_erasure
from results import (
    drop_saved,
    mean_sd,
    merged,
    run_folder,
    run_lock,
    save_run,
    saved_parts,
    saved_result,
    share_spec,
)

METHODS = ("concept-vectors", "concept-vectors:vocab", "features", "ga", "npo", "rmu",
           "rmu:down")


def _drop(key: str) -> Callable[[dict], float | None]:
    def f(r: dict) -> float | None:
        if r["pre"].get(key) is None or r["post"].get(key) is None:
            return None
        return r["pre"][key] - r["post"][key]
    return f


# what each report contributes to the summary (held-out figures unless the name says tuned)
FIGURES: dict[str, Callable[[dict], float | None]] = {
    "pre_target": lambda r: r["pre"]["target_accuracy"],
    "post_target": lambda r: r["post"]["target_accuracy"],
    "post_target_tuned": lambda r: r["post"].get("target_tuned_accuracy"),
    "pre_paraphrase": lambda r: r["pre"]["paraphrase_accuracy"],
    "post_paraphrase": lambda r: r["post"]["paraphrase_accuracy"],
    # the share of concepts whose held-out probes the erasure at least halved
    "halved": lambda r: float(r["post"]["target_accuracy"] <= r["pre"]["target_accuracy"] / 2),
    "control_drop": _drop("control_accuracy"),
    "unseen_control_drop": _drop("unseen_control_accuracy"),
    "near_control_drop": _drop("near_control_accuracy"),
    "near_tune_drop": _drop("near_control_tune_accuracy"),
    "kind_drop": _drop("kind_accuracy"),
    "perplexity_rise": lambda r: r["post"]["perplexity"] / r["pre"]["perplexity"] - 1,
    "worst_paragraph_rise": lambda r: r.get("perplexity_worst_rise"),
    "adversarial": lambda r: r["adversarial"]["target_accuracy"],
    "relearn_paragraph": lambda r: r["relearn"]["target_accuracy"],
    "heldout_after_relearn": lambda r: r["relearn"]["heldout"].get("target_accuracy"),
    "vector_cosine": lambda r: r["trace"]["concept_vector_cosine"],
    "coefficient_patch": lambda r: r["trace"]["coefficient_patch_accuracy"],
    "erase_seconds": lambda r: r["erase_seconds"],
}

# the columns of the markdown table, in order
SHOWN = {"post_target": "held-out probes", "post_paraphrase": "paraphrases",
         "halved": "share halved",
         "post_target_tuned": "tuned probes", "control_drop": "control drop",
         "near_control_drop": "near drop (unseen half)", "perplexity_rise": "ppl rise",
         "adversarial": "adversarial", "relearn_paragraph": "relearn",
         "coefficient_patch": "coef. patch", "erase_seconds": "erase s"}


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarise(parts: dict, methods: list[str], seeds: list[int]) -> tuple[dict, dict]:
    """Per method: each figure's mean over seeds of the mean over the concepts every method
    finished for that seed, the sd of those per-seed means, and the range over (concept,
    seed); per concept and method: mean and sd over seeds."""
    shared = {seed: [c for c, per in parts.items()  # concepts every method finished
                     if all("error" not in per.get(m, {}).get(str(seed), {"error": 1})
                            for m in methods)] for seed in seeds}
    summary: dict = {}
    for method in methods:
        row: dict = {}
        for name, f in FIGURES.items():
            per_seed, values = [], []
            for seed in seeds:
                got = [v for c in shared[seed]
                       if (v := f(parts[c][method][str(seed)])) is not None]
                values += got
                if got:
                    per_seed.append(sum(got) / len(got))
            row[name] = {"mean": _mean(per_seed),
                         "seed_sd": statistics.stdev(per_seed) if len(per_seed) > 1 else None,
                         "min": min(values) if values else None,
                         "max": max(values) if values else None}
        row["seeds"] = len([s for s in seeds if any(
            str(s) in per.get(method, {}) for per in parts.values())])
        row["failed"] = sum("error" in r for per in parts.values()
                            for r in per.get(method, {}).values())
        summary[method] = row
    per_concept: dict = {}
    for concept, per in parts.items():
        per_concept[concept] = {}
        for method, by_seed in per.items():
            ok = [r for r in by_seed.values() if "error" not in r]
            figures = {}
            for name in ("post_target", "post_paraphrase", "control_drop",
                         "near_control_drop", "perplexity_rise"):
                vs = [v for r in ok if (v := FIGURES[name](r)) is not None]
                figures[name] = mean_sd(vs)
            per_concept[concept][method] = {"seeds": len(ok), **figures}
    return summary, per_concept


def markdown(summary: dict) -> str:
    """The summary as a table: mean ± sd over split seeds."""
    def cell(v: dict) -> str:
        if v["mean"] is None:
            return "–"
        sd = f" ± {v['seed_sd']:.2f}" if v["seed_sd"] is not None else ""
        fmt = ".0f" if abs(v["mean"]) >= 10 else ".2f"
        return f"{v['mean']:{fmt}}{sd}"

    lines = ["| method | seeds | " + " | ".join(SHOWN.values()) + " |",
             "|---|---|" + "---|" * len(SHOWN)]
    for method, row in summary.items():
        lines.append(f"| {method} | {row['seeds']} | "
                     + " | ".join(cell(row[k]) for k in SHOWN) + " |")
    return "\n".join(lines)


# what stays of the concept and what comes back, per method (every one held out)
RECOVERY = {"post_target": "held-out probes", "post_paraphrase": "paraphrases",
            "adversarial": "adversarial framings", "relearn_paragraph": "relearned on paragraph",
            "heldout_after_relearn": "other half after relearning half",
            "coefficient_patch": "unedited coefficients patched in"}


def plot(saved: dict, folder: Path) -> list[Path]:
    """From a run's ``summary`` and ``per_concept``: ``recovery.png``, per method, each
    held-out figure's mean over split seeds (bars: ± sd over the seeds); ``concepts.png``,
    held-out probes and paraphrases per concept and method (mean over seeds). Returns the files
    written."""
    import numpy as np

    from engramlab.figures import figure

    summary, per_concept = saved["summary"], saved["per_concept"]
    methods = list(summary)
    model = saved.get("model", "")
    with figure(folder / "recovery.png", figsize=(11, 4.2)) as (_, ax):
        width = 0.8 / len(RECOVERY)
        x = np.arange(len(methods))
        for k, (key, label) in enumerate(RECOVERY.items()):
            means = [summary[m][key]["mean"] for m in methods]
            sds = [summary[m][key]["seed_sd"] or 0.0 for m in methods]
            ax.bar(x + (k - (len(RECOVERY) - 1) / 2) * width,
                   [np.nan if v is None else v for v in means], width, yerr=sds, capsize=2,
                   label=label)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(x, methods, rotation=15)
        ax.set_ylim(0, 1.1)
        ax.set_ylabel("accuracy on the concept (unedited: 1.0)")
        ax.set_title(f"{model}: what stays after erasure and what comes back "
                     f"(mean over concepts, ± sd over {len(saved['seeds'])} split seeds)",
                     fontsize=10)
        ax.legend(fontsize=7, ncol=3, loc="upper left")
    concepts = list(per_concept)
    with figure(folder / "concepts.png", ncols=2,
                figsize=(12, 1.2 + 0.42 * len(concepts))) as (_, axes):
        for ax, key, label in zip(axes, ("post_target", "post_paraphrase"),
                                  ("held-out probes", "paraphrases"), strict=True):
            grid = np.full((len(concepts), len(methods)), np.nan)
            for i, c in enumerate(concepts):
                for j, m in enumerate(methods):
                    v = per_concept[c].get(m, {}).get(key, {}).get("mean")
                    grid[i, j] = np.nan if v is None else v
            ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            for (i, j), v in np.ndenumerate(grid):  # blank: the method found no setting
                ax.text(j, i, "none" if np.isnan(v) else f"{v:.2f}", ha="center",
                        va="center", fontsize=7, color="white" if v < 0.5 else "black")
            ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right", fontsize=8)
            ax.set_yticks(range(len(concepts)), concepts, fontsize=8)
            ax.set_title(f"{label} after erasure (mean over split seeds)", fontsize=10)
    return [folder / "recovery.png", folder / "concepts.png"]


def eraser_for(method: str, saes: dict | None):
    name, _, variant = method.partition(":")
    if name == "concept-vectors":
        return ConceptVectors(selections=("vocab",)) if variant == "vocab" else ConceptVectors()
    if name == "features":
        return FeatureEraser(saes=saes)
    return make_eraser(name, **({"weights": "down"} if variant == "down" else {}))


def concepts_of(spec: str) -> list[Concept]:
    if spec == "all":
        return bundled_concepts()
    out = []
    for item in (s.strip() for s in spec.split(",")):
        out.append(load_concept(item) if Path(item).suffix == ".json" else get_concept(item))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--concepts", default="all",
                    help="'all' (the bundled concepts), names, or concept .json files")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2", help="split seeds: which probes tune")
    ap.add_argument("--relearn-steps", type=int, default=10)
    ap.add_argument("--save", default=None, help="AREA/RUN under docs/results/")
    ap.add_argument("--table", default=None,
                    help="AREA/RUN: print a saved run's summary as a table and run nothing")
    ap.add_argument("--fresh", action="store_true", help="drop the parts already saved")
    ap.add_argument("--share", type=share_spec, default=(0, 1), metavar="I/N",
                    help="run the I-th (from 0) of N shares of the concepts, beside N-1 other "
                         "processes on the same --save (each merges its parts under a lock)")
    ap.add_argument("--markdown", action="store_true", help="print the summary as a table")
    ap.add_argument("--plot", default=None,
                    help="AREA/RUN: draw a saved run's figures into its folder and run nothing")
    args = ap.parse_args()
    if args.plot:
        folder = run_folder(*args.plot.partition("/")[::2])
        if not (folder / "result.json").is_file():
            print(f"erase: error: no saved run at {folder}; --plot takes AREA/RUN",
                  file=sys.stderr)
            return 2
        for path in plot(json.loads((folder / "result.json").read_text()), folder):
            print(path, file=sys.stderr)
        return 0
    if args.table:
        path = run_folder(*args.table.partition("/")[::2]) / "result.json"
        if not path.is_file():
            print(f"erase: error: no saved run at {path}; --table takes AREA/RUN",
                  file=sys.stderr)
            return 2
        saved = json.loads(path.read_text())
        print(markdown(summarise(saved["parts"], saved["methods"], saved["seeds"])[0]))
        return 0
    if args.save is None:
        print("erase: error: --save AREA/RUN is required (or --table AREA/RUN)",
              file=sys.stderr)
        return 2
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or args.save.count("/") != 1:
        print(f"erase: error: unknown methods {unknown}; choose from {METHODS}" if unknown
              else "erase: error: --save takes AREA/RUN, e.g. erase/smollm2_cpu",
              file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",")]
    concepts = concepts_of(args.concepts)
    area, run = args.save.split("/")
    params = {k: v for k, v in vars(args).items()
              if k not in ("save", "fresh", "markdown", "share")}

    parts = saved_parts("erase", area, run, params, ("model", "relearn_steps"), "parts",
                        args.fresh)
    if parts is None:
        return 2
    result: dict = {"model": args.model, "params": params, "methods": methods, "seeds": seeds,
                    "parts": parts, "timing": {}}
    index, shares = args.share  # a share is whole concepts: their unedited figures are reused
    todo = [(c, m, s) for s in seeds for k, c in enumerate(concepts) for m in methods
            if k % shares == index and str(s) not in parts.get(c.name, {}).get(m, {})]
    print(f"erase: {len(todo)} runs to do ({len(concepts)} concepts × {len(methods)} methods × "
          f"{len(seeds)} seeds, {sum(len(b) for p in parts.values() for b in p.values())} "
          "saved)", file=sys.stderr, flush=True)
    lm = eg.load_model(args.model, progress=False) if todo else None
    saes = None
    if todo and "features" in methods:
        # the SAEs are trained once per model (and cached): their time is reported apart
        t = time.perf_counter()
        fitter = FeatureEraser()
        # a concept outside the bundle brings its own topical text, and so its own SAEs
        corpus = fitter.corpus(lm, [c.name for c in concepts], progress=True)
        saes = fitter.fit_saes(lm, corpus, progress=True)
        result["timing"]["dictionary_seconds"] = time.perf_counter() - t

    unedited: dict = {}  # the unedited model's figures, measured once per concept and split

    def publish(mine: dict) -> None:
        """Save the run with ``mine`` merged into the parts on disk, which other shares may
        have added to since."""
        with run_lock(area, run):
            on_disk = saved_result(area, run)
            parts = merged(on_disk.get("parts", {}), mine)
            result["parts"] = parts
            result["summary"], result["per_concept"] = summarise(parts, methods, seeds)
            # each part carries its process's peak; the run's is the largest of them, so a
            # process that only re-summarises does not report its own small one
            peaks = [r["peak_rss_mb"] for per in parts.values() for by_seed in per.values()
                     for r in by_seed.values() if "peak_rss_mb" in r]
            result["peak_rss_mb"] = max(peaks, default=None)
            # the SAEs' time, measured by whichever share fitted them
            result["timing"] = {**on_disk.get("timing", {}), **result["timing"]}
            with tempfile.TemporaryDirectory() as tmp:
                files = {p.name: p for p in plot(result, Path(tmp))}
                save_run(area, run, result, params, files=files)

    if args.fresh:
        drop_saved(area, run, result, params)
    for i, (concept, method, seed) in enumerate(todo, 1):
        t = time.perf_counter()
        try:
            report = run_erasure(lm, concept, method.partition(":")[0],
                                 eraser=eraser_for(method, saes), split_seed=seed,
                                 relearn_steps=args.relearn_steps, unedited=unedited)
            report["method"] = method
            line = (f"held-out {report['post']['target_accuracy']:.2f}, paraphrases "
                    f"{report['post']['paraphrase_accuracy']:.2f}")
        except eg.EngramError as exc:  # a method that finds nothing is a result too
            report, line = {"error": str(exc)}, f"failed: {exc}"
        report["wall_seconds"] = time.perf_counter() - t
        report["peak_rss_mb"] = peak_rss_mb()
        publish({concept.name: {method: {str(seed): report}}})
        print(f"[{i}/{len(todo)}] {concept.name} · {method} · seed {seed}: {line} "
              f"({report['wall_seconds']:.0f} s)", file=sys.stderr, flush=True)
    publish({})
    print(markdown(result["summary"]) if args.markdown else json.dumps(result["summary"],
                                                                       indent=1))
    return 0


if __name__ == "__main__":
    entry.run(main)
