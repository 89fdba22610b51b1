"""Neuron atlas of the embedded model's first layers (after Pichat et al. 2025): per layer, the
purity and spread of each neuron's token categories, categorical homogeneity by activation zone
(with a bootstrap interval over neurons for the top-minus-bottom gap), and the category pairs
the next layer brings together. Prints one JSON object (the summary and a few neurons' pages).

    .venv/bin/python bench/atlas.py [--model smollm2-135m] [--layers 0 1] [--tokens 20000]
        [--save inspect/RUN]

With ``--save`` the folder also gets the figure. The atlas itself (a few MB of arrays) is not
kept with the results: ``engram atlas --out DIR`` builds it for paging.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import engramlab as eg
import entry
from engramlab.data.corpus import get_corpus
from engramlab.inspect import AtlasConfig, build_atlas, plot_atlas
from results import save_run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--tokens", type=int, default=20_000)
    ap.add_argument("--save", default=None, help="AREA/RUN under docs/results/")
    args = ap.parse_args()
    lm = eg.load_model(args.model, progress=False)
    config = AtlasConfig(layers=tuple(args.layers), tokens=args.tokens)
    atlas = build_atlas(lm, get_corpus(lm, "wiki"), config, progress=True)
    out = {k: v for k, v in atlas.index.items() if k != "tokens"}
    # the purest neurons of each layer, as the viewer would show them
    out["examples"] = {}
    for layer in atlas.layers:
        purity = atlas.arrays[f"L{layer}.purity"]
        out["examples"][str(layer)] = [atlas.neuron(layer, int(i))
                                       for i in purity.argsort(descending=True)[:3]]
    print("\n".join(atlas.lines()), file=sys.stderr)
    print(json.dumps(out, indent=1))
    if args.save:
        png = Path(tempfile.mkdtemp(prefix="atlas.")) / "atlas.png"
        plot_atlas(atlas, png, f"{lm.label}: neuron atlas, layers {atlas.layers}")
        area, run = args.save.split("/", 1)
        save_run(area, run, out, vars(args), files={"atlas.png": png})
    return 0


if __name__ == "__main__":
    entry.run(main)
