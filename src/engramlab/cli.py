"""The ``engram`` command: parses arguments, calls the library, prints. Nothing else lives here."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import EngramError

DEMO_PROMPT = "The Eiffel Tower is located in the city of"


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

    t0 = time.perf_counter()
    lm = load_model(args.model, progress=not args.json)
    load_s = time.perf_counter() - t0
    top = lm.top_tokens(args.prompt, k=5)
    lines = [f"model {lm.name}: {lm.n_layers} layers, d_model {lm.d_model}, d_mlp {lm.d_mlp} "
             f"(loaded in {load_s:.1f} s, fingerprint {lm.fingerprint()})",
             f"prompt: {args.prompt!r}", "top-5 next tokens:"]
    lines += [f"  {tok!r:<16} {p:.3f}" for tok, p in top]
    result: dict[str, Any] = {"model": lm.name, "load_seconds": load_s, "prompt": args.prompt,
                              "top5": [{"token": t, "prob": p} for t, p in top]}
    if args.no_edit:
        result["edit"] = None
    else:
        from .edit import demo_edit

        edit = demo_edit(lm, progress=not args.json)
        result["edit"] = {k: v for k, v in edit.items() if k != "lines"}
        lines += edit["lines"]
    _emit(args, result, lines)
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    from .data import load_cases
    from .data.bundled import bundled_cases
    from .edit import get_editor, run_protocol
    from .models import load_model

    cases = load_cases(args.facts) if args.facts else bundled_cases()
    if args.limit:
        cases = cases[:args.limit]
    overrides: dict[str, Any] = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise EngramError(f"--set expects key=value, got {item!r}")
        overrides[key.strip()] = value.strip()
    if args.layers:
        overrides["layers"] = args.layers
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
    p.add_argument("--batch-size", type=int, default=10, help="sequential batch size")
    p.add_argument("--eval-every", type=int, default=None,
                   help="sequential: evaluate every K batches (the decay curve)")
    p.add_argument("--layers", type=int, nargs="+", default=None)
    p.add_argument("--preset", default=None, help="preset name (default: matched to the model)")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="hyper-parameter overrides")
    p.add_argument("--limit", type=int, default=None, help="use the first N cases")
    p.add_argument("--fluency-tokens", type=int, default=0,
                   help="greedy tokens generated per prompt for the fluency metric (0: skip)")
    p.add_argument("--out", default=None, help="folder for deltas, per-case JSONL and report")
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("apply", help="write a full model folder with a saved delta applied")
    common(p)
    p.add_argument("--delta", required=True, help="folder written by WeightDelta.save")
    p.add_argument("--out", required=True, help="new model folder (never the source folder)")
    p.add_argument("--force", action="store_true",
                   help="apply even if the delta was made for other weights")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_apply)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (EngramError, FileNotFoundError, FileExistsError) as exc:
        print(f"engram: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
