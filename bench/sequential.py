"""Sequential editing as edits accumulate: MEMIT, AlphaEdit and DeltaEdit (the AlphaEdit paper's
Fig. 1, and DeltaEdit's superimposed noise).

Counterfactual cases generated from ParaRel × T-REx (real paraphrases) are edited in batches of
each ``--batch-sizes``, one batch after another on the weights the previous left. Every
``--eval-every`` edits all edits so far are scored, and the superimposed noise is recorded
throughout (:mod:`engramlab.edit.noise`): per batch, the past updates' response at the new keys
relative to the change the edit asks for; at each evaluation, the earlier edits' drift from their
targets. Nothing is tuned here: every method runs its preset. ``--skip`` leaves out the first
generated cases, so a development split (``--n 200``) and a reported one (``--skip 200``) never
share a case. ``--jobs J`` runs J parts at once, each in its own process with its own copy
of the model (for machines with more cores, or a GPU, than one part keeps busy).

The run is saved under ``docs/results/<--save>`` after each (method, batch size) part and
resumes: parts already saved are kept (``--fresh`` drops them), and a part that was
interrupted goes on from its checkpoint (``--checkpoints``, saved at every evaluation).
Each part keeps its per-case scores after the last edit (with 95 % bootstrap intervals), and
``comparisons`` holds, per batch size, each pair of methods' per-case differences with their
intervals (the cases are the same, so the difference is paired). ``--redo PART`` runs a saved
part again; one whose checkpoint holds its last batch is only scored again. Figures:
``sequential.png`` (scores as edits accumulate) and ``noise.png`` (noise ratio per batch,
drift at evaluations).

    .venv/bin/python bench/sequential.py --data PARAREL_DIR --save edit/sequential_smollm2_cpu \
        [--n 1000] [--batch-sizes 1 10] [--eval-every 100] [--methods memit alphaedit deltaedit]
    .venv/bin/python bench/sequential.py --plot edit/sequential_smollm2_cpu   # no model
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import engramlab as eg
import entry
from engramlab.data import pararel_cases
from engramlab.edit import get_editor, run_protocol
from engramlab.evaluate.bootstrap import case_intervals, paired_intervals
from engramlab.evaluate.counterfact import HEADLINE, METRICS
from results import drop_saved, run_folder, run_lock, save_run, saved_parts, saved_result

SEQUENTIAL = ("memit", "alphaedit", "deltaedit")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=None, help="the ParaRel folder (pararel_cases)")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--skip", type=int, default=0,
                    help="leave out the first SKIP generated cases (a development split)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--eval-every", type=int, default=100, help="edits between evaluations")
    ap.add_argument("--methods", nargs="+", default=list(SEQUENTIAL))
    ap.add_argument("--set", nargs="*", default=[], help="overrides k=v for every method")
    ap.add_argument("--device", default=None)
    ap.add_argument("--jobs", type=int, default=1,
                    help="parts run at once, each in its own process with its own model copy "
                         "(for more cores than one part keeps busy)")
    ap.add_argument("--save", default=None, help="AREA/RUN under docs/results/")
    ap.add_argument("--checkpoints", default=None,
                    help="folder of each part's checkpoint, from which an interrupted part "
                         "resumes (default: under the cache, per run; 'none': no checkpoints)")
    ap.add_argument("--fresh", action="store_true", help="drop the parts already saved")
    ap.add_argument("--redo", nargs="+", default=[], metavar="PART",
                    help="saved parts to run again (e.g. alphaedit:b10); a part whose "
                         "checkpoint holds its last batch is only scored again")
    ap.add_argument("--plot", default=None,
                    help="AREA/RUN: redraw a saved run's figures and summaries, no model")
    args = ap.parse_args()
    if args.plot:  # the figures and the summaries, from the saved parts; no model
        area, _, run = args.plot.partition("/")
        folder = run_folder(area, run)
        if not (folder / "result.json").is_file():
            print(f"sequential: error: no saved run at {folder}; --plot takes AREA/RUN",
                  file=sys.stderr)
            return 2
        with run_lock(area, run):
            saved = json.loads((folder / "result.json").read_text())
            params = json.loads((folder / "params.json").read_text())
            _write(area, run, saved, params, command=(folder / "command.txt").read_text())
        return 0
    wrong = [m for m in args.methods if m not in SEQUENTIAL]
    if wrong or not args.save or args.save.count("/") != 1 or not args.data:
        print("sequential: error: " + (
            f"methods {wrong} have no sequential target layer; choose from {SEQUENTIAL}"
            if wrong else "--data PARAREL_DIR and --save AREA/RUN are required"),
            file=sys.stderr)
        return 2
    if any(b < 1 or args.eval_every % b for b in args.batch_sizes):
        print("sequential: error: every batch size must divide --eval-every", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print("sequential: error: --jobs must be at least 1", file=sys.stderr)
        return 2
    area, run = args.save.split("/")
    params = {k: v for k, v in vars(args).items()
              if k not in ("save", "fresh", "redo", "plot", "jobs", "checkpoints")}
    overrides = dict(kv.split("=", 1) for kv in args.set)
    for method in args.methods:  # bad settings fail before the model loads
        get_editor(method, **overrides)
    parts = saved_parts("sequential", area, run, params,
                        ("model", "n", "skip", "eval_every", "set"), "parts", args.fresh)
    if parts is None:
        return 2
    planned = {f"{m}:b{b}" for m in args.methods for b in args.batch_sizes}
    unknown = [k for k in args.redo if k not in parts or k not in planned]
    if unknown:  # a dropped part this command would not run again would be lost
        print(f"sequential: error: --redo takes saved parts that --methods and --batch-sizes "
              f"also name, not {unknown}; saved: {sorted(parts)}", file=sys.stderr)
        return 2
    for key in args.redo:  # out of this process's view, so that they run again
        del parts[key]
    command = None
    if args.redo:  # parts of the saved run made again: its command and parameters stay
        folder = run_folder(area, run)
        command = (folder / "command.txt").read_text()
        params = json.loads((folder / "params.json").read_text())
    lm = eg.load_model(args.model, progress=False, device=args.device)
    cases = pararel_cases(args.data, args.skip + args.n, seed=0)[args.skip:]
    out = {"model": args.model, "n": len(cases), "device": str(lm.device),
           "gpu": torch.cuda.get_device_name() if lm.device.type == "cuda" else None,
           "threads": torch.get_num_threads(), "parts": parts}
    todo = [(method, size) for size in args.batch_sizes for method in args.methods
            if f"{method}:b{size}" not in parts]
    # every part edits the same cases of the same model: the unedited scores are one
    pre = next((part["pre"] for part in parts.values()), None)
    checkpoints = None if args.checkpoints == "none" else Path(
        args.checkpoints or eg.cache_root() / "checkpoints" / "sequential" / f"{area}-{run}")
    if args.fresh and checkpoints is not None and checkpoints.exists():
        shutil.rmtree(checkpoints)
    # the parts this process makes; a save merges them into the run on disk, where a part
    # being redone stays as it was until its new version replaces it
    mine: dict = {}
    if args.fresh:
        drop_saved(area, run, out, params)
    if args.jobs == 1:
        for method, size in todo:
            key, mine[key] = run_part(lm, cases, method, size, args.eval_every, overrides,
                                       checkpoints, pre)
            save(area, run, out, params, mine, command)
    else:
        for method in args.methods:  # statistics and templates cached once, before the fork
            get_editor(method, progress=False, **overrides).prepare(lm)
        del lm
        threads = max(1, (os.cpu_count() or 1) // min(args.jobs, len(todo) or 1))
        tasks = [(args.model, args.device, threads, cases, method, size, args.eval_every,
                  overrides, checkpoints, pre) for method, size in todo]
        # a Pool, not an executor: leaving the block on Ctrl-C terminates the workers at once
        with mp.get_context("spawn").Pool(min(args.jobs, len(tasks) or 1),
                                          initializer=entry.quiet_worker) as pool:
            for key, part in pool.imap_unordered(_part_in_process, tasks):
                mine[key] = part
                save(area, run, out, params, mine, command)
    save(area, run, out, params, mine, command)
    print(json.dumps({k: {m: p["post"][m] for m in HEADLINE} for k, p in out["parts"].items()},
                     indent=1))
    return 0


def run_part(lm: eg.LM, cases: list, method: str, size: int, eval_every: int,
             overrides: dict[str, str], checkpoints: Path | None,
             pre: dict | None = None) -> tuple[str, dict]:
    """One (method, batch size) sequential run, as the result's part; it resumes from its
    checkpoint under ``checkpoints`` when an earlier attempt was interrupted. ``pre``, the
    unedited model's scores of these cases, is scored here when not given."""
    key = f"{method}:b{size}"
    print(f"{key}: {len(cases)} edits in batches of {size}", file=sys.stderr, flush=True)
    editor = get_editor(method, progress=False, **overrides)
    t0 = time.perf_counter()
    result = run_protocol(
        lm, editor, cases, protocol="sequential", batch_size=size,
        eval_every=eval_every // size, noise=True, progress=True, pre=pre,
        on_point=lambda p: print(json.dumps({key: p}), file=sys.stderr, flush=True),
        checkpoint=None if checkpoints is None else checkpoints / f"{method}-b{size}")
    noise = result.noise or {}
    fields = {k: METRICS[k] for k in HEADLINE}
    return key, {
        "method": method, "batch_size": size, "pre": result.pre, "post": result.post,
        "post_ci95": case_intervals(result.per_case, fields),
        # per case, in the run's case order: what paired comparisons between methods read
        "per_case": [{k: r.get(f) for k, f in fields.items()} for r in result.per_case],
        "curve": result.curve, "seconds_per_edit": result.seconds_per_edit,
        "wall_seconds": time.perf_counter() - t0,
        "noise": {"layer": noise.get("layer"), "points": noise.get("points", []),
                  "steps": [{k: v for k, v in s.items() if k != "per_request"}
                            for s in noise.get("steps", [])]},
        "hparams": result.hparams}


