"""CounterFact-val results: every method and protocol on the cases the model gets right.

A case qualifies when the unedited model's greedy next token after the edit prompt is the first
token of the true object (so "editing" really replaces a known fact). The first ``--n``
qualifying cases are edited with each ``method:protocol`` of ``--runs``. Prints one JSON object.

    .venv/bin/python bench/counterfact_eval.py [--model smollm2-135m] [--n 500] \
        [--runs rome:independent memit:batch alphaedit:batch] [--data PATH]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import engramlab as eg
from engramlab.batching import target_ids
from engramlab.data import load_cases
from engramlab.edit import get_editor, run_protocol

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/counterfact/counterfact-val.json"


def known_cases(lm, cases, batch_size: int = 64):
    """Cases whose true object's first token is the model's greedy next token."""
    keep = []
    for start in range(0, len(cases), batch_size):
        part = cases[start:start + batch_size]
        logits = lm.next_token_logits([c.request.text for c in part])
        top = logits.argmax(-1).tolist()
        for case, t in zip(part, top, strict=True):
            if case.request.target_true and \
                    target_ids(lm, case.request.text, case.request.target_true)[0] == t:
                keep.append(case)
    return keep


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--runs", nargs="+",
                        default=["rome:independent", "memit:batch", "alphaedit:batch"])
    parser.add_argument("--device", default=None)
    parser.add_argument("--fluency-tokens", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], help="overrides k=v for every method")
    args = parser.parse_args()
    lm = eg.load_model(args.model, progress=False, device=args.device)
    cases = load_cases(args.data)
    known = known_cases(lm, cases)
    chosen = known[:args.n]
    overrides = dict(kv.split("=", 1) for kv in args.set)
    out = {"model": args.model, "data": Path(args.data).name, "cases": len(cases),
           "qualifying": len(known), "n": len(chosen),
           "device": str(lm.device), "gpu": torch.cuda.get_device_name() if
           torch.cuda.is_available() and lm.device.type == "cuda" else None, "runs": []}
    for run in args.runs:
        method, _, protocol = run.partition(":")
        editor = get_editor(method, **overrides)
        t0 = time.perf_counter()
        result = run_protocol(lm, editor, chosen, protocol=protocol or "independent",
                              fluency_tokens=args.fluency_tokens)
        row = result.to_json()
        row["wall_seconds"] = time.perf_counter() - t0
        row.pop("hparams", None)
        out["runs"].append(row)
        print(json.dumps({"done": run, "post": row["post"]}), flush=True)
    print(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
