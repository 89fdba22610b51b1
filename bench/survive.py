"""Do edits survive fine-tuning? The grid of Cheng et al., "Can Fine-Tuning Erase Your Edits? On
the Fragile Coexistence of Knowledge Editing and Adaptation", on one model.

For each seed, ``--n`` counterfactual cases generated from ParaRel × T-REx (a different draw per
seed) are edited in one batch by each editor; each edit is then fine-tuned in every mode (full,
edited layers only, every layer but those, LoRA, DoRA) on each data set: ``wiki`` (plain text)
and ``trex`` (T-REx cloze questions whose subjects are not edited, trained on the answers). The
downstream score of every cell is accuracy on the T-REx questions' test part (subjects neither
edited nor trained on), before and after the fine-tune. Nothing is tuned: the fine-tuning
settings are fixed in advance (``--steps``, ``--lr`` for full-weight modes, ``--adapter-lr`` for
LoRA / DoRA, as PEFT practice trains adapters at a larger rate).

The summary answers the paper's four findings per data set, each with its numbers, mean ± sd
over seeds: (1) edits decay (efficacy survival below 1 in every mode); (2) AlphaEdit's edits
decay more than MEMIT's (lower survival on average over the modes); (3) fine-tuning only the
edited layers removes more edits than full fine-tuning, at a small downstream cost; (4)
fine-tuning every layer but the edited ones impairs more edits than full fine-tuning.

The run is saved under ``docs/results/<--save>`` after every cell and resumes (``--fresh``
starts over); ``survival.png`` draws survival and downstream per mode and editor.

    .venv/bin/python bench/survive.py --pararel PARAREL_DIR --save adapt/survive_smollm2_cpu \
        [--editors memit alphaedit] [--modes full edited non-edited lora dora] \
        [--data wiki trex] [--seeds 0 1 2] [--n 100] [--steps 50]
    .venv/bin/python bench/survive.py --plot adapt/survive_smollm2_cpu   # the figure only
    .venv/bin/python bench/survive.py --table adapt/survive_smollm2_cpu  # the summary table
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import engramlab as eg
import entry
from engramlab.adapt import MODES, FinetuneConfig, score_edited, survive
from engramlab.data import pararel_cases
from engramlab.data.corpus import get_corpus
from engramlab.data.tasks import load_task
from engramlab.edit import get_editor
from results import mean_sd, run_folder, save_run, saved_parts

DATA = ("wiki", "trex")
ADAPTERS = ("lora", "dora")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pararel", default=None, help="the ParaRel folder (cases and questions)")
    ap.add_argument("--editors", nargs="+", default=["memit", "alphaedit"])
    ap.add_argument("--modes", nargs="+", default=list(MODES))
    ap.add_argument("--data", nargs="+", default=list(DATA))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n", type=int, default=100, help="edits per seed")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4, help="full, edited, non-edited")
    ap.add_argument("--adapter-lr", type=float, default=1e-3, help="lora, dora")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--downstream-rows", type=int, default=500)
    ap.add_argument("--set", nargs="*", default=[], help="editing overrides k=v")
    ap.add_argument("--device", default=None)
    ap.add_argument("--save", default=None, help="AREA/RUN under docs/results/")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--plot", default=None, help="AREA/RUN: draw a saved run's figure only")
    ap.add_argument("--table", default=None,
                    help="AREA/RUN: print a saved run's summary as a Markdown table")
    args = ap.parse_args()
    if args.plot or args.table:
        folder = run_folder(*(args.plot or args.table).partition("/")[::2])
        saved = json.loads((folder / "result.json").read_text())
        if args.plot:
            plot(saved, folder / "survival.png")
        else:
            print(markdown(saved["summary"]))
        return 0
    problem = _check(args)
    if problem:
        print(f"survive: error: {problem}", file=sys.stderr)
        return 2
    overrides = dict(kv.split("=", 1) for kv in args.set)
    for editor in args.editors:  # bad settings fail before the model loads
        get_editor(editor, **overrides)
    area, run = args.save.split("/")
    params = {k: v for k, v in vars(args).items() if k not in ("save", "fresh", "plot")}
    cells = saved_parts("survive", area, run, params,
                        ("model", "n", "steps", "batch_size", "seq_len", "lr", "adapter_lr",
                         "rank", "downstream_rows", "set"), "cells", args.fresh)
    if cells is None:
        return 2
    lm = eg.load_model(args.model, progress=False, device=args.device)
    out = {"model": args.model, "device": str(lm.device), "threads": torch.get_num_threads(),
           "cells": cells}
    todo = [(s, e, d, m) for s in args.seeds for e in args.editors for d in args.data
            for m in args.modes if _key(s, e, d, m) not in cells]
    print(f"survive: {len(todo)} cells to run ({len(cells)} saved)", file=sys.stderr,
          flush=True)
    wiki = get_corpus(lm, "wiki", progress=False)
    edits: dict = {}
    drawn: dict = {}  # per seed: its cases and the task without their subjects, read once
    for i, (seed, editor_name, data, mode) in enumerate(todo, 1):
        if seed not in drawn:
            cases = pararel_cases(args.pararel, args.n, seed=seed)
            drawn = {seed: (cases, load_task(args.pararel, max_test=args.downstream_rows,
                                             exclude_subjects={c.request.subject
                                                               for c in cases}, seed=seed))}
        cases, task = drawn[seed]
        editor = get_editor(editor_name, progress=True, **overrides)
        if (seed, editor_name) not in edits:
            edits.clear()  # one edit in memory at a time: the cells run seed- and editor-major
            t0 = time.perf_counter()
            made = editor.edit(lm, [c.request for c in cases])
            edits[(seed, editor_name)] = (made, time.perf_counter() - t0,
                                          score_edited(lm, made, cases, task.test))
        edit, edit_seconds, edited_scores = edits[(seed, editor_name)]
        config = FinetuneConfig(mode=mode, steps=args.steps, batch_size=args.batch_size,
                                seq_len=args.seq_len, rank=args.rank, seed=seed,
                                lr=args.adapter_lr if mode in ADAPTERS else args.lr)
        t0 = time.perf_counter()
        result = survive(lm, editor, cases, wiki if data == "wiki" else task.train, config,
                         downstream=task.test, edit=edit, edited_scores=edited_scores,
                         progress=True)
        cells[_key(seed, editor_name, data, mode)] = {
            "seed": seed, "editor": editor_name, "data": data, "mode": mode,
            **result.to_json(), "finetune_loss": [result.finetune_losses[0],
                                                  result.finetune_losses[-1]],
            "edit_seconds": edit_seconds, "seconds": time.perf_counter() - t0}
        c = cells[_key(seed, editor_name, data, mode)]
        print(f"[{i}/{len(todo)}] seed {seed} · {editor_name} · {data} · {mode}: survival "
              f"{_fmt(c['survival']['efficacy'])} / {_fmt(c['survival']['paraphrase'])}, "
              f"downstream {_fmt(c['downstream']['before'])} → "
              f"{_fmt(c['downstream']['after'])} ({c['seconds']:.0f} s)", file=sys.stderr,
              flush=True)
        out["summary"], out["findings"] = summarise(cells)
        save(area, run, out, params)
    out["summary"], out["findings"] = summarise(cells)
    save(area, run, out, params)
    print(json.dumps(out["findings"], indent=1))
    return 0


def _check(args: argparse.Namespace) -> str | None:
    if not args.pararel or not args.save or args.save.count("/") != 1:
        return "--pararel PARAREL_DIR and --save AREA/RUN are required"
    if not (Path(args.pararel) / "trex").is_dir():
        return f"{args.pararel} is not a ParaRel folder (expected patterns/ and trex/)"
    wrong = [m for m in args.modes if m not in MODES] + [d for d in args.data if d not in DATA]
    if wrong:
        return f"unknown modes or data sets {wrong}; modes {MODES}, data {DATA}"
    if min(args.n, args.steps, args.batch_size, args.seq_len, args.rank,
           args.downstream_rows) < 1:
        return "--n, --steps, --batch-size, --seq-len, --rank and --downstream-rows must be >= 1"
    return None


def _key(seed: int, editor: str, data: str, mode: str) -> str:
    return f"{editor}/{data}/{mode}/{seed}"


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def over_seeds(diffs: list[float]) -> dict:
    """A per-seed difference's mean ± sd over seeds, and on how many seeds it is positive."""
    return {**mean_sd(diffs), "seeds": len(diffs), "seeds_positive": sum(d > 0 for d in diffs)}


