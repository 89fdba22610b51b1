"""``engram prompt tune | eval | show | distil | transfer``: soft prompts and prefixes for a
labelled task."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import EngramError
from .common import CORPUS_HELP, add_common, emit, load_for, positive_float, positive_int

TASK_HELP = ("'fact-check' or 'relation' (built from --pararel), or a JSONL file of "
             "{\"text\", \"label\"} records")


def register(sub: Any) -> None:
    prompt = sub.add_parser("prompt", help="soft prompts: tune one for a labelled task, score "
                                           "it, read its nearest tokens").add_subparsers(
        dest="prompt_cmd", required=True)
    p = prompt.add_parser("tune", help="tune a soft prompt (or a prefix) on a task's train "
                                       "split")
    add_common(p)
    _task_args(p)
    p.add_argument("--tokens", type=positive_int, default=20,
                   help="soft prompt length (a prefix: positions per block)")
    p.add_argument("--steps", type=positive_int, default=150, help="Adam steps")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="Adam's rate (default 0.003; PEZ: AdamW's, default the paper's 0.1)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--eval-every", type=positive_int, default=25,
                   help="steps between validation scores (the best is kept)")
    p.add_argument("--method", choices=["soft", "pez", "prefix"], default="soft",
                   help="soft: continuous vectors before the input; pez: a hard prompt of real "
                        "tokens (PEZ); prefix: keys and values before the input in every "
                        "block (prefix tuning)")
    p.add_argument("--reparam", type=int, default=0,
                   help="prefix only: train it through an MLP of this hidden width (Li & "
                        "Liang's reparameterisation; 0: the prefix itself)")
    p.add_argument("--fluency", type=float, default=0.0,
                   help="weight of the prompt's own perplexity (readability) in the loss")
    p.add_argument("--fluency-roles", choices=("both", "context"), default="both",
                   help="how the perplexity reaches each position: as context and as the token "
                        "predicted (both), or as context only")
    p.add_argument("--dp-epsilon", type=float, default=None,
                   help="tune with DP-SGD to this (ε, δ) budget (the last prompt is kept)")
    p.add_argument("--dp-delta", type=float, default=None,
                   help="δ of DP-SGD (default: min(1e-5, 1 / training rows))")
    p.add_argument("--dp-clip", type=positive_float, default=1.0,
                   help="per-example gradient norm bound of DP-SGD")
    p.add_argument("--out", required=True, help="PEFT adapter folder to write")
    p.set_defaults(func=tune)

    p = prompt.add_parser("distil", help="a small model distilled from a large one (POST's "
                                         "provider side)")
    add_common(p)
    p.add_argument("--keep", type=positive_int, default=6, help="blocks the student keeps")
    p.add_argument("--steps", type=positive_int, default=200)
    p.add_argument("--lr", type=positive_float, default=2e-4)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--seq-len", type=positive_int, default=128)
    p.add_argument("--corpus", default=None, help=CORPUS_HELP)
    p.add_argument("--out", required=True, help="model folder to write (loads with --model)")
    p.set_defaults(func=distil)

    p = prompt.add_parser("transfer", help="move a small model's soft prompt to the large "
                                           "model with public text (POST)")
    _task_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--from", dest="source", required=True, help="the small model the prompt "
                                                                "was tuned on")
    p.add_argument("--to", dest="target", default="smollm2-135m", help="the large model")
    p.add_argument("--prompt", required=True, help="the small model's soft prompt folder")
    p.add_argument("--public", default=None,
                   help="public text (default: the bundled wiki text): 'facts' (sentences of "
                        "T-REx facts outside the task, from --pararel) or " + CORPUS_HELP)
    p.add_argument("--n-public", type=positive_int, default=512, help="public texts used")
    p.add_argument("--steps", type=positive_int, default=150)
    p.add_argument("--lr", type=positive_float, default=0.003)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--eval-every", type=positive_int, default=25)
    p.add_argument("--init", choices=["random", "source"], default="random",
                   help="start from random tokens' embeddings or from the small prompt")
    p.add_argument("--out", required=True, help="PEFT adapter folder to write")
    p.set_defaults(func=transfer)

    p = prompt.add_parser("eval", help="accuracy with and without a soft prompt on a split")
    add_common(p)
    _task_args(p)
    p.add_argument("--prompt", required=True, help="a folder `engram prompt tune` wrote")
    p.add_argument("--split", choices=["test", "val", "train"], default="test")
    p.set_defaults(func=evaluate)

    p = prompt.add_parser("show", help="the nearest vocabulary tokens of every prompt vector")
    add_common(p)
    p.add_argument("prompt_dir", metavar="DIR", help="a soft prompt folder")
    p.add_argument("-k", type=positive_int, default=3, help="nearest tokens per position")
    p.set_defaults(func=show)


def _task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help=TASK_HELP)
    p.add_argument("--pararel", default=None,
                   help="ParaRel folder (patterns/ and trex/) for the built-in tasks")
    p.add_argument("--seed", type=int, default=0, help="the task's split (and the tuning's)")


def tune(args: argparse.Namespace) -> int:
    from ..prompt import (
        DPConfig,
        PrefixConfig,
        TuneConfig,
        accuracy,
        load_label_task,
        step_progress,
        tune_prefix,
    )
    from ..prompt import tune as run_tune

    lr = args.lr or {"pez": 0.1, "prefix": PrefixConfig.lr}.get(args.method, TuneConfig.lr)
    if args.reparam and args.method != "prefix":
        raise EngramError("--reparam trains a prefix; add --method prefix or drop --reparam")
    settings = dict(tokens=args.tokens, steps=args.steps, lr=lr, batch_size=args.batch_size,
                    eval_every=args.eval_every, seed=args.seed)
    config = PrefixConfig(**settings, reparam=args.reparam) if args.method == "prefix" \
        else TuneConfig(**settings)
    config.check()
    if args.method == "prefix" and args.fluency:
        raise EngramError("--fluency is the perplexity of a soft prompt's tokens, and a prefix "
                          "has none; drop --fluency or use --method soft")
    dp = None
    if args.dp_epsilon is not None or args.dp_delta is not None:
        if args.dp_epsilon is None:
            raise EngramError("--dp-delta needs --dp-epsilon")
        dp = DPConfig(epsilon=args.dp_epsilon, delta=args.dp_delta, clip=args.dp_clip)
        dp.check()
    if args.fluency < 0:
        raise EngramError(f"--fluency must be at least 0, got {args.fluency}")
    if dp is not None and (args.method == "pez" or args.fluency > 0 or args.reparam):
        raise EngramError("--dp-epsilon tunes a soft prompt or a plain prefix on the label loss "
                          "alone; drop --method pez, --fluency and --reparam, or drop "
                          "--dp-epsilon")
    task = load_label_task(args.task, pararel=args.pararel, seed=args.seed)
    lm = load_for(args)
    bar, on_step = step_progress(config.steps)
    with bar:
        if args.method == "pez":
            from ..prompt.pez import PEZConfig, pez

            prompt = pez(lm, task, PEZConfig(
                tokens=args.tokens, steps=args.steps, lr=lr, batch_size=args.batch_size,
                eval_every=args.eval_every, fluency=args.fluency,
                fluency_roles=args.fluency_roles, seed=args.seed),
                on_step=on_step)
        elif args.method == "prefix":
            assert isinstance(config, PrefixConfig)
            prompt = tune_prefix(lm, task, config, dp=dp, on_step=on_step)
        else:
            from ..prompt.pez import fluency_loss

            prompt = run_tune(lm, task, config, dp=dp, on_step=on_step,
                              loss_fn=fluency_loss(lm, task, args.fluency, args.fluency_roles)
                              if args.fluency > 0 else None)
    val = prompt.meta["val_accuracy"]
    zero = accuracy(lm, None, task, task.val)
    prompt.meta["zero_shot_val_accuracy"] = zero
    prompt.save(Path(args.out), lm)
    obj = {"task": task.name, "split": "val", "n": len(task.val), "accuracy": val,
           "zero_shot_accuracy": zero, "chosen_step": prompt.meta["chosen_step"],
           "method": args.method, "tokens": prompt.length, "sizes": task.sizes(),
           "dp": prompt.meta["dp"],
           "out": args.out}
    what = "prefix" if args.method == "prefix" else "prompt"
    emit(args, obj, [f"{task.name}: validation accuracy {zero:.3f} zero-shot → {val:.3f} with a "
                     f"{prompt.length}-token {what} (step {prompt.meta['chosen_step']} of "
                     f"{config.steps}); saved to {args.out}",
                     f"score the test split with: engram prompt eval --task {args.task} "
                     f"--prompt {args.out}"])
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from ..prompt import accuracy, load_label_task, load_prompt

    task = load_label_task(args.task, pararel=args.pararel, seed=args.seed)
    prompt = load_prompt(args.prompt)  # a bad folder is refused before the model loads
    lm = load_for(args)
    prompt.check(lm)
    rows = task.split(args.split)
    acc = accuracy(lm, prompt, task, rows)
    zero = accuracy(lm, None, task, rows)
    obj = {"task": task.name, "split": args.split, "n": len(rows), "accuracy": acc,
           "zero_shot_accuracy": zero}
    emit(args, obj, [f"{task.name} ({args.split}, {len(rows)} rows): accuracy {acc:.3f} with "
                     f"the prompt, {zero:.3f} zero-shot"])
    return 0


def show(args: argparse.Namespace) -> int:
    from ..prompt import Prefix, SoftPrompt, load_prompt, nearest_tokens

    prompt = load_prompt(args.prompt_dir)
    if isinstance(prompt, Prefix):
        raise EngramError(f"{args.prompt_dir} is a prefix: keys and values inside every block, "
                          "not vectors in the token space, so it has no nearest tokens; `show` "
                          "reads soft prompts")
    assert isinstance(prompt, SoftPrompt)
    lm = load_for(args)
    prompt.check(lm)
    rows = nearest_tokens(lm, prompt.embeddings, k=args.k)
    lines = [f"{prompt.length}-token soft prompt for {prompt.meta.get('task', 'a task')} "
             f"(nearest tokens by cosine)"]
    for i, near in enumerate(rows):
        lines.append(f"{i:3d}  " + "  ".join(f"{tok!r} {cos:.2f}" for tok, cos in near))
    emit(args, {"positions": [[{"token": t, "cosine": c} for t, c in near] for near in rows]},
         lines)
    return 0


def distil(args: argparse.Namespace) -> int:
    from ..data.corpus import check_corpus_spec, get_corpus
    from ..prompt.post import DistilConfig, save_student
    from ..prompt.post import distil as run_distil

    check_corpus_spec(args.corpus)
    config = DistilConfig(keep=args.keep, steps=args.steps, lr=args.lr,
                          batch_size=args.batch_size, seq_len=args.seq_len)
    lm = load_for(args)
    config.check(lm.n_layers)
    corpus = get_corpus(lm, args.corpus, progress=not args.json)
    from tqdm.auto import tqdm

    losses: list[float] = []
    with tqdm(total=config.steps, desc="distilling", unit="step", file=sys.stderr) as bar:
        def on_step(info: dict[str, Any]) -> None:
            losses.append(info["loss"])
            bar.update(1)
            bar.set_postfix(kd=f"{info['kd']:.3f}", clm=f"{info['clm']:.3f}")

        student = run_distil(lm, corpus, config, on_step=on_step)
    save_student(student, Path(args.out), {"teacher": lm.label, "distil": vars(config),
                                            "loss": [losses[0], losses[-1]]})
    obj = {"teacher": lm.label, "blocks": student.n_layers, "steps": config.steps,
           "loss": [losses[0], losses[-1]], "out": args.out}
    emit(args, obj, [f"a {student.n_layers}-block student of {lm.label} distilled for "
                     f"{config.steps} steps (loss {losses[0]:.3f} → {losses[-1]:.3f}); saved to "
                     f"{args.out}", f"tune a prompt on it: engram prompt tune --model {args.out} "
                     "--task ... --out ..."])
    return 0


def transfer(args: argparse.Namespace) -> int:
    from ..data.corpus import check_corpus_spec, get_corpus
    from ..models import load_model
    from ..prompt import SoftPrompt, accuracy, load_label_task, step_progress
    from ..prompt.post import TransferConfig, public_texts
    from ..prompt.post import transfer as run_transfer
    from ..prompt.tasks import public_facts

    facts = args.public == "facts"
    if facts and args.pararel is None:
        raise EngramError("--public facts are built from a ParaRel folder; pass --pararel DIR")
    if not facts:
        check_corpus_spec(args.public)
    task = load_label_task(args.task, pararel=args.pararel, seed=args.seed)
    # facts before the models load: a folder with no usable fact is refused here
    public = public_facts(args.pararel, task, args.n_public, seed=args.seed) if facts else None
    prompt = SoftPrompt.load(args.prompt)  # a bad folder is refused before the models load
    small = load_model(args.source, progress=not args.json)
    prompt.check(small)
    large = load_model(args.target, progress=not args.json)
    if public is None:
        public = public_texts(get_corpus(large, args.public, progress=not args.json),
                              args.n_public, seed=args.seed)
    config = TransferConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                            eval_every=args.eval_every, public=len(public), seed=args.seed,
                            init=args.init)
    bar, on_step = step_progress(config.steps, desc="prompt transfer")
    with bar:
        moved = run_transfer(small, large, prompt, task, public, config, on_step=on_step)
    moved.save(Path(args.out), large)
    zero = accuracy(large, None, task, task.val)
    obj = {"task": task.name, "split": "val", "n": len(task.val),
           "accuracy": moved.meta["val_accuracy"], "zero_shot_accuracy": zero,
           "public": len(public), "out": args.out}
    emit(args, obj, [f"{task.name}: the prompt moved from {small.label} to {large.label}: "
                     f"validation accuracy {zero:.3f} zero-shot → "
                     f"{moved.meta['val_accuracy']:.3f}; saved to {args.out}"])
    return 0
