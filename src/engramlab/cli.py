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
    try:
        from .edit import demo_edit  # type: ignore[attr-defined]
    except ImportError:
        demo_edit = None
    if demo_edit is None:
        msg = ("editing is not available yet (ROME/MEMIT/AlphaEdit arrive with the editing "
               "issue); the demo stops after reading the model")
        lines.append(msg)
        result["edit"] = None
    else:
        edit = demo_edit(lm)
        result["edit"] = edit
        lines += edit.get("lines", [])
    _emit(args, result, lines)
    return 0


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
    p.set_defaults(func=cmd_demo)

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
