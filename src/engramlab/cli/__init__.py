"""The ``engram`` command: parses arguments, calls the library, prints. Nothing else lives here.

One module per command group (:mod:`.models`, :mod:`.edit`, :mod:`.erase`, :mod:`.lens`,
:mod:`.inspect`, :mod:`.prompt`, :mod:`.serve`, :mod:`.scale`), each with ``register(sub)``
adding its commands; what they share is in :mod:`.common`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence

from .. import __version__
from ..errors import EngramError
from . import edit, erase, inspect, lens, models, prompt, scale, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="engram",
        description="Read, write and erase knowledge inside transformer LM parameters.")
    parser.add_argument("--version", action="version", version=f"engramlab {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (models, edit, lens, erase, inspect, prompt, serve, scale):
        group.register(sub)
    return parser


def _check_inputs(args: argparse.Namespace) -> None:
    """What can be refused before any model loads (settings are checked by each command)."""
    prompt = getattr(args, "prompt", None)
    if prompt is not None and not prompt.strip():
        raise EngramError("--prompt is empty; give the text whose next tokens to read")


@contextlib.contextmanager
def _outputs(args: argparse.Namespace) -> Iterator[None]:
    """Every output path checked for writability and locked against a second run, up front."""
    from .._io import output_lock

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
