"""Size the target optimisation's batches to a memory budget.

Editing must not need much more memory than the model itself. The weights are never copied
(deltas are low-rank factors), so what grows with the number of requests is the target
optimisation (:mod:`.targets`): the prefix key/value cache of every row of a chunk, held for all
steps, and the activations autograd keeps for the forward of one group of rows, from the
edited point to the last layer. Both are linear in tokens, so one small probe measures them per
token for a model and point — exactly, by counting the bytes of the cache and of the tensors
autograd saves — and the plan then picks:

* requests per chunk: as many as ``chunk`` allows while their prefix caches fit half of the
  budget (padded to the chunk's longest prefix);
* rows per forward: as many as fit the rest, counting each row's padded suffix tokens and its
  scored positions (a vocabulary-sized logit, log-softmax and gradient each).

Smaller forwards cost speed (per-call overhead), never results: rows never mix, so any split
gives the same δ (tested). The estimate counts what autograd saves, times ``SAFETY``; gradients,
allocator slack and the KL rows' vocabulary-sized tensors (counted as ``KL_SCORED`` labels) come
on top, so the budget is a target, not a cap. Between chunks the freed heap is handed back to
the OS (:func:`release_freed_memory`), or glibc keeps one chunk's working set under the next.
The budget is off by default because on a small model it costs speed; the measured footprints
and times, with and without it, are in the README's editing-memory paragraph
(``bench/edit_speed.py --phases``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..models.lm import LM

# Measured bytes cover what autograd saves; the backward pass adds gradients of a few layers
# and the forward some transients on top. Even with 1.5 the measured working set on SmolLM2
# was 1.25-1.9x the budget (bench/edit_speed.py; see the module docstring).
SAFETY = 1.5
_PROBE_PREFIX, _PROBE_SUFFIX = 8, 8
# scored positions a KL row counts for: its essence-drift term keeps about six vocabulary-sized
# float32 tensors against a label's three (``Costs.per_label``)
KL_SCORED = 2


@dataclass(frozen=True)
class Costs:
    """Bytes per token of the prefix cache and of one forward's saved activations (from the
    edited point on), and per scored position (logits, log-softmax, their gradient)."""

    kv_per_token: float
    act_per_token: float
    per_label: float


_COSTS: weakref.WeakKeyDictionary[Any, dict[tuple[str, torch.dtype], Costs]] = (
    weakref.WeakKeyDictionary())


def budget_bytes(lm: LM, fraction: float | None) -> int | None:
    """``fraction`` of the model's parameter bytes (None: no budget)."""
    if fraction is None:
        return None
    if fraction <= 0:
        raise ValueError(f"memory_budget must be positive (a fraction of the model's size), "
                         f"got {fraction}; use none for no budget")
    return int(fraction * sum(p.numel() * p.element_size() for p in lm.model.parameters()))


def costs(lm: LM, point: str) -> Costs:
    """Per-token costs at ``point``, measured once per model, point and dtype."""
    dtype = next(lm.model.parameters()).dtype
    per_model = _COSTS.setdefault(lm.model, {})
    key = (point, dtype)
    if key not in per_model:
        per_model[key] = _measure(lm, point)
    return per_model[key]


def _measure(lm: LM, point: str) -> Costs:
    from ..models.kv import map_cache
    from .prefix import PrefixBatch
    from .targets import Rows, make_group, run_group

    n = _PROBE_PREFIX + _PROBE_SUFFIX
    ids = [1 + i % (lm.vocab_size - 1) for i in range(n)]
    rows = Rows(ids=[ids], owner=[0], lookup=[[_PROBE_PREFIX]], labels=[[(n - 1, ids[0])]],
                plain_row=[0], kl_row=[])
    pb = PrefixBatch.build(lm, rows.ids, rows.owner, rows.lookup, rows.labels)
    kv_bytes: list[int] = []

    def count(t: torch.Tensor) -> torch.Tensor:
        kv_bytes.append(t.untyped_storage().nbytes())
        return t

    map_cache(pb.cache, count)
    group = make_group(lm, rows, [0], pb, [1.0])
    params = {p.untyped_storage().data_ptr() for p in lm.model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    delta = torch.zeros(1, lm.d_model, device=lm.device, requires_grad=True)
    # as during the optimisation: no weight gradients
    with lm.frozen_weights(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run_group(lm, group, point, f"resid.{lm.n_layers - 1}", delta, None)
    # float32 logits, log-softmax output, and the gradient flowing back through them
    return Costs(kv_per_token=sum(kv_bytes) / _PROBE_PREFIX,
                 act_per_token=sum(saved.values()) / _PROBE_SUFFIX,
                 per_label=3 * 4 * lm.vocab_size)


def plan_chunks(prefix_lens: list[list[int]], max_requests: int, c: Costs | None,
                budget: int | None) -> list[int]:
    """Chunk sizes (requests, in order) whose padded prefix caches fit half of ``budget``;
    ``prefix_lens[r]`` holds request r's prefix length per row."""
    sizes: list[int] = []
    n_rows, width, count = 0, 0, 0
    for lens in prefix_lens:
        rows, wide = n_rows + len(lens), max(width, max(lens))
        over = (c is not None and budget is not None
                and SAFETY * rows * wide * c.kv_per_token > budget / 2)
        if count and (count == max_requests or over):
            sizes.append(count)
            rows, wide, count = len(lens), max(lens), 0
        n_rows, width, count = rows, wide, count + 1
    if count:
        sizes.append(count)
    return sizes


def split_rows(idx: list[int], suffix_len: list[int], n_scored: list[int], cap: int,
               c: Costs | None, budget: float | None) -> list[list[int]]:
    """Split one length group (row indices, in order) into forwards of at most ``cap`` rows
    whose padded activations fit ``budget`` bytes (at least one row each)."""
    pieces: list[list[int]] = []
    cur: list[int] = []
    longest, scored = 0, 0
    for i in idx:
        wide, sc = max(longest, suffix_len[i]), scored + n_scored[i]
        over = (c is not None and budget is not None
                and SAFETY * ((len(cur) + 1) * wide * c.act_per_token + sc * c.per_label)
                > budget)
        if cur and (len(cur) == cap or over):
            pieces.append(cur)
            cur, wide, sc = [], suffix_len[i], n_scored[i]
        cur.append(i)
        longest, scored = wide, sc
    if cur:
        pieces.append(cur)
    return pieces


def release_freed_memory() -> None:
    """Hand memory that tensors freed back to the operating system (glibc only; a no-op
    elsewhere).

    glibc keeps freed heap pages for reuse, so after a chunk of the target optimisation the
    process still held ~150 MB of its working set (SmolLM2, MEMIT batch of 50): the next
    chunk's peak then stacked on top of it. ``malloc_trim`` returns them (measured: 164 MB
    held between chunks before, 28 MB after); it costs a few milliseconds per call.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return None
