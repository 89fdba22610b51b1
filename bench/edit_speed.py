"""Editing speed and memory. Prints JSON.

* ROME, independent edits: seconds per edit, batched (target values of a chunk optimised
  together, the default) and one request at a time;
* MEMIT, one batch of ``--batch`` facts: seconds per edit;
* key statistics: tokens/s of collection vs a plain no-grad forward on the same batches;
* peak resident memory of the process vs the model's parameter bytes.

Statistics and templates are prepared before timing (they are cached and shared by all edits).

    .venv/bin/python bench/edit_speed.py [--model smollm2-135m] [--n 16] [--batch 50]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import torch

import engramlab as eg
from engramlab.data import sample_corpus
from engramlab.data.bundled import bundled_cases
from engramlab.edit import MEMIT, ROME
from engramlab.stats import _accumulate


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default=None)
    parser.add_argument("--n", type=int, default=16, help="ROME edits to time")
    parser.add_argument("--batch", type=int, default=50, help="MEMIT batch size")
    parser.add_argument("--stats-tokens", type=int, default=8192)
    args = parser.parse_args()
    lm = eg.load_model(args.model, progress=False, device=args.device)
    model_mb = sum(p.numel() * p.element_size() for p in lm.model.parameters()) / 2**20
    rss_loaded = peak_rss_mb()
    cases = bundled_cases()
    reqs = [c.request for c in cases]
    out: dict = {"model": args.model, "device": str(lm.device), "threads": torch.get_num_threads(),
                 "model_mb": model_mb, "rss_after_load_mb": rss_loaded}

    rome = ROME()
    rome.prepare(lm)
    t = time.perf_counter()
    rome.edit_each(lm, reqs[:args.n])
    out["rome_batched_seconds_per_edit"] = (time.perf_counter() - t) / args.n
    singles = []
    for req in reqs[:max(2, args.n // 4)]:
        t = time.perf_counter()
        rome.edit(lm, req)
        singles.append(time.perf_counter() - t)
    out["rome_single_seconds_per_edit_median"] = statistics.median(singles)
    out["rome_hparams"] = {k: rome.hparams_for(lm).to_dict()[k]
                           for k in ("layers", "v_steps", "v_lr", "templates")}

    memit = MEMIT()
    memit.prepare(lm)
    batch = reqs[:args.batch]  # distinct requests (the bundled set has 82)
    t = time.perf_counter()
    memit.edit(lm, batch)
    out["memit_batch"] = len(batch)
    out["memit_seconds_per_edit"] = (time.perf_counter() - t) / len(batch)
    out["peak_rss_mb"] = peak_rss_mb()
    out["peak_rss_over_model"] = out["peak_rss_mb"] / model_mb

    corpus = sample_corpus(lm, n_tokens=args.stats_tokens, progress=False)
    rows = list(corpus.batches(lm, n_tokens=args.stats_tokens, batch_size=8, seq_len=256))
    n_tok = sum(r.numel() for r in rows)
    with torch.no_grad():
        lm.model(input_ids=rows[0].to(lm.device))
        t = time.perf_counter()
        for r in rows:
            lm.model(input_ids=r.to(lm.device))
        fwd = time.perf_counter() - t
    layers = memit.hparams_for(lm).layers
    t = time.perf_counter()
    _accumulate(lm, layers, corpus, n_tokens=args.stats_tokens, batch_size=8, seq_len=256,
                progress=False)
    stats_s = time.perf_counter() - t
    out["stats_layers"] = layers
    out["forward_tokens_per_s"] = n_tok / fwd
    out["stats_tokens_per_s"] = n_tok / stats_s
    out["stats_over_forward"] = fwd / stats_s
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
