"""Reasoning–memorisation directions on the embedded model: held-out separation per layer and
held-out accuracy under steering, for each steering mode and split seed (Hong et al. 2025).
Prints one JSON object.

    .venv/bin/python bench/directions.py [--model smollm2-135m] [--per-kind 16]
        [--modes scale add] [--seeds 0,1,2] [--save inspect/RUN]

Each split seed computes the directions (and picks the steering layer) on another half of the
tasks and reads every figure on the rest; the summary gives, per mode and α, the mean change in
held-out accuracy from α = 0 over seeds with its spread (sample standard deviation), and the
held-out AUROC per layer averaged over seeds. With ``--save`` the run also draws seed 0's
figure per mode into its folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import engramlab as eg
import entry
from engramlab.data import load_facts
from engramlab.data.bundled import bundled_facts_path
from engramlab.inspect import (
    DEFAULT_ALPHAS,
    DirectionsConfig,
    plot_directions,
    reasoning_directions,
    reasoning_tasks,
    recall_tasks,
)
from results import mean_sd, save_run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--per-kind", type=int, default=16)
    ap.add_argument("--modes", nargs="+", default=["scale", "add"], choices=list(DEFAULT_ALPHAS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--save", default=None, help="AREA/RUN under docs/results/")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    lm = eg.load_model(args.model, progress=False)
    reasoning = reasoning_tasks(args.per_kind)
    recall = recall_tasks(load_facts(bundled_facts_path("smollm2_facts")))
    out: dict = {"model": lm.name, "reasoning_tasks": len(reasoning),
                 "recall_tasks": len(recall), "seeds": seeds, "modes": {}}
    figures: dict[str, Path] = {}
    tmp = Path(tempfile.mkdtemp(prefix="directions."))
    for mode in args.modes:
        reports = []
        for seed in seeds:
            print(f"{mode}: split seed {seed}", file=sys.stderr, flush=True)
            config = DirectionsConfig(split_seed=seed, mode=mode, alphas=DEFAULT_ALPHAS[mode])
            report = reasoning_directions(lm, reasoning, recall, config, progress=True)
            reports.append(report.to_json())
            if seed == seeds[0]:
                figures[f"{mode}.png"] = plot_directions(report, tmp / f"{mode}.png",
                                                         f"{lm.label}, {mode}, seed {seed}")
        summary = []
        for i, alpha in enumerate(r["alpha"] for r in reports[0]["steering"]):
            row: dict = {"alpha": alpha}
            for fam in ("reasoning", "recall"):
                row[fam] = {
                    "accuracy": mean_sd([r["steering"][i][fam]["accuracy"] for r in reports]),
                    "change": mean_sd([r["steering"][i][fam]["change"] for r in reports])}
            summary.append(row)
        layers = len(reports[0]["separation"])
        out["modes"][mode] = {
            "layers_chosen": [r["layer"] for r in reports],
            "auroc_by_layer": [statistics.fmean(r["separation"][k]["auroc"] for r in reports)
                               for k in range(layers)],
            "cohens_d_by_layer": [statistics.fmean(r["separation"][k]["cohens_d"]
                                                   for r in reports) for k in range(layers)],
            "auroc_at_chosen": mean_sd([r["separation"][r["layer"]]["auroc"]
                                        for r in reports]),
            "summary": summary, "reports": reports}
    print(json.dumps(out, indent=1))
    if args.save:
        area, run = args.save.split("/", 1)
        save_run(area, run, out, vars(args), files=figures)
    return 0


if __name__ == "__main__":
    entry.run(main)
