"""Soft prompt (or prefix) tuning on the built-in tasks: test accuracy against zero-shot, over
seeds.

``--method prefix`` tunes a prefix (keys and values in every block, Li & Liang 2021) in place
of the soft prompt. Each seed draws the task's split (by subject; for ``relation`` also by
wording) and the prompt's initial tokens; the prompt kept is the step with the best
validation accuracy, and the test split is scored once, with and without it. Reported per
task: the mean and sample standard deviation over seeds of zero-shot and tuned test accuracy
and of the gain, and the time per tuning.

    .venv/bin/python bench/prompt_tuning.py [--tasks fact-check relation] [--seeds 0 1 2]
        [--steps 150] [--lr 0.003] [--method soft|prefix] [--reparam H] [--save AREA/RUN]

Prints one JSON object; with ``--save`` also writes it (after every task and seed, so a
stopped run goes on from there) to ``docs/results/AREA/RUN/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import engramlab as eg
import entry
from engramlab.prompt import (
    PrefixConfig,
    TuneConfig,
    accuracy,
    load_label_task,
    step_progress,
    tune,
    tune_prefix,
)
from results import data_default, mean_sd, save_run, saved_parts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pararel", **data_default("pararel"))
    parser.add_argument("--tasks", nargs="+", default=["fact-check", "relation"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--method", choices=["soft", "prefix"], default="soft")
    parser.add_argument("--reparam", type=int, default=0,
                        help="prefix: the hidden width of its MLP reparameterisation (0: none)")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--save", default=None, help="AREA/RUN under docs/results/")
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()
    if args.save and args.save.count("/") != 1:
        print("prompt_tuning: error: --save takes AREA/RUN, e.g. prompt/tuning", file=sys.stderr)
        return 2
    params = {k: v for k, v in vars(args).items() if k not in ("save", "fresh")}
    cells: dict = {}
    if args.save:
        same = [k for k in params if k not in ("tasks", "seeds")]
        saved = saved_parts("prompt_tuning", *args.save.split("/"), params, same, "cells",
                            args.fresh)
        if saved is None:
            return 2
        cells = saved
    lm = eg.load_model(args.model, progress=False)
    out = {"model": args.model, "cells": cells, "summary": {}}
    for name in args.tasks:
        for seed in args.seeds:
            key = f"{name} seed {seed}"
            if key in cells:
                continue
            task = load_label_task(name, pararel=args.pararel, seed=seed)
            config = TuneConfig(tokens=args.tokens, steps=args.steps, lr=args.lr,
                                batch_size=args.batch_size, eval_every=args.eval_every,
                                seed=seed)
            start = time.perf_counter()
            bar, on_step = step_progress(config.steps, desc=key)
            with bar:
                if args.method == "prefix":
                    prompt = tune_prefix(lm, task, PrefixConfig(**vars(config),
                                                                reparam=args.reparam),
                                         on_step=on_step)
                else:
                    prompt = tune(lm, task, config, on_step=on_step)
            seconds = time.perf_counter() - start
            cells[key] = {"task": name, "seed": seed, "sizes": task.sizes(),
                          "zero_shot": accuracy(lm, None, task, task.test),
                          "tuned": accuracy(lm, prompt, task, task.test),
                          "val": prompt.meta["val_accuracy"],
                          "chosen_step": prompt.meta["chosen_step"],
                          "history": prompt.meta["history"], "tune_seconds": seconds}
            print(json.dumps({"done": key, **{k: cells[key][k] for k in
                                              ("zero_shot", "tuned", "val", "chosen_step")}}),
                  file=sys.stderr, flush=True)
            if args.save:
                save_run(*args.save.split("/"), out, params)
    for name in args.tasks:
        rows = [c for c in cells.values() if c["task"] == name and c["seed"] in args.seeds]
        out["summary"][name] = {
            "seeds": len(rows), "split": "test", "n": rows[0]["sizes"]["test"] if rows else 0,
            "zero_shot": mean_sd([r["zero_shot"] for r in rows]),
            "tuned": mean_sd([r["tuned"] for r in rows]),
            "gain": mean_sd([r["tuned"] - r["zero_shot"] for r in rows]),
            "tune_seconds": mean_sd([r["tune_seconds"] for r in rows])}
    if args.save:
        save_run(*args.save.split("/"), out, params)
    print(json.dumps({k: v for k, v in out.items() if k != "cells"}, indent=1))
    return 0


if __name__ == "__main__":
    entry.run(main)
