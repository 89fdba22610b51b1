"""Key-statistics collection speed vs a plain no-grad forward on the same batches. Prints JSON.

    .venv/bin/python bench/stats_speed.py [--model smollm2-135m] [--layers 4 8 12] [--tokens N]
        [--workers 1 2] [--ray [ADDRESS]] [--save AREA/RUN]

With several ``--workers`` counts, collection is timed once per count (local processes, or
Ray tasks with ``--ray``; a Ray cluster's start is not counted).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time

import torch

import engramlab as eg
import entry
from engramlab.data import get_corpus
from engramlab.scale.cluster import connected
from engramlab.stats import collect_key_stats
from results import save_run
from timing import forward_seconds, synchronizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, nargs="+", default=[8])
    parser.add_argument("--tokens", type=int, default=16_384)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--corpus", default=None, help="wiki (default), sampled or a path")
    parser.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    parser.add_argument("--workers", type=int, nargs="+", default=[1])
    parser.add_argument("--ray", nargs="?", const="local", default=None)
    parser.add_argument("--save", default=None, help="AREA/RUN under docs/results")
    args = parser.parse_args()
    lm = eg.load_model(args.model, progress=False, dtype=args.dtype)
    corpus = get_corpus(lm, args.corpus, n_tokens=args.tokens, progress=False)
    batches = list(corpus.batches(lm, n_tokens=args.tokens, batch_size=args.batch_size,
                                  seq_len=args.seq_len))
    n = sum(b.numel() for b in batches)
    sync = synchronizer(lm)
    forward_s = forward_seconds(lm, batches)
    ray = connected(args.ray) if args.ray is not None else contextlib.nullcontext()
    per_workers = {}
    with tempfile.TemporaryDirectory() as cache, ray:
        os.environ["ENGRAMLAB_CACHE"] = cache
        for workers in args.workers:
            # end to end: tokenisation, workers' model loads, the copy of the sums to the host
            t = time.perf_counter()
            collect_key_stats(lm, args.layers, corpus, n_tokens=args.tokens,
                              batch_size=args.batch_size, seq_len=args.seq_len, progress=False,
                              use_cache=False, workers=workers, ray=args.ray)
            sync()
            per_workers[workers] = round(n / (time.perf_counter() - t), 1)
    stats_tps = per_workers[args.workers[0]]
    out = {
        "model": args.model, "device": str(lm.device), "layers": args.layers, "tokens": n,
        "dtype": str(lm.model.dtype), "cpus": os.cpu_count(), "ray": args.ray,
        "forward_tokens_per_s": round(n / forward_s, 1),
        "stats_tokens_per_s": stats_tps,
        "stats_over_forward": round(stats_tps * forward_s / n, 3),
        "stats_tokens_per_s_by_workers": per_workers,
        "threads": torch.get_num_threads(),
    }
    if args.save:
        save_run(*args.save.split("/"), out, vars(args))
    print(json.dumps(out))


if __name__ == "__main__":
    entry.run(main)
