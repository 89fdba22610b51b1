"""Sequential editing: AlphaEdit vs MEMIT as edits accumulate (the AlphaEdit paper's Fig. 1).

Counterfactual cases generated from ParaRel × T-REx (real paraphrases) are edited in batches of
``--batch-size``, one batch after another on the weights the previous left; every
``--eval-every`` batches all edits so far are scored. Prints JSON (final figures and curves) and
draws both curves into ``--png``.

    .venv/bin/python bench/sequential.py [--model smollm2-135m] [--n 500] [--batch-size 10] \
        [--eval-every 10] [--methods memit alphaedit] [--png seq.png]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import engramlab as eg
from engramlab.data import pararel_cases
from engramlab.edit import get_editor, run_protocol

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/pararel"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=["memit", "alphaedit"])
    parser.add_argument("--device", default=None)
    parser.add_argument("--set", nargs="*", default=[], help="overrides k=v for every method")
    parser.add_argument("--png", default=None)
    parser.add_argument("--plot-from", nargs="*", default=None,
                        help="draw --png from earlier runs' JSON outputs instead of editing")
    args = parser.parse_args()
    if args.plot_from:
        merged: dict = {"model": args.model, "batch_size": args.batch_size, "methods": {}}
        for path in args.plot_from:
            text = Path(path).read_text()
            doc = json.loads(text[text.index("{\n"):])  # skip the progress lines
            merged["methods"].update(doc["methods"])
            merged["model"] = doc["model"]
        _plot(merged, args.png or "sequential.png")
        return
    lm = eg.load_model(args.model, progress=False, device=args.device)
    cases = pararel_cases(args.data, args.n, seed=0)
    overrides = dict(kv.split("=", 1) for kv in args.set)
    out = {"model": args.model, "n": len(cases), "batch_size": args.batch_size,
           "device": str(lm.device),
           "gpu": torch.cuda.get_device_name() if lm.device.type == "cuda" else None,
           "methods": {}}
    for method in args.methods:
        editor = get_editor(method, **overrides)
        t0 = time.perf_counter()
        result = run_protocol(lm, editor, cases, protocol="sequential",
                              batch_size=args.batch_size, eval_every=args.eval_every,
                              on_point=lambda p, m=method: print(json.dumps({m: p}), flush=True))
        out["methods"][method] = {"pre": result.pre, "post": result.post,
                                  "curve": result.curve,
                                  "seconds_per_edit": result.seconds_per_edit,
                                  "hparams": editor.hparams_for(lm).to_dict(),
                                  "wall_seconds": time.perf_counter() - t0}
    print(json.dumps(out, indent=1, default=str))
    if args.png:
        _plot(out, args.png)


def _plot(out: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5), sharex=True)
    for ax, key in zip(axes, ("efficacy", "paraphrase", "neighborhood"), strict=True):
        for method, res in out["methods"].items():
            curve = [{"edits": 0, key: res["pre"][key]}] + res["curve"]
            ax.plot([p["edits"] for p in curve], [p[key] for p in curve], marker="o",
                    label=method)
        ax.set_title(key)
        ax.set_xlabel("edits so far")
        ax.set_ylim(0, 1.02)
    axes[0].legend()
    fig.suptitle(f"sequential editing, {out['model']}, batches of {out['batch_size']}")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    main()
