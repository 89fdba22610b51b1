"""Task accuracy against readability as the weight of the prompt's perplexity grows, for soft
prompts and for PEZ's hard prompts (Patel et al., "Towards Interpretable Soft Prompts").

For each weight and method: test accuracy with the prompt, test accuracy with its nearest
tokens in its place (faithfulness: what a reader sees does what the prompt does), and the
perplexity of those tokens under the model (scrutability's proxy). The kept step of each run
is chosen on the validation split; the weights are a sweep, not a choice, so every figure is
reported, on the test split. Also a PNG: accuracy against perplexity, one line per method.

    .venv/bin/python bench/prompt_tradeoff.py [--task relation] [--weights 0 0.1 0.3 1 3]
        [--seed 0] [--soft-lr R] [--save AREA/RUN]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import engramlab as eg
from engramlab.figures import figure
from engramlab.prompt import TuneConfig, load_label_task, step_progress, tune
from engramlab.prompt.pez import PEZConfig, fluency_loss, pez, readability
from results import data_default, save_run, saved_parts


def plot(runs: dict, path: Path) -> None:
    with figure(path, figsize=(6, 4)) as (_fig, ax):
        draw(runs, ax)


def draw(runs: dict, ax) -> None:
    for method, marker in (("soft", "o"), ("pez", "s")):
        rows = sorted((r for r in runs.values() if r["method"] == method),
                      key=lambda r: r["weight"])
        if not rows:
            continue
        ax.plot([r["perplexity"] for r in rows], [r["accuracy"] for r in rows], marker=marker,
                label=f"{method}: prompt")
        if method == "soft":
            ax.plot([r["perplexity"] for r in rows], [r["projected_accuracy"] for r in rows],
                    marker=marker, linestyle="--", label="soft: its nearest tokens")
        for r in rows:
            ax.annotate(f"{r['weight']:g}", (r["perplexity"], r["accuracy"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("perplexity of the prompt's tokens (lower: more readable)")
    ax.set_ylabel("test accuracy")
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--soft-lr", type=float, default=None,
                        help="the soft prompt's Adam rate (default: prompt tuning's 0.003, at "
                             "which the prompt stays beside its random start)")
    parser.add_argument("--save", default=None, help="AREA/RUN under docs/results/")
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()
    params = {k: v for k, v in vars(args).items() if k not in ("save", "fresh")}
    runs: dict = {}
    if args.save:
        same = [k for k in params if k not in ("weights", "methods")]
        saved = saved_parts("prompt_tradeoff", *args.save.split("/"), params, same, "runs",
                            args.fresh)
        if saved is None:
            return 2
        runs = saved
    lm = eg.load_model(args.model, progress=False)
    task = load_label_task(args.task, pararel=args.pararel, seed=args.seed)
    out = {"model": args.model, "task": args.task, "split": "test", "n": len(task.test),
           "runs": runs}
    for method in args.methods:
        for weight in args.weights:
            key = f"{method} {weight:g}"
            if key in runs:
                continue
            start = time.perf_counter()
            bar, on_step = step_progress(args.steps, desc=key)
            with bar:
                if method == "pez":
                    prompt = pez(lm, task, PEZConfig(tokens=args.tokens, steps=args.steps,
                                                     fluency=weight, seed=args.seed),
                                 on_step=on_step)
                else:
                    rate = {} if args.soft_lr is None else {"lr": args.soft_lr}
                    prompt = tune(lm, task, TuneConfig(tokens=args.tokens, steps=args.steps,
                                                       seed=args.seed, **rate),
                                  loss_fn=fluency_loss(lm, task, weight), on_step=on_step)
            runs[key] = {"method": method, "weight": weight,
                         **readability(lm, prompt.embeddings.to(lm.device), task, task.test),
                         "val": prompt.meta["val_accuracy"],
                         "seconds": time.perf_counter() - start}
            print(json.dumps({"done": key, **{k: runs[key][k] for k in
                                              ("accuracy", "projected_accuracy", "perplexity",
                                               "text")}}), file=sys.stderr, flush=True)
            if args.save:
                save_run(*args.save.split("/"), out, params)
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "tradeoff.png"
        plot(runs, png)
        if args.save:
            save_run(*args.save.split("/"), out, params, files={"tradeoff.png": png})
    print(json.dumps({k: v for k, v in out.items() if k != "runs"} | {
        "runs": {k: {m: v[m] for m in ("accuracy", "projected_accuracy", "perplexity", "text")}
                 for k, v in runs.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
