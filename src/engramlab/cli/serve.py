"""``engram serve``: the local web workbench."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
from typing import Any

from ..errors import EngramError

LOOPBACK = "127.0.0.1"


def register(sub: Any) -> None:
    s = sub.add_parser("serve", help="a local web workbench: lens grids in the browser, over "
                                     "a JSON API scripts can use too")
    s.add_argument("--model", default="smollm2-135m",
                   help="registry name, model folder, .gguf file or hub id")
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--host", default=LOOPBACK,
                   help="address to listen on (default: this machine only)")
    s.add_argument("--lens", nargs="*", default=[], help="trained lens folders to offer too")
    s.add_argument("--out", default=None, help="folder the page's Save button writes edits to")
    s.add_argument("--atlas", default=None,
                   help="a neuron atlas folder (engram atlas --out DIR) to page through")
    s.set_defaults(func=serve)


def check_address(host: str, port: int) -> None:
    """Refuse a port outside 1-65535 or one already taken, before the model loads."""
    if not 1 <= port <= 65535:
        raise EngramError(f"--port {port} is not a TCP port; choose one in 1-65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise EngramError(f"cannot listen on {host}:{port} ({e.strerror or e}); pass "
                              "another --port, or stop what uses it") from None


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serve import make_app
    except ImportError:
        raise EngramError("engram serve needs starlette and uvicorn: "
                          "pip install 'engramlab[serve]'") from None
    from ..lens import Lens
    from ..models import load_model

    check_address(args.host, args.port)
    from ..inspect import Atlas

    book = Atlas.load(args.atlas) if args.atlas else None  # a bad folder fails before the model
    if not is_loopback(args.host):
        print(f"engram: warning: listening on {args.host}: anyone who can reach this machine "
              "can run the model; the workbench has no login", file=sys.stderr)
    lm = load_model(args.model, progress=True)
    lenses = {}
    for path in args.lens:
        lens = Lens.load(path, lm)
        lenses[lens.kind if lens.kind not in lenses else f"{lens.kind}:{path}"] = lens
    print(f"engram: workbench for {lm.label} at http://{args.host}:{args.port}/ "
          "(Ctrl-C stops it)", file=sys.stderr)
    uvicorn.run(make_app(lm, lenses, out=args.out, atlas=book), host=args.host, port=args.port,
                log_level="warning")
    return 0
