"""Where a benchmark run lands: ``docs/results/<area>/<run>/`` with the command that made it,
its parameters and its JSON (and any figures the benchmark draws there).

Written into a temporary sibling folder and moved into place, so a run that fails or is
interrupted leaves the previous result as it was. Several processes may share one run's parts
(``--share I/N`` of the resumable benches): each merges its new parts into what is on disk
under the run's lock. Also the mean-and-spread summary the benches share.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def run_folder(area: str, run: str) -> Path:
    """``docs/results/<area>/<run>`` (not created)."""
    return RESULTS / area / run


def save_run(area: str, run: str, result: dict[str, Any], params: dict[str, Any],
             files: dict[str, Path] | None = None, command: str | None = None) -> Path:
    """Write command.txt, params.json, result.json (and copies of ``files``) for one run.
    ``--share I/N`` is left out of command.txt: the shares together make what the command
    without it makes. ``command`` (a saved run's own, when only its summaries are redrawn)
    replaces this process's."""
    target = run_folder(area, run)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{run}.", dir=target.parent))
    try:
        argv = [Path(sys.executable).name, *sys.argv]
        if "--share" in argv[:-1]:
            at = argv.index("--share")
            del argv[at:at + 2]
        argv[1] = os.path.relpath(Path(argv[1]).resolve(), RESULTS.parents[1])
        (tmp / "command.txt").write_text(
            command or " ".join(shlex.quote(a) for a in argv) + "\n")
        (tmp / "params.json").write_text(json.dumps(params, indent=1, default=str) + "\n")
        (tmp / "result.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        for name, path in (files or {}).items():
            shutil.copyfile(path, tmp / name)
        os.chmod(tmp, 0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def saved_parts(bench: str, area: str, run: str, params: dict[str, Any], same: Sequence[str],
                key: str, fresh: bool, defaults: dict[str, Any] | None = None
                ) -> dict[str, Any] | None:
    """What a resumable bench saved earlier under ``docs/results/<area>/<run>``: the result's
    ``key`` entry ({} when nothing is saved, or with ``fresh``). None, after a one-line error
    on stderr, when the saved run was made with other values of the ``same`` parameters (the
    caller exits with status 2): parts of different settings must not mix. A parameter the
    saved run does not record (the bench gained it later) counts as its value in ``defaults``,
    the bench's default, which is what that run did."""
    folder = run_folder(area, run)
    if fresh or not (folder / "result.json").exists():
        return {}
    made_with = {**(defaults or {}), **json.loads((folder / "params.json").read_text())}
    made = {k: made_with.get(k) for k in same}
    if made != {k: params[k] for k in same}:
        print(f"{bench}: error: {folder} was made with {made}; pass --fresh to start over",
              file=sys.stderr)
        return None
    return dict(json.loads((folder / "result.json").read_text())[key])


def mean_sd(values: list[float]) -> dict[str, float | None]:
    """``{"mean", "sd"}`` of ``values``: the mean (None for none) and the sample standard
    deviation (None for fewer than two), the spread every bench summary reports."""
    return {"mean": sum(values) / len(values) if values else None,
            "sd": statistics.stdev(values) if len(values) > 1 else None}


@contextlib.contextmanager
def run_lock(area: str, run: str) -> Iterator[None]:
    """Hold ``docs/results/<area>/.<run>.lock``: the processes that share a run's parts read,
    merge and write them one at a time."""
    folder = RESULTS / area
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".{run}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def saved_result(area: str, run: str) -> dict[str, Any]:
    """The run's result.json as it is on disk now ({} when there is none); read it under
    :func:`run_lock` where another process may be writing the run."""
    path = run_folder(area, run) / "result.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def drop_saved(area: str, run: str, result: dict[str, Any], params: dict[str, Any]) -> None:
    """``--fresh`` for a run whose saves merge into the parts on disk: replace the saved run
    by ``result`` now, or the first merge would bring the old parts back."""
    with run_lock(area, run):
        save_run(area, run, result, params)


def merged(on_disk: dict[str, Any], mine: dict[str, Any]) -> dict[str, Any]:
    """Nested parts: those on disk with ``mine`` added (a leaf of ``mine`` wins)."""
    out = dict(on_disk)
    for key, value in mine.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def share_spec(text: str) -> tuple[int, int]:
    """``I/N`` (argparse type): this process's share of a run split over N processes."""
    i, _, n = text.partition("/")
    if not (i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)):
        raise argparse.ArgumentTypeError(f"takes I/N with 0 <= I < N, got {text!r}")
    return int(i), int(n)


def data_default(sub: str) -> dict[str, Any]:
    """argparse keywords for a data set's path: ``$ENGRAMLAB_DATA/<sub>`` by default when that
    variable names the folder that holds the data sets (``counterfact/``, ``pararel/``, ...),
    else the flag is required."""
    root = os.environ.get("ENGRAMLAB_DATA")
    return {"default": str(Path(root) / sub)} if root else {"required": True}
