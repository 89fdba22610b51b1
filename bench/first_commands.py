"""How long a user's first commands take: each default command, run as the user runs it.

Each command runs in its own process with a fresh cache that holds only the dequantized
embedded model (what ``make demo`` leaves behind), so its one-time work (the statistics of its
layers, the lens's training activations, the SAEs) is counted, as on a user's first call; with
``--again``, also a second time with that cache warm, as on every later call. Wall-clock
seconds, including the model's load (memory is ``edit_speed.py``'s).

    .venv/bin/python bench/first_commands.py [--only edit,memit,lens,erase] [--again]
        [--save AREA/RUN]

Prints one JSON object: per command its arguments, ``first_seconds`` (and ``again_seconds``)
and exit codes. Run it on a quiet machine: it measures time, and a second job on the same cores
slows every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import engramlab as eg
import entry
from results import save_run

COMMANDS = {
    "edit": ["edit", "--method", "rome"],
    "memit": ["edit", "--method", "memit", "--protocol", "batch"],
    "lens": ["lens", "train", "--kind", "tuned", "--out", "{tmp}/lens"],
    "erase": ["erase", "--concept", "Harry Potter"],
}


def engram() -> Path:
    """The ``engram`` entry point of this interpreter's environment."""
    return Path(sys.executable).with_name("engram")


def timed(args: list[str], cache: Path) -> tuple[float, int]:
    t = time.perf_counter()
    done = subprocess.run([str(engram()), *args], env={**os.environ, "ENGRAMLAB_CACHE": str(cache)},
                          stdout=subprocess.DEVNULL, stderr=sys.stderr, check=False)
    return time.perf_counter() - t, done.returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(COMMANDS), help="which of " + ",".join(COMMANDS))
    ap.add_argument("--again", action="store_true", help="time a second, warm call too")
    ap.add_argument("--save", default=None, help="AREA/RUN under docs/results/")
    args = ap.parse_args()
    names = args.only.split(",")
    unknown = [n for n in names if n not in COMMANDS]
    if unknown or (args.save and args.save.count("/") != 1):
        print(f"first_commands: error: unknown {unknown}; choose from {list(COMMANDS)}"
              if unknown else "first_commands: error: --save takes AREA/RUN", file=sys.stderr)
        return 2
    models = eg.cache_root() / "models"
    if not engram().exists():
        print(f"first_commands: error: no {engram()}: install the package (make demo)",
              file=sys.stderr)
        return 2
    if not models.is_dir():
        print(f"first_commands: error: no model cache at {models}: run `make demo` first",
              file=sys.stderr)
        return 2
    out: dict = {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "commands": {}}
    for name in names:
        with tempfile.TemporaryDirectory(prefix="engram-first-") as tmp:
            cache = Path(tmp) / "cache"
            cache.mkdir()
            (cache / "models").symlink_to(models)  # the dequantized model, nothing else
            argv = [a.format(tmp=tmp) for a in COMMANDS[name]]
            print(f"first_commands: {name}: engram {' '.join(argv)}", file=sys.stderr,
                  flush=True)
            first, rc = timed(argv, cache)
            row = {"args": COMMANDS[name], "first_seconds": first, "exit_codes": [rc]}
            if args.again:
                shutil.rmtree(Path(tmp) / "lens", ignore_errors=True)
                row["again_seconds"], rc = timed(argv, cache)
                row["exit_codes"].append(rc)
            out["commands"][name] = row
            print(json.dumps({name: out["commands"][name]}), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))
    if args.save:
        params = {k: v for k, v in vars(args).items() if k != "save"}
        print(f"wrote {save_run(*args.save.split('/'), out, params)}", file=sys.stderr)
    return 0 if all(c == 0 for r in out["commands"].values() for c in r["exit_codes"]) else 1


if __name__ == "__main__":
    entry.run(main)
