"""Task accuracy against readability as the weight of the prompt's perplexity grows, for soft
prompts and for PEZ's hard prompts (Patel et al., "Towards Interpretable Soft Prompts").

For each weight and method: test accuracy with the prompt, test accuracy with its nearest
tokens in its place (faithfulness: what a reader sees does what the prompt does), and the
perplexity of those tokens under the model (scrutability's proxy). The kept step of each run
is chosen on the validation split; the weights are a sweep, not a choice, so every figure is
reported, on the test split of each seed's split of the task, and summarised as a mean ± sd
over seeds, beside each seed's zero-shot accuracy (no prompt). ``--fluency-roles`` says how
the perplexity reaches the prompt (``engramlab.prompt.pez``). Also a PNG: accuracy against
perplexity, one line per method.

    .venv/bin/python bench/prompt_tradeoff.py [--task relation] [--weights 0 0.1 0.3 1 3]
        [--seeds 0 1 2] [--fluency-roles both|context] [--soft-lr R] [--save AREA/RUN]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from matplotlib.ticker import LogLocator

import engramlab as eg
import entry
from engramlab.figures import figure
from engramlab.prompt import TuneConfig, accuracy, load_label_task, step_progress, tune
from engramlab.prompt.pez import PEZConfig, fluency_loss, pez, readability
from results import data_default, mean_sd, save_run, saved_parts, saved_result


def plot(runs: dict, zero_shot: dict, path: Path) -> None:
    with figure(path, figsize=(6, 4)) as (_fig, ax):
        draw(runs, ax)
        if zero_shot:
            ax.axhline(sum(zero_shot.values()) / len(zero_shot), color="grey", linestyle=":",
                       label="no prompt (mean over seeds)")
            ax.legend(fontsize=8)


SHOWN = ("accuracy", "projected_accuracy", "perplexity", "log10_perplexity")


def summary(runs: dict) -> dict:
    """Per method and weight, each shown figure's mean ± sd over the seeds run so far."""
    cells: dict = {}
    for r in runs.values():
        cells.setdefault(f"{r['method']} {r['weight']:g}", []).append(r)
    return {key: {"method": rows[0]["method"], "weight": rows[0]["weight"],
                  "seeds": sorted(r["seed"] for r in rows),
                  **{m: mean_sd([r[m] for r in rows]) for m in SHOWN}}
            for key, rows in cells.items()}


def draw(runs: dict, ax) -> None:
    cells = summary(runs)
    for method, marker in (("soft", "o"), ("pez", "s")):
        rows = sorted((c for c in cells.values() if c["method"] == method),
                      key=lambda c: c["weight"])
        if not rows:
            continue
        x = [10 ** c["log10_perplexity"]["mean"] for c in rows]
        ax.errorbar(x, [c["accuracy"]["mean"] for c in rows], marker=marker,
                    yerr=[c["accuracy"]["sd"] or 0 for c in rows], capsize=2,
                    label=f"{method}: prompt")
        if method == "soft":
            ax.errorbar(x, [c["projected_accuracy"]["mean"] for c in rows], marker=marker,
                        yerr=[c["projected_accuracy"]["sd"] or 0 for c in rows], capsize=2,
                        linestyle="--", label="soft: its nearest tokens")
        for c, xi in zip(rows, x, strict=True):
            ax.annotate(f"{c['weight']:g}", (xi, c["accuracy"]["mean"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    # fewer minor ticks, so that labels within one decade do not run into each other
    ax.xaxis.set_minor_locator(LogLocator(subs=(1.5, 2, 3, 5, 7)))
    ax.set_xlabel("prompt tokens' perplexity (geometric mean over seeds; lower reads better)")
    ax.set_ylabel("test accuracy (± sd over seeds)")
    ax.set_title("accuracy against readability (labels: fluency weight)")
    ax.legend(fontsize=8)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pararel", **data_default("pararel"))
    parser.add_argument("--task", default="relation")
    parser.add_argument("--weights", nargs="+", type=float, default=[0, 0.1, 0.3, 1, 3])
    parser.add_argument("--methods", nargs="+", default=["soft", "pez"])
    parser.add_argument("--tokens", type=int, default=10)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="task splits and prompt initialisations, one run each")
    parser.add_argument("--fluency-roles", choices=("both", "context"), default="both")
    parser.add_argument("--soft-lr", type=float, default=None,
                        help="the soft prompt's Adam rate (default: prompt tuning's 0.003, at "
                             "which the prompt stays beside its random start)")
    parser.add_argument("--save", default=None, help="AREA/RUN under docs/results/")
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()
    params = {k: v for k, v in vars(args).items() if k not in ("save", "fresh")}
    runs: dict = {}
    if args.save:
        same = [k for k in params if k not in ("weights", "methods", "seeds")]
        saved = saved_parts("prompt_tradeoff", *args.save.split("/"), params, same, "runs",
                            args.fresh)
        if saved is None:
            return 2
        runs = saved
    lm = eg.load_model(args.model, progress=False)
    # each seed's no-prompt accuracy, saved beside the runs it belongs to
    zero_shot = saved_result(*args.save.split("/")).get("zero_shot", {}) if runs else {}
    out = {"model": args.model, "task": args.task, "split": "test", "zero_shot": zero_shot,
           "runs": runs}
    for seed in args.seeds:
        task = load_label_task(args.task, pararel=args.pararel, seed=seed)
        if str(seed) not in zero_shot:  # the no-prompt baseline of this seed's test split
            zero_shot[str(seed)] = accuracy(lm, None, task, task.test)
        for method in args.methods:
            for weight in args.weights:
                key = f"{method} {weight:g} seed {seed}"
                if key in runs:
                    continue
                runs[key] = cell(lm, task, method, weight, seed, args, desc=key)
                print(json.dumps({"done": key, **{k: runs[key][k] for k in
                                                  ("accuracy", "projected_accuracy",
                                                   "perplexity", "text")}}),
                      file=sys.stderr, flush=True)
                out["summary"] = summary(runs)
                if args.save:
                    save_run(*args.save.split("/"), out, params)
    out["summary"] = summary(runs)
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "tradeoff.png"
        plot(runs, zero_shot, png)
        if args.save:
            save_run(*args.save.split("/"), out, params, files={"tradeoff.png": png})
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=1))
    return 0


def cell(lm: eg.LM, task, method: str, weight: float, seed: int, args: argparse.Namespace,
         desc: str) -> dict:
    """One method at one weight on one seed's split: its readability on the test split."""
    start = time.perf_counter()
    bar, on_step = step_progress(args.steps, desc=desc)
    with bar:
        if method == "pez":
            prompt = pez(lm, task, PEZConfig(tokens=args.tokens, steps=args.steps,
                                             fluency=weight, fluency_roles=args.fluency_roles,
                                             seed=seed), on_step=on_step)
        else:
            rate = {} if args.soft_lr is None else {"lr": args.soft_lr}
            prompt = tune(lm, task, TuneConfig(tokens=args.tokens, steps=args.steps, seed=seed,
                                               **rate),
                          loss_fn=fluency_loss(lm, task, weight, args.fluency_roles),
                          on_step=on_step)
    seen = readability(lm, prompt.embeddings.to(lm.device), task, task.test)
    return {"method": method, "weight": weight, "seed": seed, "n": len(task.test), **seen,
            "log10_perplexity": math.log10(seen["perplexity"]),
            "val": prompt.meta["val_accuracy"], "seconds": time.perf_counter() - start}


if __name__ == "__main__":
    entry.run(main)