def _part_in_process(task: tuple) -> tuple[str, dict]:
    model, device, threads, cases, method, size, eval_every, overrides, checkpoints, pre = task
    torch.set_num_threads(threads)
    lm = eg.load_model(model, progress=False, device=device)
    return run_part(lm, cases, method, size, eval_every, overrides, checkpoints, pre)


# (b, a): b − a per case, for every batch size at which both ran
COMPARED = (("alphaedit", "memit"), ("deltaedit", "alphaedit"), ("deltaedit", "memit"))


def headline(parts: dict, first: int = 5) -> dict:
    """Per part, what the README quotes: the scores after the last edit, the noise ratio
    averaged over the first and the last ``first`` batches that have one, the earlier edits'
    drift and its linear part at the last evaluation, and the requests DeltaEdit projected."""
    out = {}
    for key, part in parts.items():
        ratio = [s["mean_ratio"] for s in part["noise"]["steps"] if "mean_ratio" in s]
        last = part["curve"][-1] if part["curve"] else {}
        out[key] = {"edits": last.get("edits"), **{k: last.get(k) for k in HEADLINE},
                    "noise_ratio_first": statistics.fmean(ratio[:first]) if ratio else None,
                    "noise_ratio_last": statistics.fmean(ratio[-first:]) if ratio else None,
                    "drift": last.get("mean_drift"), "later_noise": last.get("mean_later_noise"),
                    "projected": part["noise"]["steps"][-1].get("projected")
                    if part["noise"]["steps"] else None}
    return out


