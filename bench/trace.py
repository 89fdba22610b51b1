"""Causal tracing over many facts (ROME fig. 1 on the chosen model). Prints one JSON object.

    .venv/bin/python bench/trace.py [--model smollm2-135m] [--facts FILE] [--limit N]
        [--samples 10] [--save inspect/RUN]

Default facts: the bundled ones (all known to the embedded model). The JSON has the average
grid per state on the paper's token groups, each group's peak layer with a 95 % bootstrap
interval over facts, and the layers the ROME preset edits; with ``--save`` also every fact's
grids, the average figure and the first facts' figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import engramlab as eg
import entry
from engramlab.data import load_facts
from engramlab.data.bundled import bundled_facts_path
from engramlab.edit import ROME
from engramlab.inspect import TraceConfig, plot_fact, plot_trace, trace_facts
from results import save_run

FACT_FIGURES = 6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--facts", default=None)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--save", default=None, help="AREA/RUN under docs/results/")
    args = ap.parse_args()
    facts = load_facts(args.facts or bundled_facts_path("smollm2_facts"), limit=args.limit)
    lm = eg.load_model(args.model, progress=False)
    config = TraceConfig(samples=args.samples, window=args.window)
    t = time.perf_counter()
    report = trace_facts(lm, facts, config, progress=True)
    out = {**report.to_json(), "seconds": time.perf_counter() - t,
           "rome_preset_layers": list(ROME().hparams_for(lm).layers)}
    print(json.dumps(out, indent=1))
    if args.save:
        area, run = args.save.split("/", 1)
        with tempfile.TemporaryDirectory() as tmp:
            files = {"average.png": plot_trace(report, Path(tmp) / "average.png",
                                               f"{lm.label}: causal tracing, "
                                               f"{len(report.facts)} facts")}
            for i, fact in enumerate(report.facts[:FACT_FIGURES]):
                files[f"fact_{i:02d}.png"] = plot_fact(fact, Path(tmp) / f"fact_{i:02d}.png",
                                                       config.window)
            save_run(area, run, {**out, "facts": [f.to_json() for f in report.facts]},
                     vars(args), files)
    return 0


if __name__ == "__main__":
    entry.run(main)
