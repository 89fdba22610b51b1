"""MLP specialisation across models: the parameter specialisation score of every bundled concept
on each model given (Hong et al. 2025's comparison, on the models installed here). Prints one
JSON object.

    .venv/bin/python bench/specialisation.py [--models smollm2-135m PATH ...] [--top-k 16]
        [--seeds 0,1,2] [--save inspect/RUN]

Each split seed ranks the vectors on another half of each concept's probes; the table gives each
model's mean score over concepts and seeds with its spread, beside masking random vectors. With
``--save`` each model's first split seed is also drawn (``<model>.png``).
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
from engramlab.data import bundled_concepts
from engramlab.inspect import plot_specialisation, specialisation_table
from results import save_run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m"])
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--save", default=None, help="AREA/RUN under docs/results/")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    out: dict = {"top_k": args.top_k, "seeds": seeds, "models": []}
    figures: dict[str, Path] = {}
    tmp = Path(tempfile.mkdtemp(prefix="specialisation."))
    for name in args.models:
        lm = eg.load_model(name, progress=False)
        tables = []
        for seed in seeds:
            print(f"{name}: split seed {seed}", file=sys.stderr, flush=True)
            tables.append(specialisation_table(lm, bundled_concepts(), top_k=args.top_k,
                                               split_seed=seed))
        png = f"{Path(name).name}.png"
        figures[png] = plot_specialisation(tables[0], tmp / png, f"{lm.label}: MLP "
                                           f"specialisation, split seed {seeds[0]}")
        means = [t["mean_pss"] for t in tables if t["mean_pss"] is not None]
        randoms = [t["mean_random_pss"] for t in tables if t["mean_random_pss"] is not None]
        out["models"].append({
            "model": lm.name, "mean_pss": statistics.fmean(means) if means else None,
            "sd_over_seeds": statistics.stdev(means) if len(means) > 1 else None,
            "mean_random_pss": statistics.fmean(randoms) if randoms else None,
            "tables": tables})
        del lm
    print(json.dumps(out, indent=1))
    if args.save:
        area, run = args.save.split("/", 1)
        save_run(area, run, out, vars(args), files=figures)
    return 0


if __name__ == "__main__":
    entry.run(main)
