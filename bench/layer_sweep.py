"""Where does editing work? ROME at each layer, independent edits, CounterFact scores.

The causal-tracing motivation of ROME (Meng et al. 2022, §2, Fig. 1) says mid-layer MLPs at the
subject's last token mediate factual recall; this sweep measures it directly on the model at
hand: efficacy, paraphrase and neighbourhood scores of a ROME edit inserted at each layer.
It is how the SmolLM2 preset's layers were chosen. Prints JSON; ``--png`` draws the curves.

    .venv/bin/python bench/layer_sweep.py [--model smollm2-135m] [--layers 2 4 6 ...] [--n 16]
"""

from __future__ import annotations

import argparse
import json
import time

import engramlab as eg
import entry
from engramlab.data import load_cases
from engramlab.data.bundled import bundled_cases
from engramlab.edit import ROME
from engramlab.evaluate import case_scores, summarize
from engramlab.stats import collect_key_stats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--facts", default=None, help="cases file (default: bundled facts)")
    parser.add_argument("--layers", type=int, nargs="+", default=None)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--set", nargs="*", default=[], help="hyper-parameter overrides k=v")
    parser.add_argument("--stats-tokens", type=int, default=20_000)
    parser.add_argument("--device", default=None)
    parser.add_argument("--png", default=None)
    args = parser.parse_args()
    lm = eg.load_model(args.model, progress=False, device=args.device)
    cases = (load_cases(args.facts) if args.facts else bundled_cases())[:args.n]
    layers = args.layers or list(range(1, lm.n_layers - 1, max(1, lm.n_layers // 12)))
    overrides = dict(kv.split("=", 1) for kv in args.set)
    overrides.setdefault("stats.tokens", str(args.stats_tokens))
    # one statistics pass for every layer of the sweep
    stats = collect_key_stats(lm, layers, n_tokens=args.stats_tokens, progress=False)
    pre = summarize(case_scores(lm, cases))
    rows = []
    for layer in layers:
        editor = ROME(layers=[layer], key_stats={layer: stats[layer]}, **overrides)
        editor.prepare(lm)
        start = time.perf_counter()
        deltas = editor.edit_each(lm, [c.request for c in cases])
        seconds = (time.perf_counter() - start) / len(cases)
        results = []
        for case, delta in zip(cases, deltas, strict=True):
            with delta.applied(lm):
                results += case_scores(lm, [case])
        s = summarize(results)
        rows.append({"layer": layer, "efficacy": s["efficacy"], "paraphrase": s["paraphrase"],
                     "neighborhood": s["neighborhood"], "seconds_per_edit": seconds})
    out = {"model": args.model, "n": len(cases), "overrides": overrides,
           "pre": {k: pre[k] for k in ("efficacy", "paraphrase", "neighborhood")},
           "layers": rows}
    print(json.dumps(out, indent=1))
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key in ("efficacy", "paraphrase", "neighborhood"):
            ax.plot([r["layer"] for r in rows], [r[key] for r in rows], marker="o", label=key)
        ax.set_xlabel("edited layer")
        ax.set_ylabel("score")
        ax.set_title(f"ROME by layer, {args.model}, {len(cases)} facts")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)


if __name__ == "__main__":
    entry.run(main)