def summarise(cells: dict) -> tuple[dict, dict]:
    """Mean ± sd over seeds per (editor, data, mode), and the four findings per data set."""
    groups: dict = {}
    for c in cells.values():
        groups.setdefault((c["editor"], c["data"], c["mode"]), []).append(c)
    summary = {}
    for (editor, data, mode), rows in sorted(groups.items()):
        def stat(get, rows=rows):
            return mean_sd([v for v in (get(r) for r in rows) if v is not None])
        summary[f"{editor}/{data}/{mode}"] = {
            "seeds": len(rows),
            "survival_efficacy": stat(lambda r: r["survival"]["efficacy"]),
            "survival_paraphrase": stat(lambda r: r["survival"]["paraphrase"]),
            "downstream_before": stat(lambda r: r["downstream"]["before"]),
            "downstream_after": stat(lambda r: r["downstream"]["after"])}
    findings: dict = {}
    for data in sorted({d for _, d, _ in groups}):
        def mean(editor, mode, key="survival_efficacy", data=data):
            cell = summary.get(f"{editor}/{data}/{mode}")
            return None if cell is None else cell[key]["mean"]

        def by_seed(editor, mode, data=data) -> dict[int, float]:
            return {c["seed"]: c["survival"]["efficacy"] for c in cells.values()
                    if (c["editor"], c["data"], c["mode"]) == (editor, data, mode)}

        def paired(a: tuple[str, str], b: tuple[str, str]) -> dict:
            """Per seed, survival of ``b`` minus survival of ``a`` (same seed, same cases)."""
            sa, sb = by_seed(*a), by_seed(*b)
            return over_seeds([sb[s] - sa[s] for s in sorted(sa.keys() & sb.keys())])

        editors = sorted({e for e, d, _ in groups if d == data})
        f: dict = {}
        survivals = {f"{e}/{m}": mean(e, m) for e, d, m in groups if d == data}
        decayed = [k for k, v in survivals.items() if v is not None and v < 1]
        f["edits_decay"] = {"answer": len(decayed) == len(survivals), "modes_below_1": decayed,
                            "survival_efficacy": survivals}
        if {"memit", "alphaedit"} <= set(editors):
            pairs = {m: (mean("alphaedit", m), mean("memit", m)) for m in MODES
                     if mean("alphaedit", m) is not None and mean("memit", m) is not None}
            # over the modes: one mode where neither decays (both 0.99) must not decide it
            gap = (sum(b - a for a, b in pairs.values()) / len(pairs)) if pairs else None
            # the same gap per seed (averaged over the modes), for its spread over seeds
            both = [(by_seed("memit", m), by_seed("alphaedit", m)) for m in pairs]
            seeds = sorted(set.intersection(*(set(x) & set(y) for x, y in both))) if both else []
            f["alphaedit_decays_more_than_memit"] = {
                "answer": gap is not None and gap > 0, "mean_gap": gap,
                "gap_over_seeds": over_seeds([sum(x[s] - y[s] for x, y in both) / len(both)
                                              for s in seeds]),
                "modes_lower": sum(a < b for a, b in pairs.values()), "modes": len(pairs),
                "alphaedit_vs_memit": pairs}
        for editor in editors:
            full, edited, non = (mean(editor, m) for m in ("full", "edited", "non-edited"))
            if full is not None and edited is not None:
                cost = (mean(editor, "full", "downstream_after"),
                        mean(editor, "edited", "downstream_after"))
                f[f"{editor}: edited_layers_only_removes_more"] = {
                    "answer": edited < full, "survival_edited": edited, "survival_full": full,
                    "downstream_after_full": cost[0], "downstream_after_edited": cost[1],
                    "full_minus_edited": paired((editor, "edited"), (editor, "full"))}
            if full is not None and non is not None:
                f[f"{editor}: non_edited_layers_impair_more"] = {
                    "answer": non < full, "survival_non_edited": non, "survival_full": full,
                    "full_minus_non_edited": paired((editor, "non-edited"), (editor, "full"))}
        findings[data] = f
    return summary, findings


