"""``engram lens``, ``engram early-exit`` and ``engram depth``: reading the layers."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ..errors import EngramError
from .common import (
    CORPUS_HELP,
    DEMO_PROMPT,
    add_common,
    add_held_out,
    add_lens_choice,
    emit,
    lenses_of,
    load_for,
    positive_float,
    positive_int,
)


def register(sub: Any) -> None:
    _register_lens(sub)
    _register_early_exit(sub)
    _register_depth(sub)


def _register_lens(sub: Any) -> None:
    from ..lens import KINDS

    lens = sub.add_parser("lens", help="read each layer's predictions (logit/tuned lens, "
                                       "shortcuts)").add_subparsers(dest="lens_cmd",
                                                                    required=True)
    p = lens.add_parser("train", help="fit a lens on a corpus and save it")
    add_common(p)
    p.add_argument("--kind", choices=[k for k in KINDS if k != "logit"], required=True)
    p.add_argument("--rank", type=positive_int, default=None, help="shortcut / one-jump rank")
    p.add_argument("--tokens", type=positive_int, default=16_000, help="training tokens")
    p.add_argument("--steps", type=positive_int, default=50, help="tuned lens: Adam steps")
    p.add_argument("--step-tokens", type=positive_int, default=256,
                   help="tuned lens: tokens per step (time per step grows with it)")
    p.add_argument("--lr", type=positive_float, default=1e-3,
                   help="tuned lens: Adam learning rate")
    p.add_argument("--no-warm-start", action="store_true",
                   help="tuned lens: start from identity, not the least-squares fit")
    p.add_argument("--corpus", default=None, help=CORPUS_HELP)
    p.add_argument("--out", required=True, help="lens folder to write")
    p.set_defaults(func=lens_train)

    p = lens.add_parser("show", help="top tokens of every layer for a prompt (table + heatmap)")
    add_common(p)
    add_lens_choice(p)
    p.add_argument("--png", default=None, help="write a figure here")
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--position", type=int, default=-1, help="table position")
    p.add_argument("-k", type=positive_int, default=3, help="top tokens per cell")
    p.set_defaults(func=lens_show)

    p = lens.add_parser("eval", help="KL / top-1 / CE per layer on held-out text")
    add_common(p)
    add_lens_choice(p)
    add_held_out(p)
    p.add_argument("--layers", type=int, nargs="*", default=None)
    p.add_argument("--png", default=None, help="write a figure here")
    p.set_defaults(func=lens_eval)


def _register_early_exit(sub: Any) -> None:
    ee = sub.add_parser("early-exit", help="early exit through lenses: confidence threshold "
                        "and learned (ConsistentEE) policies").add_subparsers(dest="ee_cmd",
                                                                              required=True)
    p = ee.add_parser("eval", help="agreement vs compute saved per threshold / depth price")
    add_common(p)
    add_lens_choice(p)
    add_held_out(p)
    p.add_argument("--png", default=None, help="write a figure here")
    p.add_argument("--learned", action="store_true",
                   help="also train ConsistentEE exit policies (one per depth price) and a "
                        "cheap confidence head on the tokens just before the held-out slice")
    p.add_argument("--learned-tokens", type=positive_int, default=3072,
                   help="with --learned: policy training tokens")
    p.set_defaults(func=early_exit)


def _register_depth(sub: Any) -> None:
    p = sub.add_parser("depth", help="how the model uses its depth (Guess-then-Refine): "
                       "frequency of each layer's guesses, refinement, fact-recall depth")
    add_common(p)
    add_lens_choice(p, "saved lens folder (the last one is read; default: logit lens)")
    add_held_out(p)
    p.add_argument("--freq-tokens", type=positive_int, default=200_000,
                   help="tokens counted for frequency ranks (at most the fitting part)")
    p.add_argument("--facts", default=None, help="fact file (default: the bundled facts)")
    p.add_argument("--max-facts", type=positive_int, default=200)
    p.add_argument("--png", default=None, help="write a figure here")
    p.set_defaults(func=depth)


def lens_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..lens import fit_lens
    from ..lens.states import lens_corpus
    from ..report import Report

    lm = load_for(args)
    corpus = lens_corpus(lm, args.corpus, progress=not args.json)
    if corpus.eval_start is not None and args.tokens > corpus.eval_start:
        raise EngramError(f"--tokens {args.tokens} would train on the evaluation split of the "
                          f"{corpus.name} corpus; use at most {corpus.eval_start} or pass "
                          "--corpus PATH")
    t0 = time.perf_counter()
    lens = fit_lens(lm, args.kind, corpus, n_tokens=args.tokens, rank=args.rank,
                    steps=args.steps, lr=args.lr, warm_start=not args.no_warm_start,
                    step_tokens=args.step_tokens,
                    progress=not args.json)
    seconds = time.perf_counter() - t0
    lens.save(args.out)
    lines = [f"{lens.kind} lens for {lm.name}: {lens.n_params:,} parameters, fitted on "
             f"{args.tokens:,} tokens in {seconds:.1f} s; wrote {args.out}"]
    obj = {"model": lm.name, "kind": lens.kind, "params": lens.n_params,
           "tokens": args.tokens, "seconds": seconds, "out": args.out, "config": lens.config}
    Report(title=f"{lens.kind} lens for {lm.label}",
           params={k: v for k, v in obj.items() if k not in ("out", "config")}
           | dict(lens.config or {}), text=lines).write(Path(args.out) / "report.html")
    emit(args, obj, lines)
    return 0


def lens_show(args: argparse.Namespace) -> int:
    from ..lens import layer_view, plot_view

    lm = load_for(args)
    lenses = lenses_of(args, lm)
    lens = list(lenses.values())[-1]
    view = layer_view(lm, args.prompt, lens, k=args.k)
    obj = view.to_json()
    if args.png:
        obj["png"] = str(plot_view(view, args.png, title=f"{lm.label}: {args.prompt!r}"))
    emit(args, obj, view.table(args.position) + ([f"wrote {args.png}"] if args.png else []))
    return 0


def lens_eval(args: argparse.Namespace) -> int:
    from ..lens import corpus_batches, evaluate_lenses, plot_report
    from ..lens.states import lens_corpus

    lm = load_for(args)
    lenses = lenses_of(args, lm)
    corpus = lens_corpus(lm, args.corpus, skip=args.skip, progress=not args.json)
    skip = corpus.eval_start
    report = evaluate_lenses(lm, lenses, corpus_batches(lm, corpus, n_tokens=args.tokens,
                                                        skip_tokens=skip),
                             layers=args.layers, progress=not args.json)
    obj = report.to_json()
    lines = report.table()
    if args.png:
        obj["png"] = str(plot_report(report, args.png))
        lines.append(f"wrote {args.png}")
    emit(args, obj, lines)
    return 0


def early_exit(args: argparse.Namespace) -> int:
    from ..errors import SettingsError
    from ..lens import corpus_batches
    from ..lens.early_exit import plot_curves
    from ..lens.exits import exit_lines, exit_report
    from ..lens.states import lens_corpus

    lm = load_for(args)
    corpus = lens_corpus(lm, args.corpus, skip=args.skip, progress=not args.json)
    skip = corpus.eval_start
    if args.learned and skip < args.learned_tokens:
        raise SettingsError(f"--learned trains the exit policy on the {args.learned_tokens:,} "
                         f"tokens before the held-out slice, but only {skip:,} precede it; "
                         "raise --skip or lower --learned-tokens")
    rules: dict[str, Any] = {}
    for name, lens in lenses_of(args, lm).items():
        held = corpus_batches(lm, corpus, n_tokens=args.tokens, skip_tokens=skip)
        train = corpus_batches(lm, corpus, n_tokens=args.learned_tokens,
                               skip_tokens=skip - args.learned_tokens) if args.learned else None
        rules.update(exit_report(lm, lens, name, held, train, progress=not args.json))
    curves = {n: r["curve"] for n, r in rules.items()}  # on the test half of the tokens
    points = {n: r["operating_points"] for n, r in rules.items()}  # chosen on the dev half
    costs = {n: r["cost"] for n, r in rules.items()}
    obj: dict[str, Any] = {"model": lm.name, "held_out_tokens": args.tokens,
                           "split": "points chosen on the first half of the held-out tokens, "
                                    "curves and figures on the second", "curves": curves,
                           "operating_points": points, "costs": costs}
    lines = exit_lines(rules, f"{lm.name}: early exit on {args.tokens:,} held-out tokens")
    if args.png:
        obj["png"] = str(plot_curves(curves, args.png, title=f"{lm.label}: early exit"))
        lines.append(f"wrote {args.png}")
    emit(args, obj, lines)
    return 0


def depth(args: argparse.Namespace) -> int:
    from ..data import load_cases
    from ..data.bundled import bundled_cases
    from ..lens import corpus_batches
    from ..lens.depth import (
        depth_lines,
        depth_readings,
        fact_recall_depth,
        frequency_ranks,
        guess_then_refine,
        plot_depth,
    )
    from ..lens.states import lens_corpus

    lm = load_for(args)
    lens = list(lenses_of(args, lm).values())[-1]
    corpus = lens_corpus(lm, args.corpus, skip=args.skip, progress=not args.json)
    skip = corpus.eval_start or 0
    # frequency ranks from the text before the held-out part (all of it when there is none)
    freq_tokens = min(args.freq_tokens, skip) if skip else args.freq_tokens
    ranks = frequency_ranks(corpus_batches(lm, corpus, n_tokens=freq_tokens),
                            lm.vocab_size)
    readings = depth_readings(lm, lens, corpus_batches(lm, corpus, n_tokens=args.tokens,
                                                       skip_tokens=skip))
    cases = load_cases(args.facts) if args.facts else bundled_cases()
    facts = [(c.request.text, c.request.target_true) for c in cases if c.request.target_true]
    g = guess_then_refine(readings, ranks)
    f = fact_recall_depth(lm, lens, facts[:args.max_facts])
    obj: dict[str, Any] = {"model": lm.name, "lens": lens.kind, "frequency_tokens": freq_tokens,
                           "guess_then_refine": g, "facts": f}
    lines = depth_lines(obj, f"{lm.name} read through the {lens.kind} lens")
    if args.png:
        obj["png"] = str(plot_depth(obj, args.png, title=f"{lm.label}: Guess-then-Refine "
                                                        f"({lens.kind} lens)"))
        lines.append(f"wrote {args.png}")
    emit(args, obj, lines)
    return 0

