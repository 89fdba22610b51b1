"""Model loading times: first GGUF load (dequantize + cache) vs cached load. Prints JSON.

    .venv/bin/python bench/load.py [--model smollm2-135m]

Each measurement runs in a fresh process (a cold import of torch/transformers is part of what a
user waits for, and is reported separately) with its own empty cache for the first load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import entry

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch, transformers  # noqa: F401
# The modeling stack (torch._dynamo, torch.distributed, ...) is imported by any HF model load.
import transformers.modeling_utils  # noqa: F401
from transformers import PreTrainedTokenizerFast  # noqa: F401
t1 = time.perf_counter()
import engramlab as eg
lm = eg.load_model(sys.argv[1], progress=False, device="cpu")
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "fingerprint": lm.fingerprint()}))
"""


def run(model: str, cache: str) -> dict:
    env = {**os.environ, "ENGRAMLAB_CACHE": cache}
    out = subprocess.run([sys.executable, "-c", CHILD, model], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        first = run(args.model, cache)
        cached = [run(args.model, cache) for _ in range(3)]
    best = min(cached, key=lambda r: r["load_s"])
    print(json.dumps({
        "model": args.model,
        "first_load_s": round(first["load_s"], 2),
        "cached_load_s": round(best["load_s"], 2),
        "cached_load_runs_s": [round(r["load_s"], 2) for r in cached],
        "torch_transformers_import_s": round(best["import_s"], 2),
        "same_fingerprint": all(r["fingerprint"] == first["fingerprint"] for r in cached),
    }))


if __name__ == "__main__":
    entry.run(main)
