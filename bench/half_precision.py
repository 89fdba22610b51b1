"""Half-precision weights against float32: statistics throughput and edit tolerance. Prints JSON.

    .venv/bin/python bench/half_precision.py [--model smollm2-135m] [--device cpu]
        [--random-arch gpt2-xl --tokenizer DIR] [--half bfloat16] [--edits 8]
        [--throughput-tokens N] [--stats-tokens N] [--save AREA/RUN]

One set of weights is held twice, as loaded (float32) and rounded to ``--half``:

* throughput: tokens/s of a plain full forward over pre-tokenised rows, and of key-statistics
  collection at the MEMIT layers end to end (tokenisation included), in each dtype;
* statistics: the relative Frobenius distance of each layer's C₀ = E[k kᵀ] collected by the
  half-precision model from the float32 one's (both accumulate in float64);
* edits: ``--edits`` ROME edits (one request each) and one MEMIT batch of them made on the
  half-precision model with its own statistics, against the same made on the float32 model:
  the relative distance between the two deltas, and the probability of the new target after
  each edit in each model (first target token, the request's own prompt);
* which part of that is the rounding of the weights and which the half-precision arithmetic:
  the same edits on the rounded weights cast back to float32 (``rounded``: float32
  arithmetic, half-precision weights), against float32's;
* the floor those distances stand on: the same edits on a float32 copy whose weights carry
  one float32 rounding of noise (× (1 + 2⁻²⁴·N(0, 1))), which changes no result a user
  could see, against the float32 ones. The target optimisation (Adam) follows the signs of
  its gradient entries, so the deltas move far more than the weights did in both cases.

``--random-arch gpt2-xl`` builds GPT-2 XL's shape with random weights (nothing can be
downloaded here; see ``bench/edit_speed.py``): its figures are speeds and numerical
tolerances, not edit quality.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

import engramlab as eg
import entry
from edit_speed import random_gpt2_xl
from engramlab.data import get_corpus
from engramlab.data.bundled import bundled_cases
from engramlab.edit import MEMIT, ROME
from engramlab.models import Layout
from engramlab.stats import collect_key_stats
from results import save_run
from timing import forward_seconds, synchronizer


def relative_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def throughput(lm: eg.LM, layers: list[int], corpus, n_tokens: int, batch_size: int) -> dict:
    rows = list(corpus.batches(lm, n_tokens=n_tokens, batch_size=batch_size, seq_len=256))
    n = sum(r.numel() for r in rows)
    sync = synchronizer(lm)
    forward_s = forward_seconds(lm, rows)
    collect_key_stats(lm, layers, corpus, n_tokens=2 * batch_size * 256, batch_size=batch_size,
                      progress=False, use_cache=False)  # warm-up: kernels and allocations
    sync()
    t = time.perf_counter()
    collect_key_stats(lm, layers, corpus, n_tokens=n_tokens, batch_size=batch_size,
                      progress=False, use_cache=False)
    sync()
    stats_s = time.perf_counter() - t
    return {"tokens": n, "forward_tokens_per_s": n / forward_s,
            "stats_tokens_per_s": n / stats_s, "stats_over_forward": forward_s / stats_s}


@torch.no_grad()
def target_probability(lm: eg.LM, request: eg.EditRequest) -> float:
    prompt = request.prompt.format(request.subject)
    token = lm.encode(" " + request.target_new.strip())[0]
    return float(lm.next_token_logits(prompt)[0].float().softmax(-1)[token])


def edit_tolerance(models: dict[str, eg.LM], stats: dict, requests: list, steps: int | None
                   ) -> dict:
    """ROME per request and one MEMIT batch on each model; every delta against float32's."""
    extra = {} if steps is None else {"target": {"steps": steps}}
    others = [name for name in models if name != "float32"]
    rows = []
    for req in requests:
        row: dict = {"subject": req.subject}
        deltas = {}
        for name, lm in models.items():
            rome = ROME(key_stats=stats[name], **extra)
            t = time.perf_counter()
            deltas[name] = rome.edit(lm, req)
            row[f"{name}_seconds"] = time.perf_counter() - t
            with deltas[name].applied(lm):
                row[f"{name}_p_new"] = target_probability(lm, req)
        (param,) = deltas["float32"].entries
        for name in others:
            row[f"{name}_relative_distance"] = relative_distance(
                deltas[name].entries[param].to_dense(), deltas["float32"].entries[param].to_dense())
        rows.append(row)
    memit = {name: MEMIT(key_stats=stats[name], **extra).edit(lm, requests)
             for name, lm in models.items()}
    out: dict = {"rome": rows, "rome_seconds_median": {
        name: statistics.median(r[f"{name}_seconds"] for r in rows) for name in models}}
    for name in others:
        dist = [r[f"{name}_relative_distance"] for r in rows]
        gap = [abs(r[f"{name}_p_new"] - r["float32_p_new"]) for r in rows]
        out[name] = {
            "rome_relative_distance_median": statistics.median(dist),
            "rome_relative_distance_max": max(dist),
            "rome_p_new_abs_difference_median": statistics.median(gap),
            "rome_p_new_abs_difference_max": max(gap),
            "memit_relative_distance": {
                p: relative_distance(memit[name].entries[p].to_dense(),
                                     memit["float32"].entries[p].to_dense())
                for p in memit["float32"].entries},
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default=None)
    parser.add_argument("--random-arch", choices=["gpt2-xl"], default=None)
    parser.add_argument("--tokenizer", default=None, help="with --random-arch: a tokenizer folder")
    parser.add_argument("--half", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--edits", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="target steps (preset's default)")
    parser.add_argument("--throughput-tokens", type=int, default=16_384)
    parser.add_argument("--stats-tokens", type=int, default=50_000,
                        help="tokens of the statistics the edits use")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--save", default=None, help="AREA/RUN under docs/results")
    args = parser.parse_args()
    if args.save and args.save.count("/") != 1:
        parser.error("--save takes AREA/RUN")
    if args.random_arch:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else \
            eg.load_model(args.model, device="cpu", progress=False).tokenizer
        full = random_gpt2_xl(tokenizer, args.device or "cuda")
    else:
        full = eg.load_model(args.model, device=args.device, progress=False)
    rounded = copy.deepcopy(full.model).to(getattr(torch, args.half))
    half = eg.LM(model=rounded, tokenizer=full.tokenizer, layout=Layout(rounded), name=full.name)
    jittered = copy.deepcopy(full.model)
    with torch.no_grad():
        g = torch.Generator(device=full.device).manual_seed(0)
        for param in jittered.parameters():
            param.mul_(1 + 2.0**-24 * torch.randn(param.shape, generator=g, device=param.device))
    jitter = eg.LM(model=jittered, tokenizer=full.tokenizer, layout=Layout(jittered),
                   name=full.name)
    lifted = copy.deepcopy(rounded).to(torch.float32)
    lifted_lm = eg.LM(model=lifted, tokenizer=full.tokenizer, layout=Layout(lifted),
                      name=full.name)
    pair = {"float32": full, "half": half, "rounded": lifted_lm, "jitter": jitter}
    memit_hp = MEMIT().hparams_for(full)
    layers = list(memit_hp.layers)
    rome_layers = list(ROME().hparams_for(full).layers)
    corpus = get_corpus(full, memit_hp.stats.corpus, n_tokens=args.stats_tokens, progress=False)
    out: dict = {"model": full.name, "device": str(full.device), "half": args.half,
                 "threads": torch.get_num_threads(), "memit_layers": layers,
                 "rome_layers": rome_layers}
    if full.device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(full.device)
    if not args.skip_throughput:
        out["throughput"] = {name: throughput(lm, layers, corpus, args.throughput_tokens,
                                              args.batch_size)
                             for name, lm in pair.items() if name in ("float32", "half")}
        print(json.dumps({"throughput": out["throughput"]}), flush=True)
    stats_layers = sorted(set(layers) | set(rome_layers))
    stats = {name: collect_key_stats(lm, stats_layers, corpus, n_tokens=args.stats_tokens,
                                     batch_size=args.batch_size, progress=False,
                                     use_cache=False)
             for name, lm in pair.items()}
    out["stats_tokens"] = stats["float32"][stats_layers[0]].count
    out["stats_relative_distance"] = {
        name: {layer: relative_distance(stats[name][layer].moment(),
                                        stats["float32"][layer].moment())
               for layer in stats_layers}
        for name in pair if name != "float32"}
    requests = [c.request for c in bundled_cases()[:args.edits]]
    out["edits"] = edit_tolerance(pair, stats, requests, args.steps)
    if args.save:
        save_run(*args.save.split("/"), out, vars(args))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    entry.run(main)
