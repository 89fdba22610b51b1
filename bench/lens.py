"""Lens benchmark: fit every lens kind on the same corpus, evaluate them on held-out text, and
read early exit through each. Prints one JSON object (figures with --png-dir).

    .venv/bin/python bench/lens.py [--model smollm2-135m] [--tokens 16000] [--eval-tokens 2048]
        [--ranks 16,64] [--steps 50] [--policy-tokens 3072] [--device cuda] [--png-dir docs/results]

Early exit is read for every lens by confidence threshold and, for the tuned lens, also by
ConsistentEE policies trained on the ``--policy-tokens`` before the held-out slice; the depth
analysis (Guess-then-Refine) reads the tuned lens.

``--table AREA/RUN`` prints a saved run's README tables (markdown) and runs nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import engramlab as eg
import entry
from engramlab.lens import (
    LogitLens,
    corpus_batches,
    evaluate_lenses,
    fit_lens,
    plot_report,
)
from engramlab.lens.depth import (
    depth_readings,
    fact_recall_depth,
    frequency_ranks,
    guess_then_refine,
    plot_depth,
)
from engramlab.lens.early_exit import plot_curves
from engramlab.lens.exits import exit_report
from engramlab.lens.states import lens_corpus
from results import run_folder, save_run


def tables(out: dict) -> str:
    """The README's lens, early-exit and depth tables from one run's JSON."""
    depths = sorted(next(iter(out["at_depths"].values())), key=int)
    lines = ["| lens | params | " + " | ".join(f"layer {d}: KL / top-1" for d in depths) + " |",
             "|---|---|" + "---|" * len(depths)]
    for name, at in out["at_depths"].items():
        cells = " | ".join(f"{at[d]['kl']:.2f} / {at[d]['top1']:.2f}" for d in depths)
        lines.append(f"| {name} | {out['params'][name]:,} | {cells} |")
    lines += ["", "| exit rule | check (blocks) | 95 %: agreement / saved / net | "
              "99 %: agreement / saved / net |", "|---|---|---|---|"]
    for name, points in out["early_exit_operating_points"].items():
        cost = out["early_exit_check_in_blocks"].get(name)
        cells = []
        for target in ("0.95", "0.99"):
            t = points[target]["test"]
            cells.append(f"{t['agreement']:.3f} / {t['compute_saved']:+.1%} / "
                         f"{t['net_compute_saved']:+.1%}")
        lines.append(f"| {name} | {'-' if cost is None else f'{cost:.1f}'} | "
                     + " | ".join(cells) + " |")
    g, facts = out["depth"]["guess_then_refine"], out["depth"]["facts"]
    lines += ["", "| frequency bucket | first top-1 layer | settled layer |", "|---|---|---|"]
    for b in g["buckets"]:
        first, settled = g["first_top1_layer"][b], g["settled_layer"][b]
        lines.append(f"| rank {b} | {'-' if first is None else f'{first:.1f}'} | "
                     f"{'-' if settled is None else f'{settled:.1f}'} |")
    if facts.get("known"):
        lines.append(f"| fact answers ({facts['known']} known), first token | "
                     f"{facts['first_token_layer']:.1f} | - |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default=None)
    ap.add_argument("--tokens", type=int, default=16_000)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--ranks", default="16,64",
                    help="ranks of the one-jump map and of the low-rank shortcuts")
    ap.add_argument("--steps", type=int, default=50, help="tuned-lens Adam steps")
    ap.add_argument("--step-tokens", type=int, default=256, help="tuned-lens tokens per step")
    ap.add_argument("--policy-tokens", type=int, default=3072,
                    help="ConsistentEE policy training tokens (0: skip learned exit)")
    ap.add_argument("--png-dir", default=None, help="figures here (default: with --save, the "
                    "run's folder)")
    ap.add_argument("--save", default=None, help="AREA/RUN under docs/results/")
    ap.add_argument("--corpus", default=None, help="wiki (default) or sampled")
    ap.add_argument("--table", default=None, help="AREA/RUN: print a saved run's tables")
    args = ap.parse_args()
    if args.table:
        path = run_folder(*args.table.partition("/")[::2]) / "result.json"
        if not path.is_file():
            print(f"lens: error: no saved run at {path}; --table takes AREA/RUN", file=sys.stderr)
            sys.exit(2)
        print(tables(json.loads(path.read_text())))
        return

    lm = eg.load_model(args.model, device=args.device, progress=False)
    corpus = lens_corpus(lm, args.corpus)
    eval_start = corpus.eval_start or 0
    lenses, fit_s = {"logit": LogitLens(lm)}, {}
    ranks = [int(r) for r in args.ranks.split(",")]
    plan = [("shortcut", "shortcut", None),
            *((f"shortcut_r{r}", "shortcut", r) for r in ranks),
            *((f"onejump_r{r}", "onejump", r) for r in ranks), ("tuned", "tuned", None)]
    for name, kind, rank in plan:
        t0 = time.perf_counter()
        lenses[name] = fit_lens(lm, kind, corpus, n_tokens=args.tokens, rank=rank,
                                steps=args.steps, step_tokens=args.step_tokens)
        fit_s[name] = time.perf_counter() - t0
        print(f"fitted {name} in {fit_s[name]:.0f} s", file=sys.stderr, flush=True)

    def held_out():
        return corpus_batches(lm, corpus, n_tokens=args.eval_tokens, skip_tokens=eval_start)

    t0 = time.perf_counter()
    report = evaluate_lenses(lm, lenses, held_out())
    eval_s = time.perf_counter() - t0
    # early exit: settings chosen on the first half of the held-out tokens, reported on the
    # second; compute saved in blocks and net of every exit check (ExitCost)
    rules, policy_s = {}, None
    for name, lens in lenses.items():
        learned = name == "tuned" and args.policy_tokens
        t0 = time.perf_counter()
        rules.update(exit_report(lm, lens, name, held_out(), corpus_batches(
            lm, corpus, n_tokens=args.policy_tokens,
            skip_tokens=eval_start - args.policy_tokens) if learned else None))
        if learned:
            policy_s = time.perf_counter() - t0
    curves = {n: r["curve"] for n, r in rules.items()}
    points = {n: r["operating_points"] for n, r in rules.items()}
    costs = {n: r["cost"]["check_in_blocks"] for n, r in rules.items()}
    freq = frequency_ranks(corpus_batches(lm, corpus, n_tokens=min(200_000, eval_start)),
                           lm.vocab_size)
    depth = {"guess_then_refine": guess_then_refine(
                 depth_readings(lm, lenses["tuned"], held_out()), freq),
             "facts": fact_recall_depth(lm, lenses["tuned"], [
                 (c.request.text, c.request.target_true) for c in eg.data.bundled_cases()])}
    mid = lm.n_layers // 2
    lens_json = report.to_json()["lenses"]
    depths = sorted({0, lm.n_layers // 3, (2 * lm.n_layers) // 3, lm.n_layers - 1})
    out = {
        "model": lm.name, "device": str(lm.device), "train_tokens": args.tokens,
        "eval_tokens": report.tokens,
        "fit_seconds": fit_s,
        "fit_tokens_per_s": {k: args.tokens / v for k, v in fit_s.items()
                             if k != "tuned"},
        "tuned_steps": args.steps,
        "tuned_step_tokens": args.step_tokens,
        "tuned_losses": lenses["tuned"].config.get("losses"),
        "eval_seconds": eval_s,
        "final_ce": lens_json.pop("_final")["ce"],
        "lenses": lens_json,
        "middle_layer": mid,
        "kl_at_middle": {k: v["kl"][mid] for k, v in lens_json.items()},
        "at_depths": {k: {str(d): {"kl": v["kl"][d], "top1": v["top1"][d]} for d in depths}
                      for k, v in lens_json.items()},
        "params": {k: v["params"] for k, v in lens_json.items()},
        # the seed paper's claim: one shared jump, far fewer parameters, close precision
        "onejump_vs_shortcut": {
            f"onejump_r{r} vs {ref}": {
                "param_ratio": lens_json[ref]["params"] / lens_json[f"onejump_r{r}"]["params"],
                "mean_top1_gap": sum(a - b for a, b in zip(
                    lens_json[ref]["top1"], lens_json[f"onejump_r{r}"]["top1"],
                    strict=True)) / lm.n_layers}
            for r in ranks for ref in ("shortcut", f"shortcut_r{r}")},
        "policy_seconds": policy_s,
        "early_exit_split": "settings chosen on the first half of the held-out tokens, "
                            "curves and operating points reported on the second",
        "early_exit_check_in_blocks": costs,
        "early_exit_operating_points": points,
        "early_exit_curves": curves,
        "onejump_choice": {f"r{r}": lenses[f"onejump_r{r}"].config.get("chosen")
                           for r in ranks},
        "depth": depth,
    }
    png_dir = args.png_dir or (str(run_folder(*args.save.split("/"))) + ".figures"
                               if args.save else None)
    if png_dir:
        d, tag = Path(png_dir), Path(lm.name).stem
        out["png"] = [str(plot_report(report, d / f"lens_{tag}.png")),
                      str(plot_curves(curves, d / f"early_exit_{tag}.png",
                                      title=f"{lm.label}: early exit")),
                      str(plot_depth(depth, d / f"depth_{tag}.png",
                                     title=f"{lm.label}: Guess-then-Refine (tuned lens)"))]
    print(json.dumps(out))
    if args.save:
        area, name = args.save.split("/")
        figures = {Path(p).name: Path(p) for p in out.get("png", [])}
        folder = save_run(area, name, out, {k: v for k, v in vars(args).items()}, figures)
        if png_dir and not args.png_dir:
            shutil.rmtree(png_dir, ignore_errors=True)
        print(f"wrote {folder}", file=sys.stderr)


if __name__ == "__main__":
    entry.run(main)
