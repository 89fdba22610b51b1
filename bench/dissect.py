"""Where erasures leave the knowledge: KRS per window for each method and concept (Hong et al.
2024). Prints one JSON object.

    .venv/bin/python bench/dissect.py [--concepts "Harry Potter" Japan] [--methods ga npo rmu
        concept-vectors features] [--split-seed 0] [--window 5] [--save inspect/RUN]

Each method erases each concept as ``engram erase`` does (tuned under the specificity budget on
the tuning half of the probes); the dissection reads the held-out probes and the paraphrases.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import engramlab as eg
import entry
from engramlab.data import get_concept
from engramlab.erase.run import make_eraser
from engramlab.inspect import dissect, plot_dissection
from results import save_run


def plot_methods(runs: list[dict], out: Path, title: str) -> Path:
    """KRS per window for every method on one concept: MLP patches solid, attention dashed."""
    from engramlab.figures import figure

    with figure(out, figsize=(7, 4.5)) as (_, ax):
        for i, run in enumerate(runs):
            starts = [a for a, _ in run["windows"]]
            for kind, style in (("mlp", "-"), ("attn", "--")):
                if kind in run["krs"]:
                    ax.plot(starts, run["krs"][kind], style, color=f"C{i}", marker=".",
                            label=f"{run['method']} ({kind})")
        ax.axhline(0, color="grey", lw=0.8)
        width = runs[0]["windows"][0][1] - runs[0]["windows"][0][0]
        ax.set(xlabel=f"first layer of the {width}-layer window", ylabel="KRS",
               title=f"{title}: knowledge recovered by patching")
        ax.legend(fontsize=7, ncol=2)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--concepts", nargs="+", default=["Harry Potter", "Japan"])
    ap.add_argument("--methods", nargs="+",
                    default=["ga", "npo", "rmu", "concept-vectors", "features"])
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--save", default=None, help="AREA/RUN under docs/results/")
    args = ap.parse_args()
    concepts = [get_concept(name) for name in args.concepts]  # bad names fail before loading
    lm = eg.load_model(args.model, progress=False)
    out: dict = {"model": lm.name, "split_seed": args.split_seed, "window": args.window,
                 "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for concept in concepts:
            tuned, held = concept.split(args.split_seed)
            prompts = [p.prompt for p in [*held, *concept.paraphrases]]
            for method in args.methods:
                print(f"{concept.name} / {method}", file=sys.stderr, flush=True)
                t = time.perf_counter()
                delta = make_eraser(method).erase(lm, tuned)
                d = dissect(lm, delta, prompts, window=args.window, tokens=args.tokens)
                out["runs"].append({"concept": concept.name, "method": method,
                                    "seconds": time.perf_counter() - t, **d.to_json()})
                name = f"krs_{concept.name.lower().replace(' ', '_')}_{method}.png"
                files[name] = plot_dissection(d, Path(tmp) / name,
                                              f"{lm.label}: {concept.name}, {method}")
        for concept in concepts:
            name = f"krs_{concept.name.lower().replace(' ', '_')}.png"
            files[name] = plot_methods([r for r in out["runs"] if r["concept"] == concept.name],
                                       Path(tmp) / name, f"{lm.label}: {concept.name}")
        print(json.dumps(out, indent=1))
        if args.save:
            area, run = args.save.split("/", 1)
            save_run(area, run, out, vars(args), files)
    return 0


if __name__ == "__main__":
    entry.run(main)
