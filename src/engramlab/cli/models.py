"""``engram models``, ``engram demo`` and ``engram apply``: the model itself."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..errors import EngramError
from .common import DEMO_PROMPT, add_common, emit, load_for


def register(sub: Any) -> None:
    p = sub.add_parser("models", help="list registry names and locally cached models")
    add_common(p, model=False)
    p.set_defaults(func=models)

    p = sub.add_parser("demo", help="load the embedded model, read it, edit one fact")
    add_common(p)
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--no-edit", action="store_true", help="only load and read the model")
    p.set_defaults(func=demo)

    p = sub.add_parser("apply", help="write a full model folder with a saved delta applied")
    add_common(p)
    p.add_argument("--delta", required=True,
                   help="folder written by WeightDelta.save, or a PEFT LoRA adapter folder")
    p.add_argument("--out", required=True, help="new model folder (never the source folder)")
    p.add_argument("--force", action="store_true",
                   help="apply even if the delta was made for other weights")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=apply)


def models(args: argparse.Namespace) -> int:
    from .._io import cache_dir
    from ..models import REGISTRY

    cached = sorted(p.name for p in cache_dir("models").iterdir() if p.is_dir())
    rows = [{"name": e.name, "family": e.family, "hub_id": e.hub_id,
             "embedded": bool(e.embedded_package), "note": e.note} for e in REGISTRY.values()]
    lines = [f"{'name':<22}{'family':<13}{'source':<42}note"]
    for r in rows:
        src = "embedded wheel" if r["embedded"] else r["hub_id"]
        lines.append(f"{r['name']:<22}{r['family']:<13}{src:<42}{r['note']}")
    lines += ["", f"local cache ({cache_dir('models')}):"]
    lines += [f"  {c}" for c in cached or ["(empty)"]]
    emit(args, {"registry": rows, "cache": cached}, lines)
    return 0


def demo(args: argparse.Namespace) -> int:
    def say(line: str) -> None:  # text mode: each line as soon as it is known
        print(line, flush=True)

    t0 = time.perf_counter()
    lm = load_for(args)
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
        from ..edit import demo_edit

        edit = demo_edit(lm, progress=not args.json, say=say if not args.json else None)
        result["edit"] = {k: v for k, v in edit.items() if k != "lines"}
    if args.json:
        print(json.dumps(result, default=str))
    return 0


def apply(args: argparse.Namespace) -> int:
    from ..delta import WeightDelta

    out = Path(args.out)
    lm = load_for(args)
    if lm.folder is not None and out.resolve() == Path(lm.folder).resolve():
        raise EngramError(f"--out {out} is the source model folder; refusing to overwrite it")
    if (Path(args.delta) / "adapter_config.json").is_file():  # a PEFT LoRA adapter folder
        from ..adapt import load_adapter

        delta = load_adapter(args.delta, lm)
    else:
        delta = WeightDelta.load(args.delta, lm, force=args.force)
    delta.apply(lm, force=args.force)
    lm.save(out, overwrite=args.overwrite)
    emit(args, {"model": lm.name, "delta": str(args.delta), "out": str(out),
                 "delta_norm": delta.norm(), "params_changed": list(delta.entries)},
          [f"applied {args.delta} ({len(delta.entries)} tensors, norm {delta.norm():.4g}) "
           f"to {lm.name}; wrote {out}"])
    return 0

