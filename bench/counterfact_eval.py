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
``docs/results/AREA/RUN/``, after every batch (or ``--chunk`` independent edits) with each
case's scores, so a run that is stopped goes on from its last saved part when started again
(also with a larger ``--n``; ``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import engramlab as eg
import entry
from engramlab.batching import target_ids
from engramlab.data import load_cases
from engramlab.edit import get_editor, run_protocol
from engramlab.edit.targets import TargetMemo
from engramlab.evaluate.bootstrap import case_intervals
from engramlab.evaluate.counterfact import HEADLINE, METRICS, summarize
from results import data_default, run_folder, save_run


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


def chunks_of(n_cases: int, protocol: str, batch_size: int | None, chunk: int) -> list[range]:
    """The case ranges a run is done (and saved) in: one per batch in the batch protocol, runs
    of ``chunk`` cases in the independent one (each edit is alone, so nothing depends on where
    a range ends), the whole run in the sequential one (each edit builds on the ones before)."""
    size = {"batch": batch_size or n_cases, "independent": chunk}.get(protocol, n_cases)
    return [range(s, min(s + size, n_cases)) for s in range(0, n_cases, size)]


def rounded(row: dict) -> dict:
    """A per-case score row with its floats at six decimals (the saved file stays small)."""
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}


def combine(parts: list[dict], flags: list[bool]) -> dict:
    """One run's figures from its saved parts, in case order: means and intervals over every
    case's row, the unedited summary weighted by each part's size, the median time per edit
    with each part's median counted once per case."""
    rows = [r for p in parts for r in p["per_case"]]
    pre = {}
    for key in parts[0]["pre"]:
        values = [(p["pre"][key], p["n"]) for p in parts
                  if isinstance(p["pre"][key], (int, float)) and key != "n"]
        pre[key] = (sum(v * n for v, n in values) / sum(n for _, n in values) if values
                    else parts[0]["pre"][key])
    pre["n"] = len(rows)
    times = sorted(t for p in parts for t in [p["seconds_per_edit"]] * p["n"])
    return {"n": len(rows), "seconds_per_edit": times[len(times) // 2],
            "targets_reused": any(p["targets_reused"] for p in parts),
            "wall_seconds": sum(p["wall_seconds"] for p in parts),
            "hparams": parts[0]["hparams"],
            "all": subset_summary(rows, [True] * len(rows)),
            "known": subset_summary(rows, flags),
            "pre_all": pre, "post_all": summarize(rows)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", **data_default("counterfact/counterfact-val.json"))
    parser.add_argument("--cases", choices=["all", "known"], default="all",
                        help="edit every case (reported on all and on the known ones), or "
                             "only the known ones")
    parser.add_argument("--n", type=int, default=None, help="the first N of those cases")
    parser.add_argument("--runs", nargs="+",
                        default=["rome:independent", "memit:batch", "alphaedit:batch"])
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batch protocol: edits per batch (default: all at once)")
    parser.add_argument("--chunk", type=int, default=200,
                        help="independent protocol: cases done and saved together")
    parser.add_argument("--device", default=None)
    parser.add_argument("--fluency-tokens", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], help="overrides k=v for every method")
    parser.add_argument("--grid", default=None,
                        help="key=v1,v2,...: repeat every run for each value (a dev sweep)")
    parser.add_argument("--save", default=None, help="AREA/RUN under docs/results/")
    parser.add_argument("--fresh", action="store_true",
                        help="with --save: drop the parts a previous run saved")
    args = parser.parse_args()
    if args.save and args.save.count("/") != 1:
        print("counterfact_eval: error: --save takes AREA/RUN, e.g. edit/counterfact_val",
              file=sys.stderr)
        return 2
    params = {k: v for k, v in vars(args).items() if k not in ("save", "fresh")}
    saved: dict = {}
    if args.save and not args.fresh:
        previous = run_folder(*args.save.split("/")) / "result.json"
        if previous.exists():
            old = json.loads(previous.read_text())
            # the parts stay valid when only n changes: the ranges before it are the same
            differ = sorted(k for k in params
                            if k != "n" and old.get("params", {}).get(k) != params[k])
            if differ:
                print(f"counterfact_eval: error: {previous} was made with other {differ}; "
                      "pass --fresh to start over", file=sys.stderr)
                return 2
            saved = old.get("parts", {})
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
           "threads": torch.get_num_threads(), "params": params, "runs": [], "parts": saved}
    runs = [(r, g) for r in args.runs for g in grid]
    labels = {(r, tuple(g.items())): " ".join([r, *(f"{k}={v}" for k, v in g.items())])
              for r, g in runs}
    ranges = {r: chunks_of(len(cases), r.partition(":")[2] or "independent", args.batch_size,
                           args.chunk) for r in args.runs}
    # range by range, every run: MEMIT and AlphaEdit (or a sweep's settings) on the same cases
    # one after the other, so the memo optimises each request's target once and is then dropped
    for i in range(max(len(v) for v in ranges.values())):
        memo, pres = TargetMemo(), {}
        for run, setting in runs:
            if i >= len(ranges[run]):
                continue
            span, label = ranges[run][i], labels[run, tuple(setting.items())]
            key = f"{span.start}-{span.stop}"
            if key in saved.get(label, {}):
                continue
            method, _, protocol = run.partition(":")
            editor = get_editor(method, **overrides, **setting)
            editor.target_memo, editor.progress = memo, True
            hits, t0 = memo.hits, time.perf_counter()
            print(f"{label}: cases {span.start}-{span.stop - 1} of {len(cases)}",
                  file=sys.stderr, flush=True)
            result = run_protocol(lm, editor, cases[span.start:span.stop],
                                  protocol=protocol or "independent",
                                  fluency_tokens=args.fluency_tokens, progress=True,
                                  batch_size=args.batch_size, pre=pres.get(run))
            pres[run] = result.pre  # the same for every grid value
            saved.setdefault(label, {})[key] = {
                "n": result.n, "pre": result.pre, "seconds_per_edit": result.seconds_per_edit,
                "targets_reused": memo.hits > hits,  # then the time excludes the targets
                "wall_seconds": time.perf_counter() - t0, "hparams": result.hparams,
                "per_case": [rounded(r) for r in result.per_case]}
            if args.save:
                save_run(*args.save.split("/"), out, params)
    for run, setting in runs:
        label = labels[run, tuple(setting.items())]
        method, _, protocol = run.partition(":")
        parts = [saved[label][f"{s.start}-{s.stop}"] for s in ranges[run]]
        row = {"method": method, "protocol": protocol or "independent", "grid": setting,
               **combine(parts, flags)}
        out["runs"].append(row)
        print(json.dumps({"done": label, "all": row["all"]["mean"],
                          "known": row["known"]["mean"]}), file=sys.stderr, flush=True)
    if grid != [{}]:
        key = next(iter(grid[0]))
        out["selected"] = {run: one_se_choice([r for r in out["runs"]
                                               if f"{r['method']}:{r['protocol']}" == run], key)
                           for run in args.runs}
    print(json.dumps({k: v for k, v in out.items() if k != "parts"}, indent=1, default=str))
    if args.save:
        print(f"wrote {save_run(*args.save.split('/'), out, params)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    entry.run(main)