def comparisons(parts: dict) -> dict:
    """After the last edit, each pair of methods at one batch size scored on the same cases:
    the per-case difference of every headline score with its 95 % bootstrap interval."""
    out = {}
    for b, a in COMPARED:
        for key_b in [k for k in parts if k.startswith(f"{b}:")]:
            key_a = f"{a}:{key_b.partition(':')[2]}"
            if parts.get(key_a, {}).get("per_case") and parts[key_b].get("per_case"):
                out[f"{key_b} − {key_a}"] = paired_intervals(
                    parts[key_a]["per_case"], parts[key_b]["per_case"], {k: k for k in HEADLINE})
    return out


def save(area: str, run: str, out: dict, params: dict, mine: dict,
         command: str | None = None) -> None:
    """The run's JSON with both figures beside it: the parts on disk, which another process
    on the same run may have added to since this one started, with ``mine`` (whole parts)
    put in."""
    with run_lock(area, run):
        out["parts"] = {**saved_result(area, run).get("parts", {}), **mine}
        _write(area, run, out, params, command)


def _write(area: str, run: str, out: dict, params: dict, command: str | None = None) -> None:
    out["headline"] = headline(out["parts"])
    out["comparisons"] = comparisons(out["parts"])
    with tempfile.TemporaryDirectory() as tmp:
        figures = {"sequential.png": Path(tmp) / "s.png", "noise.png": Path(tmp) / "n.png"}
        plot_scores(out, figures["sequential.png"])
        plot_noise(out, figures["noise.png"])
        save_run(area, run, out, params, files=figures, command=command)


