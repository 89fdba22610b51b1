"""``engram erase`` and ``engram concepts``: remove a concept, and find where it lives."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import EngramError
from .common import (
    add_common,
    add_set,
    emit,
    load_for,
    nonnegative_int,
    parse_settings,
    positive_int,
)


def add_concept(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concept", default=None, help="bundled concept name")
    p.add_argument("--concept-file", default=None,
                   help="JSON concept file: name, keywords, probes, paraphrases, controls")
    p.add_argument("--layers", type=int, nargs="+", default=None)


def concept_of(args: argparse.Namespace) -> Any:
    from ..data import get_concept, load_concept

    if getattr(args, "concept_file", None):
        return load_concept(args.concept_file)
    if not args.concept:
        raise EngramError("name a concept: --concept NAME (bundled) or --concept-file FILE")
    return get_concept(args.concept)


def register(sub: Any) -> None:
    from ..erase.run import METHODS

    p = sub.add_parser("erase", help="erase a concept from the weights and evaluate it")
    add_common(p)
    add_concept(p)
    p.add_argument("--method", choices=METHODS, default="concept-vectors")
    add_set(p, "method settings, e.g. top_k=64, or steps=40 lrs=[1e-5,2e-5] (every method is "
               "tuned under the specificity budget; tune=false runs the given setting as is)")
    p.add_argument("--relearn-steps", type=nonnegative_int, default=10)
    p.add_argument("--split-seed", type=nonnegative_int, default=0,
                   help="which random half of the probes the tuner sees (the other half is "
                        "what the report scores)")
    p.add_argument("--no-split", action="store_true",
                   help="tune and report on every probe (the report then says so)")
    p.add_argument("--out", default=None, help="folder for the delta and report.json")
    p.set_defaults(func=erase)

    cc = sub.add_parser("concepts", help="bundled concepts and their value vectors"
                        ).add_subparsers(dest="concepts_cmd", required=True)
    p = cc.add_parser("list", help="bundled concepts")
    add_common(p, model=False)
    p.set_defaults(func=concepts_list)
    p = cc.add_parser("find", help="candidate value vectors of a concept with their top tokens")
    add_common(p)
    add_concept(p)
    p.add_argument("--top", type=positive_int, default=20)
    p.add_argument("--candidates", type=positive_int, default=64)
    # the names of erase.concept_vectors.SELECTIONS (kept literal: the CLI starts without
    # importing torch; tests/test_cli.py checks they agree)
    p.add_argument("--selection", default="activation",
                   choices=["activation", "answer", "distinct", "vocab", "effect", "combined"])
    p.add_argument("--no-check", action="store_true", help="skip the exact ablation check")
    p.set_defaults(func=concepts_find)


def erase(args: argparse.Namespace) -> int:
    from ..erase.run import make_eraser, report_lines, run_erasure

    concept = concept_of(args)
    settings = parse_settings(args.set)
    eraser = make_eraser(args.method, layers=args.layers, **settings)  # before the model loads
    lm = load_for(args)
    report = run_erasure(lm, concept, args.method, layers=args.layers, out=args.out,
                         relearn_steps=args.relearn_steps, eraser=eraser,
                         split_seed=None if args.no_split else args.split_seed)
    lines = report_lines(report, lm.name)
    if args.out:
        lines.append(f"saved to {args.out}")
    emit(args, report, lines)
    return 0


def concepts_list(args: argparse.Namespace) -> int:
    from ..data import bundled_concepts

    concepts = bundled_concepts()
    obj = {"concepts": [{"name": c.name, "probes": len(c.probes),
                         "paraphrases": len(c.paraphrases)} for c in concepts]}
    emit(args, obj, [f"{c.name:<22}{len(c.probes):>4} probes{len(c.paraphrases):>4} "
                      "paraphrases" for c in concepts])
    return 0


def concepts_find(args: argparse.Namespace) -> int:
    from ..erase import find_concept_vectors
    from ..erase.concept_vectors import candidate_table

    concept = concept_of(args)
    lm = load_for(args)
    found = find_concept_vectors(lm, concept, layers=args.layers,
                                 n_candidates=args.candidates, selection=args.selection,
                                 check=not args.no_check)[:args.top]
    obj = {"concept": concept.name, "vectors": [c.to_dict() for c in found]}
    lines = candidate_table(found)
    emit(args, obj, lines)
    return 0

