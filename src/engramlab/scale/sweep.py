"""Sweeps: a grid of independent jobs, run here one after another or as Ray tasks.

A sweep file names an ``engram`` command, the options every job shares and a grid of options
to cross::

    command: [erase]
    fixed: {model: smollm2-135m, concept: paris}
    grid: {method: [features, npo, rmu], seed: [0, 1, 2]}
    resources: {num_cpus: 1}          # per Ray task (num_gpus, memory, custom resources)

Each job is the command with ``--key value`` for its options plus ``--json``, run in-process
(``engramlab.cli.main``) in this process or in a Ray worker; its printed JSON is its result.

The result folder holds ``sweep.json`` (the spec and every job), ``jobs/<id>.json`` per
finished job and ``results.jsonl`` (every finished job, in grid order). A job's id is a hash
of its command line, so a sweep run again into the same folder (after a crash, Ctrl-C or a
lost node) runs only the jobs without a result; the driver alone writes results, each file
atomically and once, so a job that Ray reran after its worker died is not counted twice and
nothing needs a filesystem shared with the workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._io import atomic_file, output_lock, read_text
from ..errors import InputError

JobFn = Callable[[Sequence[str]], dict[str, Any]]

RESOURCE_KEYS = {"num_cpus", "num_gpus", "memory", "resources"}


@dataclass(frozen=True)
class Job:
    """One point of the grid: its options and the command line they make."""

    index: int
    params: dict[str, Any]
    argv: tuple[str, ...]

    @property
    def id(self) -> str:
        return hashlib.sha256("\0".join(self.argv).encode()).hexdigest()[:12]


@dataclass
class Sweep:
    command: list[str]
    grid: dict[str, list[Any]] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)
    retries: int = 2

    @classmethod
    def from_dict(cls, raw: Any, where: str = "sweep") -> Sweep:
        if not isinstance(raw, dict):
            raise InputError(f"{where}: expected a mapping with 'command' and 'grid'")
        unknown = set(raw) - {"command", "grid", "fixed", "resources", "retries"}
        if unknown:
            raise InputError(f"{where}: unknown key(s) {sorted(unknown)}; use command, grid, "
                             "fixed, resources, retries")
        command = raw.get("command")
        if isinstance(command, str):
            command = command.split()
        if not command or not all(isinstance(w, str) for w in command):
            raise InputError(f"{where}: 'command' must name an engram command, e.g. "
                             "[erase] or [lens, train]")
        grid = raw.get("grid") or {}
        if not isinstance(grid, dict) or not all(isinstance(v, list) and v
                                                 for v in grid.values()):
            raise InputError(f"{where}: 'grid' must map each option to a non-empty list")
        fixed = raw.get("fixed") or {}
        resources = raw.get("resources") or {}
        if not isinstance(fixed, dict) or not isinstance(resources, dict):
            raise InputError(f"{where}: 'fixed' and 'resources' must be mappings")
        strange = sorted(set(resources) - RESOURCE_KEYS)
        if strange:
            raise InputError(f"{where}: unknown resource(s) {strange}; use "
                             f"{', '.join(sorted(RESOURCE_KEYS))}")
        both = set(grid) & set(fixed)
        if both:
            raise InputError(f"{where}: {sorted(both)} both fixed and in the grid; keep one")
        retries = raw.get("retries", 2)
        if not isinstance(retries, int) or retries < 0:
            raise InputError(f"{where}: 'retries' must be a whole number of at least 0")
        return cls(list(command), dict(grid), dict(fixed), dict(resources), retries)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Sweep:
        import yaml

        text = read_text(path, "sweep file")
        try:
            raw = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        except Exception as exc:  # json and yaml raise unrelated error types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"sweep file {path} is not valid JSON/YAML ({first})") from None
        return cls.from_dict(raw, where=f"sweep file {path}")

    def jobs(self) -> list[Job]:
        keys = list(self.grid)
        out = []
        for index, values in enumerate(itertools.product(*(self.grid[k] for k in keys))):
            params = dict(zip(keys, values, strict=True))
            argv = (*self.command, *options_argv({**self.fixed, **params}), "--json")
            out.append(Job(index, params, argv))
        return out

    def to_json(self) -> dict[str, Any]:
        return {"command": self.command, "grid": self.grid, "fixed": self.fixed,
                "resources": self.resources, "retries": self.retries}


def options_argv(options: dict[str, Any]) -> list[str]:
    """``{"batch_size": 8, "layers": [4, 5], "no_cache": True}`` → ``--batch-size 8 --layers 4
    5 --no-cache`` (False and None leave the option out)."""
    argv: list[str] = []
    for key, value in options.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, list | tuple):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


class JobFailed(RuntimeError):
    """A job's command exited with an error; its message is the command's last stderr line."""


def run_engram(argv: Sequence[str]) -> dict[str, Any]:
    """Run ``engram <argv>`` in this process and return the JSON it printed."""
    from ..cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse refusing the job's options
            code = exc.code if isinstance(exc.code, int) else 2
    if code != 0:
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        raise JobFailed(lines[-1] if lines else f"engram {' '.join(argv)} exited with {code}")
    try:
        return json.loads(out.getvalue())
    except ValueError:
        raise JobFailed(f"engram {' '.join(argv)} printed no JSON object") from None


def _timed(fn: JobFn, argv: Sequence[str]) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        return {"result": fn(argv), "seconds": time.perf_counter() - start}
    except JobFailed as exc:
        return {"error": str(exc), "seconds": time.perf_counter() - start}


@dataclass
class SweepOutcome:
    out: Path
    jobs: int
    ran: int
    resumed: int
    failed: dict[str, str]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"out": str(self.out), "jobs": self.jobs, "ran": self.ran,
                "resumed": self.resumed, "failed": self.failed, "seconds": self.seconds}


def run_sweep(sweep: Sweep, out: str | os.PathLike[str], *, fn: JobFn = run_engram,
              ray: str | None = None, progress: bool = True) -> SweepOutcome:
    """Run every job of ``sweep`` that has no result in ``out`` yet; here one after another,
    or as Ray tasks (``ray``: ``"local"``, ``"auto"`` or ``"HOST:PORT"``)."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    jobs = sweep.jobs()
    if ray is not None:  # refused before anything is written
        from .cluster import require_ray

        require_ray()
    with output_lock(out) as folder:
        (folder / "jobs").mkdir(parents=True, exist_ok=True)
        _write_json(folder / "sweep.json", {**sweep.to_json(), "jobs": [
            {"id": j.id, "params": j.params, "argv": list(j.argv)} for j in jobs]})
        todo = [j for j in jobs if not (folder / "jobs" / f"{j.id}.json").is_file()]
        failed: dict[str, str] = {}
        bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="sweep", unit="job",
                   disable=not progress)

        def record(job: Job, outcome: dict[str, Any]) -> None:
            bar.update(1)
            if "error" in outcome:
                failed[job.id] = outcome["error"]
                return
            _write_json(folder / "jobs" / f"{job.id}.json",
                        {"id": job.id, "index": job.index, "params": job.params,
                         "argv": list(job.argv), **outcome})

        try:
            if ray is None:
                for job in todo:
                    record(job, _timed(fn, job.argv))
            else:
                _run_on_ray(todo, sweep, fn, ray, record)
        finally:
            bar.close()
            _collect(folder, jobs)
    return SweepOutcome(Path(folder), len(jobs), len(todo) - len(failed),
                        len(jobs) - len(todo), failed, time.perf_counter() - start)


def _run_on_ray(todo: list[Job], sweep: Sweep, fn: JobFn, address: str,
                record: Callable[[Job, dict[str, Any]], None]) -> None:
    from .cluster import connected, drain

    with connected(address) as ray:
        options = {"num_cpus": 1, **sweep.resources, "max_retries": sweep.retries}
        task = ray.remote(_timed).options(**options)
        owner = {task.remote(fn, job.argv): job for job in todo}
        drain(list(owner), lambda ref, outcome: record(owner[ref], outcome))


def _collect(folder: Path, jobs: list[Job]) -> None:
    """``results.jsonl``: every job with a result, in grid order."""
    lines = []
    for job in jobs:
        path = folder / "jobs" / f"{job.id}.json"
        if path.is_file():
            lines.append(json.dumps(json.loads(path.read_text())))
    with atomic_file(folder / "results.jsonl") as tmp:
        tmp.write_text("".join(line + "\n" for line in lines))


def _write_json(path: Path, obj: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
