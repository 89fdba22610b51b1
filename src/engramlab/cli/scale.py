"""``engram sweep``: a grid of independent jobs, here or on Ray."""

from __future__ import annotations

import argparse

from .common import add_common, emit


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("sweep", help="run a grid of engram jobs (here, or as Ray tasks) into "
                                     "one result folder; run again to resume")
    s.add_argument("spec", help="sweep file (YAML or JSON): command, fixed, grid, resources")
    # not dest "out": the sweep takes the folder's lock itself (also when called from Python)
    s.add_argument("--out", dest="folder", required=True,
                   help="result folder: sweep.json, jobs/<id>.json, results.jsonl")
    s.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run the jobs as Ray tasks: a local cluster, or ADDRESS ('auto' or "
                        "HOST:PORT) of a running one")
    add_common(s, model=False)
    s.set_defaults(func=sweep)


def sweep(args: argparse.Namespace) -> int:
    from ..scale import Sweep, run_sweep

    spec = Sweep.load(args.spec)
    outcome = run_sweep(spec, args.folder, ray=args.ray, progress=True)
    lines = [f"{outcome.jobs} jobs: {outcome.ran} ran, {outcome.resumed} already done, "
             f"{len(outcome.failed)} failed, in {outcome.seconds:.1f} s; results in "
             f"{outcome.out / 'results.jsonl'}"]
    lines += [f"  failed {job}: {why}" for job, why in outcome.failed.items()]
    emit(args, outcome.to_json(), lines)
    return 1 if outcome.failed else 0
