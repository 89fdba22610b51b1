"""POST end to end on the embedded model: distil a small model from it, tune a soft prompt on
the small one (with and without DP-SGD), transfer the prompt with public text, and compare on
the task's test split with zero-shot and with a prompt tuned on the large model directly.

Per seed (the task's split, the prompts' initial tokens): test accuracy of

* zero-shot (the large model, no prompt);
* ``direct``: a prompt tuned on the large model (the cost POST avoids);
* ``small as is``: the small model's prompt put before the large model's input unchanged
  (possible here because a distilled student keeps the large model's width);
* ``transferred``: POST's transfer of the small model's prompt, without and with DP;
* the small model's own accuracy with its prompt.

Reported: each figure per seed, their mean and spread over seeds, the share of direct tuning's
gain over zero-shot that each transfer recovers, and the seconds each step took. Choices
(the kept step of each tuning and transfer) read the validation split only.

    .venv/bin/python bench/post.py [--task relation] [--seeds 0] [--keep 6]
        [--distil-steps 200] [--steps 150] [--epsilon 8] [--public-set wiki|facts]
        [--transfer-steps N] [--init random|source] [--dev] [--objective]
        [--save AREA/RUN]

``--dev`` compares settings (``--transfer-steps``, ``--transfer-lr``, ``--init``,
``--public-set``) without a test row: per seed only the small prompt and its transfer, their
validation accuracy at every evaluated step and at the kept one. ``--objective`` adds the
transfer loss, on the public texts, of the student's prompt as is, of the transferred prompt
and of a prompt tuned on the large model directly: when the direct prompt's loss is the
higher, the transfer does not head for it however long it runs, and the student is the limit.

Resumable with ``--save``: every finished seed is saved, a seed under way keeps each finished
prompt in the engramlab cache until it is saved, and the distilled student is kept there under
the settings that made it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import engramlab as eg
import entry
from engramlab.data.corpus import get_corpus
from engramlab.prompt import (
    DPConfig,
    SoftPrompt,
    TuneConfig,
    accuracy,
    load_label_task,
    step_progress,
    tune,
)
from engramlab.prompt.post import (
    DistilConfig,
    TransferConfig,
    distil,
    public_texts,
    save_student,
    transfer,
    transfer_objective,
)
from engramlab.prompt.tasks import LabelTask, public_facts
from results import (
    data_default,
    drop_saved,
    mean_sd,
    merged,
    run_lock,
    save_run,
    saved_parts,
    saved_result,
)


def seed_setting(args: argparse.Namespace, seed: int, wiki: list[str]
                 ) -> tuple[LabelTask, list[str], TuneConfig, TransferConfig]:
    """One seed's task split, the transfers' public texts (``wiki`` or the facts outside the
    task, ``--public-set``) and the tuning and transfer settings."""
    task = load_label_task(args.task, pararel=args.pararel, seed=seed)
    public = wiki if args.public_set == "wiki" else public_facts(args.pararel, task,
                                                                 args.public, seed=seed)
    tune_config = TuneConfig(tokens=args.tokens, steps=args.steps, lr=args.lr, seed=seed)
    transfer_config = TransferConfig(steps=args.transfer_steps or args.steps,
                                     lr=args.transfer_lr or args.lr, seed=seed,
                                     public=len(public), init=args.init)
    return task, list(public), tune_config, transfer_config


def figures(prompt: SoftPrompt) -> dict:
    """A prompt's row of its seed: what its tuning or transfer recorded (validation accuracy,
    the kept step, the history) and what :func:`run_seed` added under ``bench`` (the test
    accuracy and the seconds it took), so that a prompt kept in the cache carries its row."""
    meta = prompt.meta
    return {**meta["bench"], "val": meta.get("val_accuracy"),
            "chosen_step": meta.get("chosen_step"), "history": meta.get("history")}


def work_folder(args: argparse.Namespace, params: dict, student: Path) -> Path | None:
    """Where a saved run keeps each finished prompt of a seed still under way, so that an
    interrupted seed goes on from its last finished prompt: keyed by the run, its settings
    (seeds aside) and the very student they were made with (a new distillation of the same
    recipe starts afresh). None without ``--save``."""
    if not args.save:
        return None
    key = json.dumps({k: v for k, v in params.items() if k != "seeds"}, sort_keys=True)
    key += (student / "engramlab.json").read_text()
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return eg.cache_root() / "post" / args.save.replace("/", "-") / digest


def run_seed(args: argparse.Namespace, seed: int, large, small, wiki: list[str],
             work: Path | None = None) -> dict:
    """Every figure of one seed; the transfers read ``wiki`` or the facts outside this seed's
    task (``--public-set``). With ``--dev`` only the small prompt and its transfer (and the
    direct prompt, with ``--objective``), and no test row is read. Each finished prompt and
    its figures are kept under ``work`` until the seed is saved, and taken from there when
    the seed is run again."""
    task, public, tune_config, transfer_config = seed_setting(args, seed, wiki)
    cell: dict = {} if args.dev else {
        "zero_shot": {"test": accuracy(large, None, task, task.test)}}
    prompts: dict[str, SoftPrompt] = {}
    tuned, moved = tune_config.steps, transfer_config.steps
    plan = [  # (name, the model it prompts, its steps, how it is made)
        ("direct", large, tuned, lambda f: tune(large, task, tune_config, on_step=f)),
        ("small", small, tuned, lambda f: tune(small, task, tune_config, on_step=f)),
        ("small_dp", small, tuned, lambda f: tune(small, task, tune_config,
                                                  dp=DPConfig(epsilon=args.epsilon),
                                                  on_step=f)),
        ("transferred", large, moved, lambda f: transfer(small, large, prompts["small"], task,
                                                         public, transfer_config, on_step=f)),
        ("transferred_dp", large, moved, lambda f: transfer(small, large, prompts["small_dp"],
                                                            task, public, transfer_config,
                                                            on_step=f)),
    ]
    if args.dev:
        kept = ("small", "transferred") + (("direct",) if args.objective else ())
        plan = [step for step in plan if step[0] in kept]
    for name, model, steps, make in plan:
        stored = work / name if work else None
        if stored and stored.is_dir():  # written whole or not at all
            prompts[name] = SoftPrompt.load(stored, model)
            cell[name] = figures(prompts[name])
            print(f"seed {seed} · {name}: taken from {stored}", file=sys.stderr, flush=True)
            continue
        start = time.perf_counter()
        bar, on_step = step_progress(steps, desc=f"seed {seed} · {name}"
                                     + (" (validation)" if args.dev else ""))
        with bar:
            prompts[name] = make(on_step)
        test = {} if args.dev else {"test": accuracy(model, prompts[name], task, task.test)}
        prompts[name].meta["bench"] = {**test, "seconds": time.perf_counter() - start}
        cell[name] = figures(prompts[name])
        print(json.dumps({"seed": seed, name: cell[name]}), file=sys.stderr, flush=True)
        if stored:
            prompts[name].save(stored, model)
    split = "val" if args.dev else "test"
    if args.objective or not args.dev:
        cell["small_as_is"] = {split: accuracy(large, prompts["small"], task, task.split(split))}
    if args.objective:
        cell["objective"] = transfer_objective(  # the transfer loss; lower is preferred
            small, large, prompts["small"],
            {name: prompts[source].embeddings for name, source in (
                ("small_as_is", "small"), ("transferred", "transferred"), ("direct", "direct"))},
            task, public, transfer_config)
        print(json.dumps({"seed": seed, "objective": cell["objective"]}), file=sys.stderr,
              flush=True)
    if args.dev:
        return cell
    zero, direct = cell["zero_shot"]["test"], cell["direct"]["test"]
    gain = direct - zero
    for name in ("small_as_is", "transferred", "transferred_dp"):
        cell[name]["recovered"] = (cell[name]["test"] - zero) / gain if gain > 0 else None
    if "dp" in prompts["small_dp"].meta:
        cell["small_dp"]["dp"] = prompts["small_dp"].meta["dp"]
    return cell


def dev_summary(cells: list[dict]) -> dict:
    """Validation accuracy over seeds: of the kept step, and at every evaluated step (so that
    settings with different step counts are compared at equal steps too)."""
    out: dict = {"split": "validation"}
    for name in ("small", "transferred", "direct"):
        if not all(name in c for c in cells):
            continue
        steps = sorted({h["step"] for c in cells for h in c[name]["history"]})
        out[name] = {"kept": mean_sd([c[name]["val"] for c in cells]),
                     "by_step": {str(t): mean_sd([h["val_accuracy"] for c in cells
                                                  for h in c[name]["history"]
                                                  if h["step"] == t]) for t in steps}}
    if all("objective" in c for c in cells):
        out["small_as_is"] = mean_sd([c["small_as_is"]["val"] for c in cells])
        out["objective"] = {name: mean_sd([c["objective"][name] for c in cells])
                            for name in cells[0]["objective"]}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pararel", **data_default("pararel"))
    parser.add_argument("--task", default="relation")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--keep", type=int, default=6)
    parser.add_argument("--distil-steps", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--transfer-steps", type=int, default=None,
                        help="the transfer's steps (default: --steps)")
    parser.add_argument("--transfer-lr", type=float, default=None,
                        help="the transfer's rate (default: --lr)")
    parser.add_argument("--init", choices=["random", "source"], default="random",
                        help="the transfer starts from random tokens or the small prompt")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--public", type=int, default=512)
    parser.add_argument("--public-set", choices=["wiki", "facts"], default="wiki",
                        help="the transfer's public texts: wiki sentences, or T-REx facts "
                             "outside the task (engramlab.prompt.tasks.public_facts)")
    parser.add_argument("--dev", action="store_true",
                        help="compare settings on validation: only the small prompt and its "
                             "transfer, scored on each seed's validation split, no test row")
    parser.add_argument("--objective", action="store_true",
                        help="also the transfer loss of the student's prompt as is, of the "
                             "transferred prompt and of one tuned on the large model directly "
                             "(tuned with --dev too): does the objective prefer the better "
                             "prompt?")
    parser.add_argument("--save", default=None, help="AREA/RUN under docs/results/")
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()
    params = {k: v for k, v in vars(args).items() if k not in ("save", "fresh")}
    parts: dict = {}
    if args.save:
        same = [k for k in params if k != "seeds"]
        saved = saved_parts("post", *args.save.split("/"), params, same, "parts", args.fresh,
                            {k: parser.get_default(k) for k in params})
        if saved is None:
            return 2
        parts = saved
    large = eg.load_model(args.model, progress=False)
    out = {"model": args.model, "task": args.task, "parts": parts, "summary": {}}

    def save() -> None:
        """Save with this process's seeds merged into those on disk: processes running other
        seeds of the same run may have saved since this one started."""
        if not args.save:
            return
        area, run = args.save.split("/")
        with run_lock(area, run):
            parts.update(merged(saved_result(area, run).get("parts", {}), parts))
            save_run(area, run, out, params)

    if args.fresh and args.save:
        drop_saved(*args.save.split("/"), out, params)

    # the student depends on the distillation settings only, not on the seed's task split
    config = DistilConfig(keep=args.keep, steps=args.distil_steps)
    name = f"{large.label}-keep{args.keep}-steps{args.distil_steps}"
    folder = eg.cache_root() / "students" / name
    if not (folder / "config.json").exists():
        start = time.perf_counter()
        student = distil(large, get_corpus(large, "wiki", progress=False), config,
                         on_step=lambda i: print(f"distil step {i['step']}: kd {i['kd']:.3f} "
                                                 f"clm {i['clm']:.3f}", file=sys.stderr,
                                                 flush=True) if i["step"] % 20 == 0 else None)
        save_student(student, folder, {"teacher": large.label, "distil": vars(config),
                                       "seconds": time.perf_counter() - start})
    small = eg.load_model(str(folder), progress=False)
    out["student"] = {"blocks": small.n_layers,
                      **json.loads((folder / "engramlab.json").read_text())}
    wiki = public_texts(get_corpus(large, "wiki", progress=False), args.public)
    work = work_folder(args, params, folder)
    if work and args.fresh:
        shutil.rmtree(work.parent, ignore_errors=True)
    for seed in args.seeds:
        if str(seed) not in parts:
            mine = work / f"seed{seed}" if work else None
            parts[str(seed)] = run_seed(args, seed, large, small, wiki, mine)
            save()
            if mine:
                shutil.rmtree(mine, ignore_errors=True)
                for empty in (work, work.parent):  # leave no empty folders behind
                    with contextlib.suppress(OSError):
                        empty.rmdir()
    if args.dev:
        out["summary"] = {"seeds": args.seeds,
                          **dev_summary([parts[str(s)] for s in args.seeds])}
        save()
        print(json.dumps(out["summary"], indent=1))
        return 0
    names = ["zero_shot", "direct", "small", "small_dp", "small_as_is", "transferred",
             "transferred_dp"]
    cells = [parts[str(s)] for s in args.seeds]
    out["summary"] = {
        "split": "test", "n": len(load_label_task(args.task, pararel=args.pararel).test),
        "seeds": args.seeds, "epsilon": args.epsilon,
        **{n: mean_sd([c[n]["test"] for c in cells]) for n in names},
        "recovered": {n: mean_sd([c[n]["recovered"] for c in cells
                                  if c[n].get("recovered") is not None])
                      for n in ("small_as_is", "transferred", "transferred_dp")},
        "seconds": {n: mean_sd([c[n]["seconds"] for c in cells])
                    for n in ("direct", "small", "small_dp", "transferred", "transferred_dp")}}
    save()
    print(json.dumps({k: v for k, v in out.items() if k != "parts"}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    entry.run(main)
