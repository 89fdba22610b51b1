"""Lens benchmark: fit every lens kind on the same corpus, evaluate them on held-out text, and
read early exit through each. Prints one JSON object (figures with --png-dir).

    .venv/bin/python bench/lens.py [--model smollm2-135m] [--tokens 16000] [--eval-tokens 2048]
        [--rank 64] [--steps 30] [--policy-tokens 3072] [--device cuda] [--png-dir docs/results]

Early exit is read for every lens by confidence threshold and, for the tuned lens, also by
ConsistentEE policies trained on the ``--policy-tokens`` before the held-out slice; the depth
analysis (Guess-then-Refine) reads the tuned lens.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import engramlab as eg
from engramlab.lens import (
    LogitLens,
    corpus_batches,
    evaluate_lenses,
    exit_readings,
    fit_lens,
    plot_report,
    saved_at,
    threshold_curve,
)
from engramlab.lens.depth import (
    depth_readings,
    fact_recall_depth,
    frequency_ranks,
    guess_then_refine,
    plot_depth,
)
from engramlab.lens.early_exit import plot_curves
from engramlab.lens.learned_exit import exit_data, policy_curve
from engramlab.lens.states import lens_corpus


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default=None)
    ap.add_argument("--tokens", type=int, default=16_000)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=64, help="one-jump (and low-rank shortcut) rank")
    ap.add_argument("--steps", type=int, default=30, help="tuned-lens SGD steps")
    ap.add_argument("--policy-tokens", type=int, default=3072,
                    help="ConsistentEE policy training tokens (0: skip learned exit)")
    ap.add_argument("--png-dir", default=None)
    ap.add_argument("--corpus", default=None, help="wiki (default) or sampled")
    args = ap.parse_args()

    lm = eg.load_model(args.model, device=args.device, progress=False)
    corpus = lens_corpus(lm, args.corpus)
    eval_start = corpus.eval_start or 0
    lenses, fit_s = {"logit": LogitLens(lm)}, {}
    for kind, rank in (("shortcut", None), ("shortcut_r", args.rank), ("onejump", args.rank),
                       ("tuned", None)):
        t0 = time.perf_counter()
        lenses[kind] = fit_lens(lm, kind.removesuffix("_r"), corpus, n_tokens=args.tokens,
                                rank=rank, steps=args.steps)
        fit_s[kind] = time.perf_counter() - t0

    def held_out():
        return corpus_batches(lm, corpus, n_tokens=args.eval_tokens, skip_tokens=eval_start)

    t0 = time.perf_counter()
    report = evaluate_lenses(lm, lenses, held_out())
    eval_s = time.perf_counter() - t0
    curves = {name: threshold_curve(exit_readings(lm, lens, held_out()))
              for name, lens in lenses.items() if name != "tuned"}
    t0 = time.perf_counter()
    held = exit_data(lm, lenses["tuned"], held_out())
    curves["tuned"] = threshold_curve(held.readings())
    policy_s = None
    if args.policy_tokens:
        train = exit_data(lm, lenses["tuned"], corpus_batches(
            lm, corpus, n_tokens=args.policy_tokens, skip_tokens=eval_start - args.policy_tokens))
        curves["tuned+policy"] = policy_curve(train, held)
        policy_s = time.perf_counter() - t0
    ranks = frequency_ranks(corpus_batches(lm, corpus, n_tokens=min(200_000, eval_start)),
                            lm.vocab_size)
    depth = {"guess_then_refine": guess_then_refine(
                 depth_readings(lm, lenses["tuned"], held_out()), ranks),
             "facts": fact_recall_depth(lm, lenses["tuned"], [
                 (c.request.text, c.request.target_true) for c in eg.data.bundled_cases()])}
    mid = lm.n_layers // 2
    lens_json = report.to_json()["lenses"]
    out = {
        "model": lm.name, "device": str(lm.device), "train_tokens": args.tokens,
        "eval_tokens": report.tokens,
        "fit_seconds": fit_s,
        "fit_tokens_per_s": {k: args.tokens / v for k, v in fit_s.items()
                             if k != "tuned"},
        "tuned_steps": args.steps,
        "eval_seconds": eval_s,
        "final_ce": lens_json.pop("_final")["ce"],
        "lenses": lens_json,
        "middle_layer": mid,
        "kl_at_middle": {k: v["kl"][mid] for k, v in lens_json.items()},
        "onejump_vs_shortcut": {
            ref: {"param_ratio": lens_json[ref]["params"] / lens_json["onejump"]["params"],
                  "mean_top1_gap": sum(a - b for a, b in zip(lens_json[ref]["top1"],
                                                             lens_json["onejump"]["top1"],
                                                             strict=True)) / lm.n_layers}
            for ref in ("shortcut", "shortcut_r")},
        "policy_seconds": policy_s,
        "early_exit_saved_at_95": {k: saved_at(c, 0.95) for k, c in curves.items()},
        "early_exit_curves": curves,
        "onejump_choice": lenses["onejump"].config.get("chosen"),
        "depth": depth,
    }
    if args.png_dir:
        d, tag = Path(args.png_dir), Path(lm.name).stem
        out["png"] = [str(plot_report(report, d / f"lens_{tag}.png")),
                      str(plot_curves(curves, d / f"early_exit_{tag}.png",
                                      title=f"{lm.name}: early exit")),
                      str(plot_depth(depth, d / f"depth_{tag}.png",
                                     title=f"{lm.name}: Guess-then-Refine (tuned lens)"))]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
