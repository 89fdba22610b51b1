"""``engram edit``: edit facts into a model and evaluate them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import InputError
from .common import (
    CORPUS_HELP,
    add_common,
    add_set,
    emit,
    load_for,
    nonnegative_int,
    parse_settings,
    positive_float,
    positive_int,
    shard_of,
    shard_spec,
)


def register(sub: Any) -> None:
    from ..edit import METHODS, PROTOCOLS

    p = sub.add_parser("edit", help="edit facts into a model and evaluate them (CounterFact)")
    add_common(p)
    p.add_argument("--method", choices=sorted(METHODS), default="rome")
    p.add_argument("--facts", default=None,
                   help="CounterFact / zsRE / JSONL cases file (default: bundled facts)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="independent")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="edits per batch (sequential: default 10; batch: default all at once, "
                        "else batches edited each into the unedited model)")
    p.add_argument("--eval-every", type=positive_int, default=None,
                   help="sequential: evaluate every K batches (the decay curve)")
    p.add_argument("--layers", type=int, nargs="+", default=None)
    p.add_argument("--preset", default=None, help="preset name (default: matched to the model)")
    add_set(p, "hyper-parameter overrides")
    p.add_argument("--limit", type=positive_int, default=None, help="use the first N cases")
    p.add_argument("--shard", type=shard_spec, default=None, metavar="I/N",
                   help="edit only the I-th (from 0) of N contiguous parts of the cases (after "
                        "--limit): one job of a sweep over case shards")
    p.add_argument("--fluency-tokens", type=nonnegative_int, default=0,
                   help="greedy tokens generated per prompt for the fluency metric (0: skip)")
    p.add_argument("--noise", action="store_true",
                   help="sequential memit/alphaedit/deltaedit: record the superimposed noise "
                        "per batch and the drift of earlier edits (JSON; noise.png with --out)")
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="sequential: save the run to DIR at every evaluation point (else every "
                        "tenth of the batches); run the same command again to resume it")
    p.add_argument("--out", default=None, help="folder for deltas, per-case JSONL and report")
    p.set_defaults(func=edit)

    from ..adapt import MODES, PRECISIONS

    s = sub.add_parser("survive", help="edit, fine-tune the edited model, and see which edits "
                                       "survive (Cheng et al.)")
    add_common(s)
    s.add_argument("--edit-method", choices=sorted(METHODS), default="memit")
    s.add_argument("--facts", default=None, help="cases file (default: bundled facts)")
    s.add_argument("--limit", type=positive_int, default=20,
                   help="edit the first N cases (one batch); without a task, the rest are the "
                        "downstream facts")
    s.add_argument("--finetune", choices=MODES, default="full")
    s.add_argument("--data", default="wiki",
                   help="fine-tuning data: text (wiki, sampled, a text file / folder) or a task "
                        "(a JSONL of prompt/completion records, or a ParaRel folder for T-REx "
                        "questions), trained on its completions")
    s.add_argument("--downstream", default=None,
                   help="task scored before and after the fine-tune (JSONL of prompt/"
                        "completion records or a ParaRel folder; its test part is used). "
                        "Default: the test part of --data when it is a task, else the cases "
                        "not edited")
    s.add_argument("--steps", type=positive_int, default=50)
    s.add_argument("--lr", type=positive_float, default=1e-4)
    s.add_argument("--batch-size", type=positive_int, default=4)
    s.add_argument("--seq-len", type=positive_int, default=128)
    s.add_argument("--rank", type=positive_int, default=8, help="lora / dora rank")
    s.add_argument("--seed", type=nonnegative_int, default=0)
    s.add_argument("--precision", choices=PRECISIONS, default="float32",
                   help="bfloat16: mixed-precision fine-tuning (the weights stay float32)")
    s.add_argument("--checkpoint", default=None,
                   help="file the fine-tune saves its state to every 25 steps; run again with "
                        "it to resume an interrupted fine-tune")
    add_set(s, "editing hyper-parameter overrides")
    s.add_argument("--out", default=None, help="folder for result.json")
    s.set_defaults(func=survive)

    k = sub.add_parser("stats", help="collect (or read cached) key statistics C0 = E[k kT] "
                                     "for ROME / MEMIT / AlphaEdit")
    add_common(k)
    k.add_argument("--layers", type=nonnegative_int, nargs="+", required=True)
    k.add_argument("--tokens", type=positive_int, default=10_000)
    k.add_argument("--corpus", default=None, help=CORPUS_HELP)
    k.add_argument("--batch-size", type=positive_int, default=8)
    k.add_argument("--seq-len", type=positive_int, default=256)
    k.add_argument("--workers", type=positive_int, default=None,
                   help="processes sharing the corpus, shards merged exactly (default 1; with "
                        "--ray one per GPU of the cluster, else 2)")
    k.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="shard over Ray tasks: a local cluster, or ADDRESS ('auto' or "
                        "HOST:PORT) of a running one")
    k.add_argument("--no-cache", action="store_true",
                   help="collect even when cached (to time it), and do not write the cache")
    k.set_defaults(func=stats)


def edit(args: argparse.Namespace) -> int:
    from ..data import load_cases
    from ..data.bundled import bundled_cases
    from ..edit import get_editor, run_protocol
    from ..edit.protocols import check_noise

    cases = load_cases(args.facts) if args.facts else bundled_cases()
    if args.limit:
        cases = cases[:args.limit]
    cases = shard_of(cases, args.shard)
    if not cases:
        raise InputError(f"shard {args.shard[0]}/{args.shard[1]} of {args.limit or 'the'} "
                         "cases is empty; use fewer shards")
    overrides = parse_settings(args.set)
    if args.layers:
        overrides["layers"] = args.layers
    # the editor checks names, types and the method's own settings: before the model loads
    editor = get_editor(args.method, preset=args.preset, progress=not args.json, **overrides)
    check_noise(editor, args.protocol, args.noise)
    if args.checkpoint and args.protocol != "sequential":
        raise InputError("--checkpoint saves sequential runs: add --protocol sequential")
    lm = load_for(args)
    result = run_protocol(lm, editor, cases, protocol=args.protocol, batch_size=args.batch_size,
                          eval_every=args.eval_every, fluency_tokens=args.fluency_tokens,
                          progress=not args.json, noise=args.noise, checkpoint=args.checkpoint)
    obj = result.to_json()
    if args.shard is not None:
        obj["shard"] = list(args.shard)
    lines = result.table()
    if args.out:
        _save_run(Path(args.out), result, obj, lines)
        obj["out"] = args.out
        lines[-1] += f"; saved to {args.out}"
    emit(args, obj, lines)
    return 0


def _save_run(out: Path, result: Any, obj: dict[str, Any], lines: list[str]) -> None:
    """Deltas, per-case results (JSONL), the JSON summary, a short Markdown report and a
    self-contained report.html, atomically."""
    from .._io import atomic_dir
    from ..report import Report, Table

    with atomic_dir(out) as tmp:
        if result.delta is not None:
            result.delta.save(tmp / "delta")
        for i, d in enumerate(result.deltas):
            d.save(tmp / "deltas" / f"{i:05d}")
        with open(tmp / "cases.jsonl", "w") as f:
            for row in result.per_case:
                f.write(json.dumps(row, default=str) + "\n")
        (tmp / "result.json").write_text(json.dumps(obj, indent=1, default=str))
        (tmp / "report.md").write_text(result.report_markdown())
        if result.noise is not None:
            from ..edit.noise import plot_noise

            plot_noise(result.noise, tmp / "noise.png",
                       f"{result.method}, {result.n} edits in batches")
        Report(title=f"engram edit: {result.method} on {result.model}",
               note=f"protocol {result.protocol}, {result.n} facts",
               params={"protocol": result.protocol, "facts": result.n,
                       "seconds per edit (median)": result.seconds_per_edit,
                       **{f"hparams.{k}": v for k, v in (result.hparams or {}).items()}},
               tables=[Table("Scores before and after", ["metric", "before", "after"],
                             [[k, result.pre.get(k), result.post.get(k)]
                              for k in result.post if k != "n"])],
               text=lines,
               figures=[tmp / "noise.png"] if result.noise is not None else []
               ).write(tmp / "report.html")


def survive(args: argparse.Namespace) -> int:
    from ..adapt import FinetuneConfig, fact_rows
    from ..adapt import survive as run_survival
    from ..data import load_cases
    from ..data.bundled import bundled_cases
    from ..data.corpus import check_corpus_spec, get_corpus
    from ..data.tasks import is_task, load_task
    from ..edit import get_editor

    cases = load_cases(args.facts) if args.facts else bundled_cases()
    edited, rest = cases[:args.limit], cases[args.limit:]
    config = FinetuneConfig(mode=args.finetune, steps=args.steps, lr=args.lr,
                            batch_size=args.batch_size, seq_len=args.seq_len, rank=args.rank,
                            seed=args.seed, precision=args.precision)
    subjects = {c.request.subject for c in edited}
    # tasks are read before the model loads: a bad file costs nothing
    task = load_task(args.data, exclude_subjects=subjects, seed=args.seed) \
        if is_task(args.data) else None
    if task is None:
        check_corpus_spec(args.data)
    if args.downstream is not None:
        if not is_task(args.downstream):
            raise InputError(f"--downstream {args.downstream!r} is neither a JSONL of prompt/"
                             "completion records nor a ParaRel folder")
        downstream = load_task(args.downstream, exclude_subjects=subjects,
                               seed=args.seed).test
    else:
        downstream = task.test if task is not None else fact_rows(rest)
    editor = get_editor(args.edit_method, progress=False, **parse_settings(args.set))
    lm = load_for(args)
    data = task.train if task is not None else get_corpus(lm, args.data,
                                                          progress=not args.json)
    result = run_survival(lm, editor, edited, data, config, downstream=downstream,
                          checkpoint=args.checkpoint, progress=True)
    obj = result.to_json()
    obj.update(model=lm.name, edit_method=args.edit_method, finetune=vars(config),
               n_edited=len(edited), n_downstream=len(downstream),
               data="task" if task is not None else "text",
               finetune_loss=[result.finetune_losses[0], result.finetune_losses[-1]])
    lines = [f"{args.edit_method} edits of {len(edited)} facts on {lm.name}, then "
             f"{args.finetune} fine-tuning for {args.steps} steps", *result.lines()]
    if args.out:
        from .._io import atomic_dir

        with atomic_dir(Path(args.out)) as tmp:
            (tmp / "result.json").write_text(json.dumps(obj, indent=1, default=str))
        obj["out"] = args.out
        lines.append(f"saved to {args.out}")
    emit(args, obj, lines)
    return 0


def stats(args: argparse.Namespace) -> int:
    from ..data.corpus import check_corpus_spec

    check_corpus_spec(args.corpus)
    if (args.ray is not None or (args.workers or 1) > 1) and args.device_map:
        raise InputError("--workers / --ray shard the corpus over processes, each holding the "
                         "whole model; --device-map spreads one model over GPUs: use one")
    if args.ray is None:
        return _stats(args, args.workers or 1)
    from ..scale.cluster import connected

    # connected once for the whole command (the collection joins it), so that the cluster's
    # start is not counted in the tokens/s
    with connected(args.ray) as ray:
        return _stats(args, args.workers or int(ray.cluster_resources().get("GPU", 0)) or 2)


def _stats(args: argparse.Namespace, workers: int) -> int:
    import time

    from ..data.corpus import get_corpus
    from ..stats import collect_key_stats

    lm = load_for(args, device="cpu" if workers > 1 or args.ray is not None else None)
    layers = [lm.layout.check_layer(layer) for layer in args.layers]
    corpus = get_corpus(lm, args.corpus, n_tokens=args.tokens, progress=not args.json)
    start = time.perf_counter()
    out = collect_key_stats(lm, layers, corpus, n_tokens=args.tokens, batch_size=args.batch_size,
                            seq_len=args.seq_len, use_cache=not args.no_cache, progress=True,
                            workers=workers, ray=args.ray)
    seconds = time.perf_counter() - start
    tokens = out[layers[0]].count
    obj = {"layers": layers, "tokens": tokens, "seconds": seconds,
           "tokens_per_s": tokens / seconds if seconds > 0 else None, "workers": workers}
    where = " on Ray" if args.ray is not None else ""
    emit(args, obj, [f"key statistics of {lm.label}, layers {layers}: {tokens} tokens in "
                     f"{seconds:.1f} s ({obj['tokens_per_s'] or 0:.0f} tokens/s, "
                     f"{workers} worker{'s' if workers > 1 else ''}{where})"
                     + ("" if args.no_cache else "; cached for the editors")])
    return 0