def _style(key: str) -> dict:
    method, _, size = key.partition(":b")
    colours = {"memit": "tab:blue", "alphaedit": "tab:orange", "deltaedit": "tab:green"}
    return {"color": colours.get(method, "black"), "ls": "-" if size == "1" else "--",
            "label": f"{method}, batches of {size}"}


def _in_order(parts: dict) -> list[tuple[str, dict]]:
    """Parts in the figures' legend order: by method as SEQUENTIAL lists them, then batch size,
    whatever order the runs saved them in."""
    def rank(key: str) -> tuple[int, int]:
        method, _, size = key.partition(":b")
        return (SEQUENTIAL.index(method) if method in SEQUENTIAL else len(SEQUENTIAL),
                int(size) if size.isdigit() else 0)

    return sorted(parts.items(), key=lambda item: rank(item[0]))


def plot_scores(out: dict, png: Path) -> None:
    from engramlab.figures import figure

    with figure(png, ncols=3, figsize=(13, 3.8)) as (fig, axes):
        for ax, metric in zip(axes, HEADLINE, strict=True):
            for key, part in _in_order(out["parts"]):
                curve = [{"edits": 0, metric: part["pre"][metric]}] + part["curve"]
                ax.plot([p["edits"] for p in curve], [p[metric] for p in curve],
                        marker="o", ms=3, **_style(key))
            ax.set_title(metric)
            ax.set_xlabel("edits so far")
            ax.set_ylim(0, 1.02)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"sequential editing, {out['model']} (scores of every edit so far)")


def plot_noise(out: dict, png: Path) -> None:
    from engramlab.figures import figure

    with figure(png, ncols=2, figsize=(11, 3.8)) as (_fig, (left, right)):
        for key, part in _in_order(out["parts"]):
            steps = [s for s in part["noise"]["steps"] if "mean_ratio" in s]
            if not steps:
                continue
            window = max(1, 20 // part["batch_size"])  # the mean over about 20 edits
            ratios = torch.tensor([s["mean_ratio"] for s in steps])
            smooth = ratios.unfold(0, window, 1).mean(1) if len(ratios) >= window else ratios
            x = [s["edits"] for s in steps][len(steps) - len(smooth):]
            left.plot(x, smooth.tolist(), lw=1, **_style(key))
            points = part["noise"]["points"]
            right.plot([p["edits"] for p in points], [p["mean_drift"] for p in points],
                       marker="o", ms=3, **_style(key))
        for ax in (left, right):  # MEMIT's noise and drift are 10-30 times the others'
            ax.set_yscale("log")
        left.set_xlabel("edits so far")
        left.set_ylabel("‖ΔW_past k‖ / ‖z − h‖ (running mean)")
        left.set_title("superimposed noise at each new key")
        right.set_xlabel("edits so far")
        right.set_ylabel("mean ‖h − z‖ over earlier edits")
        right.set_title("earlier edits' drift from their targets")
        left.legend(fontsize=7)


if __name__ == "__main__":
    entry.run(main)
