"""Editing speed and memory. Prints JSON.

* ROME, independent edits: seconds per edit, batched (target values of a chunk optimised
  together, the default) and one request at a time;
* MEMIT, one batch of ``--batch`` facts: seconds per edit;
* key statistics: tokens/s of collection vs a plain no-grad forward on the same batches;
* memory: for each phase (one ROME edit, a batched chunk of ROME edits, the MEMIT batch), the
  peak resident memory above what the process held before it loaded the model (the Python,
  torch and transformers runtime, ~260 MB), divided by the model's parameter bytes; the
  phase's working set (its peak above what the process held when it began: model, cached
  statistics and templates); the **edit's footprint** ``1 + (peak − ready) / model``, where
  ``ready`` is the process's RSS once the model is loaded and has run one forward (every weight
  page resident) and before any editor exists: the model plus everything editing adds
  (statistics, templates, the optimisation's working set), without the tokenizer and the
  modelling code that loading imports (~125 MB for SmolLM2, counted in the first figure);
  and the whole process's peak. The peaks are sampled every 20 ms
  from /proc (Linux), since ``ru_maxrss`` only ever grows. ``--memory-budget F`` sets both
  editors' ``memory_budget`` (the target optimisation sized to F × the model's bytes; see
  ``engramlab/edit/memory.py``).

Statistics and templates are prepared before timing (they are cached and shared by all edits).

    .venv/bin/python bench/edit_speed.py [--model smollm2-135m] [--n 16] [--batch 50]

``--random-arch gpt2-xl`` times the flagship's shape without its weights (nothing can be
downloaded here): GPT-2 XL's configuration (48 layers, d_model 1600), randomly initialised, with
``--model``'s tokenizer and vocabulary (or ``--tokenizer DIR``'s, which loads no model: a few MB
to carry to a GPU machine); the GPT-2 XL preset (ROME layer 17, MEMIT 13-17) applies. Speeds are
representative (the work per token is the architecture's); edit quality is not.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import sys
import threading
import time
from contextlib import contextmanager, nullcontext

import torch
import transformers  # noqa: F401  (library code belongs to the runtime baseline, not the edit)

import engramlab as eg
import entry
from engramlab.data import get_corpus
from engramlab.data.bundled import bundled_cases
from engramlab.edit import MEMIT, ROME
from engramlab.stats import collect_key_stats
from results import save_run
from timing import forward_seconds, synchronizer


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


@contextmanager
def sampled_peak(into: dict, key: str):
    """Peak RSS (MB) while the block runs, sampled by a thread; Linux only. On a GPU the
    allocator's peak is recorded too, as ``key + "_gpu"``."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    peak = [rss_mb()]
    into[key + "_start"] = peak[0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb())
            stop.wait(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        into[key] = max(peak[0], rss_mb())
        if cuda:
            into[key + "_gpu"] = torch.cuda.max_memory_allocated() / 2**20


def random_gpt2_xl(tokenizer, device: str | torch.device) -> eg.LM:
    import transformers as T

    from engramlab.models import Layout

    torch.manual_seed(0)
    cfg = T.GPT2Config(n_layer=48, n_embd=1600, n_head=25, n_positions=1024,
                       vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    model = T.GPT2LMHeadModel(cfg).eval().to(device)
    model.requires_grad_(False)
    return eg.LM(model=model, tokenizer=tokenizer, layout=Layout(model), name="random-gpt2-xl")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default=None)
    parser.add_argument("--n", type=int, default=16, help="ROME edits to time")
    parser.add_argument("--batch", type=int, default=50, help="MEMIT batch size")
    parser.add_argument("--stats-tokens", type=int, default=8192,
                        help="tokens for the statistics speed test (0 skips it)")
    parser.add_argument("--random-arch", choices=["gpt2-xl"], default=None)
    parser.add_argument("--tokenizer", default=None,
                        help="with --random-arch: a tokenizer folder, so no model is loaded")
    parser.add_argument("--stats-only", action="store_true", help="skip the editing timings")
    parser.add_argument("--phases", default="rome_single,rome_batched,memit_batch",
                        help="which edit phases to run, in this process (one phase per process "
                             "measures it without what earlier phases left allocated)")
    parser.add_argument("--memory-budget", type=float, default=None,
                        help="hparam memory_budget for both editors (fraction of model bytes)")
    parser.add_argument("--save", default=None, help="AREA/RUN under docs/results/")
    args = parser.parse_args()
    if args.save is not None and args.save.count("/") != 1:
        parser.error("--save takes AREA/RUN, e.g. speed/edit_speed_smollm2_cpu")
    if args.tokenizer and not args.random_arch:
        parser.error("--tokenizer only replaces the model's tokenizer with --random-arch")
    if args.random_arch and args.stats_tokens < 1:
        parser.error("--random-arch collects its own statistics: --stats-tokens must be >= 1")
    phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    unknown = phases - {"rome_single", "rome_batched", "memit_batch"}
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}")
    linux = sys.platform.startswith("linux")  # RSS is read from /proc
    runtime_mb = rss_mb() if linux else None
    overrides: dict = {} if args.memory_budget is None else {
        "target.memory_budget": args.memory_budget}
    if args.random_arch and args.tokenizer:
        from transformers import AutoTokenizer

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        lm = random_gpt2_xl(AutoTokenizer.from_pretrained(args.tokenizer), device)
    else:
        lm = eg.load_model(args.model, progress=False, device=args.device)
        if args.random_arch:
            lm = random_gpt2_xl(lm.tokenizer, args.device or lm.device)
    if args.random_arch:
        overrides["stats.tokens"] = args.stats_tokens
    model_mb = sum(p.numel() * p.element_size() for p in lm.model.parameters()) / 2**20
    rss_loaded = peak_rss_mb()
    with torch.no_grad():  # every weight page resident (safetensors maps them lazily)
        lm.model(input_ids=torch.tensor([[lm.tokenizer.eos_token_id or 0]], device=lm.device))
    ready_mb = rss_mb() if linux else None
    cases = bundled_cases()
    reqs = [c.request for c in cases]
    out: dict = {"model": lm.name, "device": str(lm.device), "threads": torch.get_num_threads(),
                 "model_mb": model_mb, "rss_after_load_mb": rss_loaded}

    memit = MEMIT(**overrides)
    if args.stats_only:
        return print(json.dumps({**out, **stats_speed(lm, memit, args.stats_tokens)}, indent=1))
    out["phases"] = sorted(phases)
    peaks: dict = {}
    track = (lambda key: sampled_peak(peaks, key)) if linux else (lambda key: nullcontext())
    if phases & {"rome_single", "rome_batched"}:
        rome = ROME(**overrides)
        rome.prepare(lm)
        hp = rome.hparams_for(lm)
        out["rome_hparams"] = {"layers": hp.layers, "templates": hp.templates,
                               "target": dataclasses.asdict(hp.target)}
    if "rome_single" in phases:
        singles = []
        with track("rome_single"):
            for req in reqs[:max(2, args.n // 4)]:
                t = time.perf_counter()
                rome.edit(lm, req)
                singles.append(time.perf_counter() - t)
        out["rome_single_seconds_per_edit_median"] = statistics.median(singles)
        out["rome_single_seconds"] = singles
    if "rome_batched" in phases:
        with track("rome_batched"):
            t = time.perf_counter()
            rome.edit_each(lm, reqs[:args.n])
            out["rome_batched_seconds_per_edit"] = (time.perf_counter() - t) / args.n
    if "memit_batch" in phases:
        memit.prepare(lm)
        batch = reqs[:args.batch]  # distinct requests (the bundled set has 82)
        with track("memit_batch"):
            t = time.perf_counter()
            memit.edit(lm, batch)
            out["memit_seconds_per_edit"] = (time.perf_counter() - t) / len(batch)
        out["memit_batch"] = len(batch)
    out["peak_rss_mb"] = peak_rss_mb()
    out["peak_rss_over_model"] = out["peak_rss_mb"] / model_mb
    if linux:
        out["runtime_rss_mb"] = runtime_mb
        starts = {k[:-len("_start")]: peaks.pop(k) for k in list(peaks) if k.endswith("_start")}
        out["phase_peak_rss_mb"] = peaks
        out["phase_peak_over_model"] = {
            k: (v if k.endswith("_gpu") else v - runtime_mb) / model_mb for k, v in peaks.items()}
        # the edit's own memory: the peak above what the process held when the phase began
        # (model, cached statistics and templates, the libraries' code)
        out["phase_working_set_mb"] = {k: peaks[k] - v for k, v in starts.items()}
        out["model_ready_rss_mb"] = ready_mb
        out["phase_edit_footprint_over_model"] = {
            k: 1 + (v - ready_mb) / model_mb for k, v in peaks.items() if not k.endswith("_gpu")}
    if args.stats_tokens > 0:
        out.update(stats_speed(lm, memit, args.stats_tokens))
    if args.save:
        save_run(*args.save.split("/"), out, vars(args))
    print(json.dumps(out, indent=1))


def stats_speed(lm: eg.LM, memit: MEMIT, n_tokens: int) -> dict:
    """Key-statistics collection vs plain forward passes over the same pre-tokenised rows."""
    out: dict = {}
    corpus = get_corpus(lm, memit.hparams_for(lm).stats.corpus, n_tokens=n_tokens,
                        progress=False)
    rows = list(corpus.batches(lm, n_tokens=n_tokens, batch_size=8, seq_len=256))
    n_tok = sum(r.numel() for r in rows)
    sync = synchronizer(lm)
    fwd = forward_seconds(lm, rows)
    layers = memit.hparams_for(lm).layers
    collect_key_stats(lm, layers, corpus, n_tokens=2048, batch_size=8, seq_len=256,
                      progress=False, use_cache=False)  # warm-up: kernels and allocations
    sync()
    t = time.perf_counter()
    collect_key_stats(lm, layers, corpus, n_tokens=n_tokens, batch_size=8, seq_len=256,
                      progress=False, use_cache=False)
    sync()
    stats_s = time.perf_counter() - t
    out["stats_layers"] = layers
    out["forward_tokens_per_s"] = n_tok / fwd
    out["stats_tokens_per_s"] = n_tok / stats_s
    out["stats_over_forward"] = fwd / stats_s
    return out


if __name__ == "__main__":
    entry.run(main)
