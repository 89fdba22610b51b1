"""CounterFact results: every method and protocol, on all cases and on the ones the model knows.

Efficacy and paraphrase do not need the model to know the true object (they compare the new
object against the true one), so every case is edited; a case is *known* when the unedited
model's greedy next token after the edit prompt is the first token of the true object, and the
figures are reported on both sets, each mean with a 95 % bootstrap interval over cases
(2,000 resamples, seeded). Presets are chosen on other data (the bundled facts, CounterFact-train
for MEMIT's λ: ``--data .../counterfact-train.json``), never on the cases reported here.

    .venv/bin/python bench/counterfact_eval.py [--model smollm2-135m] [--data PATH]
        [--cases all|known] [--n N] [--runs rome:independent memit:batch ...] [--set k=v ...]
        [--save AREA/RUN]

Prints one JSON object; with ``--save``, also writes it with its command and parameters to
``docs/results/AREA/RUN/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import engramlab as eg
from engramlab.batching import target_ids
from engramlab.data import load_cases
from engramlab.edit import get_editor, run_protocol
from engramlab.edit.protocols import HEADLINE
from engramlab.edit.targets import TargetMemo
from engramlab.evaluate.bootstrap import case_intervals
from engramlab.evaluate.counterfact import METRICS, summarize
from results import save_run

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/counterfact/counterfact-val.json"


def known_flags(lm, cases, batch_size: int = 64) -> list[bool]:
    """Per case: is the true object's first token the model's greedy next token?"""
    flags = []
    for start in range(0, len(cases), batch_size):
        part = cases[start:start + batch_size]
        top = lm.next_token_logits([c.request.text for c in part]).argmax(-1).tolist()
        for case, t in zip(part, top, strict=True):
            flags.append(bool(case.request.target_true) and
                         target_ids(lm, case.request.text, case.request.target_true)[0] == t)
    return flags


def subset_summary(rows: list[dict], keep: list[bool]) -> dict:
    """Means and 95 % intervals of the headline metrics over the rows where ``keep``."""
    chosen = [r for r, k in zip(rows, keep, strict=True) if k]
    means = summarize(chosen)
    return {"n": len(chosen), "mean": {k: means[k] for k in HEADLINE},
            "ci95": case_intervals(chosen, {k: METRICS[k] for k in HEADLINE})}


def one_se_choice(runs: list[dict], key: str) -> dict:
    """The grid value a development sweep chooses, by the one-standard-error rule: the best
    run has the highest harmonic mean of efficacy, paraphrase and neighbourhood (CounterFact's
    score) on all cases; among the runs whose three figures are each within one standard error
    of the best's (its 95 % interval's width / 3.92), the one with the largest ``key`` is
    chosen (for MEMIT's λ: the most regularised setting that cannot be told from the best)."""
    def score(r: dict) -> float:
        return len(HEADLINE) / sum(1 / max(r["all"]["mean"][m], 1e-9) for m in HEADLINE)

    best = max(runs, key=score)
    floor = {m: best["all"]["mean"][m] - (best["all"]["ci95"][m][1]
                                          - best["all"]["ci95"][m][0]) / 3.92
             for m in HEADLINE}
    ok = [r for r in runs if all(r["all"]["mean"][m] >= floor[m] for m in HEADLINE)]
    chosen = max(ok, key=lambda r: float(r["grid"][key]))
    return {"rule": "one standard error from the best harmonic mean, largest value",
            "best": best["grid"][key], "chosen": chosen["grid"][key],
            "within_one_se": [r["grid"][key] for r in ok]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--cases", choices=["all", "known"], default="all",
                        help="edit every case (reported on all and on the known ones), or "
                             "only the known ones")
    parser.add_argument("--n", type=int, default=None, help="the first N of those cases")
    parser.add_argument("--runs", nargs="+",
                        default=["rome:independent", "memit:batch", "alphaedit:batch"])
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batch protocol: edits per batch (default: all at once)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--fluency-tokens", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], help="overrides k=v for every method")
    parser.add_argument("--grid", default=None,
                        help="key=v1,v2,...: repeat every run for each value (a dev sweep)")
    parser.add_argument("--save", default=None, help="AREA/RUN under docs/results/")
    args = parser.parse_args()
    if args.save and args.save.count("/") != 1:
        print("counterfact_eval: error: --save takes AREA/RUN, e.g. edit/counterfact_val",
              file=sys.stderr)
        return 2
    lm = eg.load_model(args.model, progress=False, device=args.device)
    cases = load_cases(args.data)
    if args.cases == "all":
        cases = cases[:args.n]
        flags = known_flags(lm, cases)
    else:  # read the cases in order until n known ones are found
        known: list = []
        for start in range(0, len(cases), 256):
            part = cases[start:start + 256]
            known += [c for c, k in zip(part, known_flags(lm, part), strict=True) if k]
            if args.n is not None and len(known) >= args.n:
                break
        cases = known[:args.n]
        flags = [True] * len(cases)
    overrides = dict(kv.split("=", 1) for kv in args.set)
    grid: list[dict[str, str]] = [{}]
    if args.grid:
        key, _, values = args.grid.partition("=")
        grid = [{key: v} for v in values.split(",")]
    out = {"model": args.model, "data": Path(args.data).name, "cases": len(cases),
           "known": sum(flags), "device": str(lm.device),
           "gpu": torch.cuda.get_device_name() if lm.device.type == "cuda" else None,
           "threads": torch.get_num_threads(), "runs": []}
    # one memo for every run: a sweep, or MEMIT and AlphaEdit with the same target settings,
    # optimise each request's target once
    memo = TargetMemo()
    pres: dict[str, dict] = {}
    for run, setting in ((r, g) for r in args.runs for g in grid):
        method, _, protocol = run.partition(":")
        editor = get_editor(method, **overrides, **setting)
        editor.target_memo, editor.progress = memo, True
        hits, t0 = editor.target_memo.hits, time.perf_counter()
        result = run_protocol(lm, editor, cases, protocol=protocol or "independent",
                              fluency_tokens=args.fluency_tokens, progress=True,
                              batch_size=args.batch_size,
                              pre=pres.get(run))
        pres[run] = result.pre  # the unedited scores are the same for every grid value
        row = {"method": method, "protocol": result.protocol, "n": result.n, "grid": setting,
               "seconds_per_edit": result.seconds_per_edit,
               "targets_reused": editor.target_memo.hits > hits,  # then the time excludes them
               "wall_seconds": time.perf_counter() - t0, "hparams": result.hparams,
               "all": subset_summary(result.per_case, [True] * len(flags)),
               "known": subset_summary(result.per_case, flags),
               "pre_all": result.pre, "post_all": result.post}
        out["runs"].append(row)
        print(json.dumps({"done": run, **setting, "all": row["all"]["mean"],
                          "known": row["known"]["mean"]}), file=sys.stderr, flush=True)
    if grid != [{}]:
        key = next(iter(grid[0]))
        out["selected"] = {run: one_se_choice([r for r in out["runs"]
                                               if f"{r['method']}:{r['protocol']}" == run], key)
                           for run in args.runs}
    print(json.dumps(out, indent=1, default=str))
    if args.save:
        area, name = args.save.split("/")
        params = {k: v for k, v in vars(args).items() if k != "save"}
        print(f"wrote {save_run(area, name, out, params)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