def markdown(summary: dict) -> str:
    """Survival and downstream per data set, editor and mode: mean ± sd over seeds."""
    def cell(v: dict) -> str:
        if v["mean"] is None:
            return "–"
        return f"{v['mean']:.2f}" + (f" ± {v['sd']:.2f}" if v["sd"] is not None else "")

    lines = ["| data | editor | mode | seeds | efficacy survival | paraphrase survival | "
             "downstream before → after |", "|---|---|---|---|---|---|---|"]
    order = {m: i for i, m in enumerate(MODES)}
    for key in sorted(summary, key=lambda k: (k.split("/")[1], k.split("/")[0],
                                              order.get(k.split("/")[2], 99))):
        editor, data, mode = key.split("/")
        row = summary[key]
        lines.append(f"| {data} | {editor} | {mode} | {row['seeds']} | "
                     f"{cell(row['survival_efficacy'])} | {cell(row['survival_paraphrase'])} | "
                     f"{cell(row['downstream_before'])} → {cell(row['downstream_after'])} |")
    return "\n".join(lines)


def save(area: str, run: str, out: dict, params: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "survival.png"
        plot(out, png)
        save_run(area, run, out, params, files={"survival.png": png})


def plot(out: dict, png: Path) -> None:
    """Per data set: efficacy survival and downstream accuracy after the fine-tune, grouped by
    mode, one bar per editor (error bars: sd over seeds; the dashed line, downstream before)."""
    from engramlab.figures import figure

    summary = out["summary"]
    data_sets = sorted({k.split("/")[1] for k in summary})
    editors = sorted({k.split("/")[0] for k in summary})
    modes = [m for m in MODES if any(k.endswith(f"/{m}") for k in summary)]
    with figure(png, ncols=2 * len(data_sets), figsize=(5 * len(data_sets) * 2, 3.8)) \
            as (fig, axes):
        axes = list(axes) if hasattr(axes, "__len__") else [axes]
        width = 0.8 / max(len(editors), 1)
        for d, data in enumerate(data_sets):
            for ax, key, title in ((axes[2 * d], "survival_efficacy", "edits still working"),
                                   (axes[2 * d + 1], "downstream_after",
                                    "downstream after fine-tuning")):
                for e, editor in enumerate(editors):
                    cells = [summary.get(f"{editor}/{data}/{m}") for m in modes]
                    x = [i + (e - (len(editors) - 1) / 2) * width for i in range(len(modes))]
                    ys = [c[key]["mean"] if c and c[key]["mean"] is not None else 0
                          for c in cells]
                    err = [c[key]["sd"] or 0 if c else 0 for c in cells]
                    ax.bar(x, ys, width, yerr=err, capsize=2, label=editor)
                    if key == "downstream_after":
                        before = [c["downstream_before"]["mean"] for c in cells if c]
                        if before:
                            ax.axhline(sum(before) / len(before), ls="--", lw=1,
                                       color="grey")
                ax.set_xticks(range(len(modes)), modes, fontsize=8)
                ax.set_ylim(0, 1.02)
                ax.set_title(f"{title} ({data})", fontsize=9)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"edit survival under fine-tuning, {out['model']}")


if __name__ == "__main__":
    entry.run(main)
