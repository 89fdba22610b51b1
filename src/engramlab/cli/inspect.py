"""``engram trace``, ``dissect``, ``specialise``, ``directions`` and ``atlas``: where a model's
hidden states carry its facts, where an unlearned model's knowledge can be patched back, how
much a concept owns its value vectors, the direction that tells reasoning from recall, and what
each MLP neuron reads and writes."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .common import (
    CORPUS_HELP,
    add_common,
    add_set,
    emit,
    finite_float,
    load_for,
    nonnegative_float,
    nonnegative_int,
    parse_settings,
    positive_int,
)

FIGURES_PER_RUN = 8  # per-fact figures written with --out


def _neuron(text: str) -> tuple[int, int]:
    layer, _, index = text.partition(":")
    if not (layer.isdigit() and index.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not LAYER:INDEX, e.g. 1:42")
    return int(layer), int(index)


def register(sub: Any) -> None:
    from ..inspect import STATES, TraceConfig

    d = TraceConfig()
    p = sub.add_parser("trace", help="causal tracing (ROME fig. 1): which states carry a fact")
    add_common(p)
    p.add_argument("--facts", default=None, help="known_1000-style facts (prompt, subject, "
                   "attribute) or any edit-case file (default: the bundled facts)")
    p.add_argument("--limit", type=positive_int, default=10, help="trace the first N facts")
    p.add_argument("--samples", type=positive_int, default=d.samples, help="noise draws")
    p.add_argument("--noise", type=nonnegative_float, default=d.noise,
                   help="noise std in std's of the subject embeddings")
    p.add_argument("--window", type=positive_int, default=d.window,
                   help="MLP / attention blocks restored together")
    p.add_argument("--states", nargs="+", choices=list(STATES), default=list(STATES))
    p.add_argument("--seed", type=nonnegative_int, default=d.seed)
    p.add_argument("--all", action="store_true",
                   help="also trace facts the model does not answer as given")
    p.add_argument("--png", default=None, help="the average figure here")
    p.add_argument("--out", default=None, help="folder: result.json with every fact's grids, "
                   "average.png and the first facts' figures")
    p.set_defaults(func=trace)

    from ..erase.run import METHODS
    from .erase import add_concept

    p = sub.add_parser("dissect", help="where an erasure left the knowledge: patch the "
                       "unedited activations back window by window (KRS, Hong et al. 2024)")
    add_common(p)
    add_concept(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--delta", default=None,
                     help="an erasure's folder from `engram erase --out` (or its delta folder)")
    src.add_argument("--method", choices=METHODS, default=None, help="erase first, this way")
    add_set(p, "with --method: its settings, as for engram erase")
    p.add_argument("--split-seed", type=nonnegative_int, default=None,
                   help="the split the erasure was tuned on (default: the saved report's, "
                        "else 0); the held-out probes and the paraphrases are dissected")
    p.add_argument("--window", type=positive_int, default=5, help="layers patched together")
    p.add_argument("--tokens", type=positive_int, default=8,
                   help="continuation tokens the loss is read on")
    p.add_argument("--kinds", nargs="+", choices=["mlp", "attn"], default=["mlp", "attn"])
    p.add_argument("--png", default=None, help="KRS per window, as a figure")
    p.set_defaults(func=dissect)

    p = sub.add_parser("specialise", help="MLP specialisation: mask each concept's most "
                       "relevant value vectors, compare its drop with everything else's")
    add_common(p)
    p.add_argument("--concepts", nargs="+", default=None,
                   help="bundled concept names (default: all of them)")
    p.add_argument("--concept-file", default=None, help="a concept file of your own instead")
    p.add_argument("--layers", type=int, nargs="+", default=None)
    p.add_argument("--top-k", type=positive_int, default=16, help="value vectors masked")
    p.add_argument("--selection", default="activation",
                   choices=["activation", "answer", "distinct", "vocab", "effect", "combined"])
    p.add_argument("--split-seed", type=nonnegative_int, default=0,
                   help="which half of each concept's probes ranks the vectors")
    p.add_argument("--random-draws", type=nonnegative_int, default=3,
                   help="masks of random vectors, the baseline")
    p.add_argument("--png", default=None, help="the scores beside random masks, as a figure")
    p.set_defaults(func=specialise)

    from ..inspect import DEFAULT_ALPHAS, REASONING_KINDS, DirectionsConfig

    c = DirectionsConfig()
    p = sub.add_parser("directions", help="the residual direction that tells reasoning from "
                       "recall, and steering along it (Hong et al. 2025)")
    add_common(p)
    p.add_argument("--facts", default=None, help="recall facts (known_1000-style or edit "
                   "cases; default: the bundled facts)")
    p.add_argument("--concepts", action="store_true",
                   help="also the bundled concepts' probes as recall tasks")
    p.add_argument("--per-kind", type=positive_int, default=24,
                   help="generated tasks per reasoning template")
    p.add_argument("--kinds", nargs="+", choices=list(REASONING_KINDS),
                   default=list(REASONING_KINDS), help="reasoning templates")
    p.add_argument("--layer", type=nonnegative_int, default=None,
                   help="steering layer (default: chosen on the tuning half)")
    p.add_argument("--mode", choices=list(DEFAULT_ALPHAS), default=c.mode,
                   help="scale: the paper's x + α(x·r̂)r̂ at every layer (α = -1 ablates); "
                        "add: x + α·r at the layer's input")
    p.add_argument("--alphas", type=finite_float, nargs="+", default=None,
                   help="steering strengths (default: " + "; ".join(
                       f"{m} {' '.join(map(str, a))}" for m, a in DEFAULT_ALPHAS.items()) + ")")
    p.add_argument("--split-seed", type=nonnegative_int, default=c.split_seed,
                   help="which half of each family the directions are computed on")
    p.add_argument("--png", default=None, help="separation and steering, as a figure")
    p.set_defaults(func=directions)

    from ..inspect import AtlasConfig

    a = AtlasConfig()
    p = sub.add_parser("atlas", help="neuron atlas: each MLP neuron's top contexts, promoted "
                       "tokens and token category (build with --out, page with --load)")
    add_common(p)
    p.add_argument("--load", default=None, help="an atlas folder to read instead of building")
    p.add_argument("--neuron", type=_neuron, default=None, metavar="LAYER:INDEX",
                   help="show one neuron's page")
    p.add_argument("--layers", type=nonnegative_int, nargs="+", default=list(a.layers))
    p.add_argument("--corpus", default=None, help=CORPUS_HELP)
    p.add_argument("--tokens", type=positive_int, default=a.tokens, help="corpus tokens read")
    p.add_argument("--top-k", type=positive_int, default=a.top_k, help="contexts per neuron")
    p.add_argument("--window", type=nonnegative_int, default=a.window,
                   help="tokens shown before each activating token")
    p.add_argument("--categories", type=positive_int, default=a.categories,
                   help="token categories (k-means on the input embeddings)")
    p.add_argument("--out", default=None, help="folder to save the atlas in")
    p.add_argument("--png", default=None, help="homogeneity by zone and categories per "
                   "neuron, as a figure")
    p.set_defaults(func=atlas)


def trace(args: argparse.Namespace) -> int:
    import dataclasses

    from .._io import atomic_dir
    from ..data import load_facts
    from ..data.bundled import bundled_facts_path
    from ..errors import SettingsError
    from ..inspect import TraceConfig, plot_fact, plot_trace, trace_facts
    from ..report import Report

    config = TraceConfig(samples=args.samples, noise=args.noise, window=args.window,
                         states=tuple(args.states), seed=args.seed)
    config.check()
    source = args.facts or bundled_facts_path("smollm2_facts")
    facts = load_facts(source, limit=args.limit)
    if not facts:
        raise SettingsError(f"no facts in {source}; give a file with at least one fact")
    lm = load_for(args)
    report = trace_facts(lm, facts, config, known_only=not args.all, progress=not args.json)
    obj = report.to_json()
    rome = _rome_layers(lm)
    if rome:
        obj["rome_preset_layers"] = rome
    lines = report.lines()
    if rome:
        lines.append(f"the ROME preset edits layer {', '.join(map(str, rome))}")
    title = f"{lm.label}: causal tracing, {len(report.facts)} facts"
    if args.png:
        obj["png"] = str(plot_trace(report, args.png, title))
        lines.append(f"wrote {args.png}")
    if args.out:
        with atomic_dir(args.out) as tmp:
            (tmp / "result.json").write_text(
                json.dumps({**obj, **report.to_json(per_fact=True)}, indent=1))
            plot_trace(report, tmp / "average.png", title)
            for i, fact in enumerate(report.facts[:FIGURES_PER_RUN]):
                plot_fact(fact, tmp / f"fact_{i:02d}.png", config.window)
            Report(title=title, params=dataclasses.asdict(config), text=lines,
                   figures=[tmp / "average.png", *sorted(tmp.glob("fact_*.png"))]
                   ).write(tmp / "report.html")
        obj["out"] = args.out
        lines.append(f"saved to {args.out}")
    emit(args, obj, lines)
    return 0


def _rome_layers(lm: Any) -> list[int] | None:
    """The layers the ROME preset for this model edits (None without a matching preset)."""
    from ..edit import ROME
    from ..errors import EngramError

    try:
        return list(ROME().hparams_for(lm).layers)
    except EngramError:
        return None


def dissect(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..delta import WeightDelta
    from ..erase.run import make_eraser
    from ..errors import EngramError
    from ..inspect import dissect as run_dissect
    from ..inspect import plot_dissection
    from .erase import concept_of

    concept = concept_of(args)
    seed = args.split_seed
    folder = Path(args.delta) if args.delta else None
    if folder is not None:
        if not folder.is_dir():
            raise EngramError(f"--delta {folder} is not a folder; give the folder "
                              "`engram erase --out` wrote, or its delta folder")
        report = folder / "report.json"
        if seed is None and report.is_file():
            seed = json.loads(report.read_text()).get("split", {}).get("seed")
        if (folder / "delta").is_dir():
            folder = folder / "delta"
    tuned, held = concept.split(0 if seed is None else seed)
    eraser = None
    if args.method:
        eraser = make_eraser(args.method, layers=args.layers, **parse_settings(args.set))
    lm = load_for(args)
    delta = WeightDelta.load(folder, lm) if folder is not None else eraser.erase(lm, tuned)
    prompts = [p.prompt for p in [*held, *concept.paraphrases]]
    d = run_dissect(lm, delta, prompts, window=args.window, tokens=args.tokens,
                    kinds=args.kinds)
    obj: dict[str, Any] = {"model": lm.name, "concept": concept.name,
                           "split_seed": 0 if seed is None else seed,
                           "prompts": "held-out probes and paraphrases", **d.to_json()}
    lines = d.lines(f"{concept.name}: knowledge recovered by patching the unedited model's "
                    f"activations back, {args.window} layers at a time (KRS)")
    if args.png:
        obj["png"] = str(plot_dissection(d, args.png, f"{lm.label}: {concept.name}"))
        lines.append(f"wrote {args.png}")
    emit(args, obj, lines)
    return 0


def specialise(args: argparse.Namespace) -> int:
    from ..data import bundled_concepts, get_concept, load_concept
    from ..inspect import plot_specialisation, specialisation_lines, specialisation_table

    if args.concept_file:
        concepts = [load_concept(args.concept_file)]
    elif args.concepts:
        concepts = [get_concept(name) for name in args.concepts]
    else:
        concepts = bundled_concepts()
    lm = load_for(args)
    table = specialisation_table(lm, concepts, top_k=args.top_k, split_seed=args.split_seed,
                                 selection=args.selection, layers=args.layers,
                                 random_draws=args.random_draws)
    lines = specialisation_lines(table)
    if args.png:
        table["png"] = str(plot_specialisation(table, args.png, f"{lm.label}: MLP "
                                               "specialisation"))
        lines.append(f"wrote {args.png}")
    emit(args, table, lines)
    return 0


def directions(args: argparse.Namespace) -> int:
    from ..data import bundled_concepts, load_facts
    from ..data.bundled import bundled_facts_path
    from ..errors import SettingsError
    from ..inspect import (
        DEFAULT_ALPHAS,
        DirectionsConfig,
        plot_directions,
        reasoning_directions,
        reasoning_tasks,
        recall_tasks,
    )

    alphas = args.alphas or DEFAULT_ALPHAS[args.mode]
    config = DirectionsConfig(split_seed=args.split_seed, layer=args.layer, mode=args.mode,
                              alphas=tuple(alphas))
    config.check()
    reasoning = reasoning_tasks(args.per_kind, kinds=args.kinds)
    facts = load_facts(args.facts or bundled_facts_path("smollm2_facts"))
    recall = recall_tasks(facts, bundled_concepts() if args.concepts else ())
    if len(recall) < 2:
        raise SettingsError(f"{args.facts or 'the bundled facts'} give(s) {len(recall)} recall "
                            "task(s) with answers; "
                            "give a fact file with at least 5 facts that have answers")
    lm = load_for(args)
    report = reasoning_directions(lm, reasoning, recall, config, progress=not args.json)
    obj: dict[str, Any] = {"model": lm.name, **report.to_json()}
    lines = report.lines()
    if args.png:
        obj["png"] = str(plot_directions(report, args.png, lm.label))
        lines.append(f"wrote {args.png}")
    emit(args, obj, lines)
    return 0


def atlas(args: argparse.Namespace) -> int:
    from ..data.corpus import check_corpus_spec, get_corpus
    from ..errors import SettingsError
    from ..inspect import Atlas, AtlasConfig, build_atlas, plot_atlas

    if args.load:
        book = Atlas.load(args.load)
    else:
        if args.neuron is None and args.out is None:
            raise SettingsError("building an atlas needs --out DIR to keep it (or --neuron "
                                "LAYER:INDEX to look at one neuron); --load DIR reads one")
        config = AtlasConfig(layers=tuple(args.layers), tokens=args.tokens, top_k=args.top_k,
                             window=args.window, categories=args.categories)
        config.check()
        spec = check_corpus_spec(args.corpus)
        lm = load_for(args)
        book = build_atlas(lm, get_corpus(lm, spec, progress=not args.json), config,
                           progress=not args.json)
        if args.out:
            book.save(args.out)
    if args.neuron is not None:
        emit(args, book.neuron(*args.neuron), book.neuron_lines(*args.neuron))
        return 0
    obj = {k: v for k, v in book.index.items() if k != "tokens"}
    lines = book.lines()
    if args.png:
        obj["png"] = str(plot_atlas(book, args.png, f"{book.index['model']}: neuron atlas"))
        lines.append(f"wrote {args.png}")
    if args.out:
        obj["out"] = args.out
        lines.append(f"saved to {args.out}; page through it with "
                     f"`engram atlas --load {args.out} --neuron LAYER:INDEX`")
    emit(args, obj, lines)
    return 0
