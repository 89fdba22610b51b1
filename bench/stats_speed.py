"""Key-statistics collection speed vs a plain no-grad forward on the same batches. Prints JSON.

    .venv/bin/python bench/stats_speed.py [--model smollm2-135m] [--layers 4 8 12] [--tokens N]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

import engramlab as eg
from engramlab.data import get_corpus
from engramlab.stats import collect_key_stats
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
    args = parser.parse_args()
    lm = eg.load_model(args.model, progress=False, dtype=args.dtype)
    corpus = get_corpus(lm, args.corpus, n_tokens=args.tokens, progress=False)
    batches = list(corpus.batches(lm, n_tokens=args.tokens, batch_size=args.batch_size,
                                  seq_len=args.seq_len))
    n = sum(b.numel() for b in batches)
    sync = synchronizer(lm)
    forward_s = forward_seconds(lm, batches)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["ENGRAMLAB_CACHE"] = cache
        # end to end, tokenisation and the copy of the sums to the host included
        t = time.perf_counter()
        collect_key_stats(lm, args.layers, corpus, n_tokens=args.tokens,
                          batch_size=args.batch_size, seq_len=args.seq_len, progress=False,
                          use_cache=False)
        sync()
        stats_s = time.perf_counter() - t
    print(json.dumps({
        "model": args.model, "device": str(lm.device), "layers": args.layers, "tokens": n,
        "dtype": str(lm.model.dtype),
        "forward_tokens_per_s": round(n / forward_s, 1),
        "stats_tokens_per_s": round(n / stats_s, 1),
        "stats_over_forward": round(forward_s / stats_s, 3),
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
