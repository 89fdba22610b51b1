"""Run many forward passes that differ only from a known token on, paying for the prefix once.

Target optimisation adds δ at the subject's lookup token, so every token *before* it computes
the same keys and values at every step. :class:`PrefixBatch` runs those prefixes once (no grad)
into a key/value cache and each step runs only the suffixes against it. With context templates
in front of the prompt, the suffix is typically a quarter of the row, and the steps cost that
much less — the reason a full ROME edit (templates, KL term) is faster here than a bare
single-prompt one.

The same holds for the blocks before the one δ is added in: their states at the suffix's tokens
never change either. ``run(lm, start=l)`` records the state entering block l on its first call
and begins there on every later call, so a step runs only the blocks δ can reach.

Rows are right-padded in both parts; padding inside the prefix is masked out of the suffix's
attention, and explicit position ids keep every real token at its unpadded position, so the
result equals a plain forward of each row (tested).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from ..batching import Batch, make_batch
from ..models.kv import crop_each, extend, map_cache, prefill
from ..models.lm import LM
from ..trace import Trace, started_at


def length_groups(lengths: list[int], max_groups: int = 3) -> list[list[int]]:
    """Split row indices into at most ``max_groups`` runs of similar length, minimising the
    padded size Σ rows × longest (exact dynamic programme over the sorted lengths)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sl = [lengths[i] for i in order]
    n = len(sl)
    inf = float("inf")
    # best[g][j]: min cost covering the first j rows with g groups
    best = [[inf] * (n + 1) for _ in range(max_groups + 1)]
    cut = [[0] * (n + 1) for _ in range(max_groups + 1)]
    best[0][0] = 0
    for g in range(1, max_groups + 1):
        for j in range(1, n + 1):
            for i in range(j):
                cost = best[g - 1][i] + (j - i) * sl[j - 1]
                if cost < best[g][j]:
                    best[g][j], cut[g][j] = cost, i
    g = min(range(1, max_groups + 1), key=lambda k: best[k][n])
    groups, j = [], n
    while g > 0 and j > 0:
        i = cut[g][j]
        groups.append(order[i:j])
        j, g = i, g - 1
    return groups[::-1]


@dataclass
class PrefixBatch:
    """``batch`` holds the suffixes (positions shifted: suffix index = row index − split);
    ``entry`` the suffixes' state entering block ``entry_block``, once a run has recorded it."""

    batch: Batch
    splits: list[int]
    prefix_mask: torch.Tensor | None
    cache: Any
    entry: torch.Tensor | None = None
    entry_block: int = 0

    @classmethod
    @torch.no_grad()
    def build(cls, lm: LM, rows: list[list[int]], owner: list[int], lookup: list[list[int]],
              labels: list[list[tuple[int, int]]] | None = None, *,
              use_cache: bool = True) -> PrefixBatch:
        """Split each row before its first lookup position and run the prefixes."""
        labels = labels if labels is not None else [[] for _ in rows]
        splits = [min(look) if use_cache else 0 for look in lookup]
        suffix = [row[s:] for row, s in zip(rows, splits, strict=True)]
        shifted = [[p - s for p in look] for look, s in zip(lookup, splits, strict=True)]
        moved = [[(p - s, t) for p, t in lab] for lab, s in zip(labels, splits, strict=True)]
        batch = make_batch(lm, suffix, owner, shifted, moved)
        width = max(splits)
        if width == 0:
            return cls(batch, splits, None, None)
        pids = make_batch(lm, [row[:s] or [0] for row, s in zip(rows, splits, strict=True)],
                          owner, [[0]] * len(rows)).input_ids
        true_mask = torch.zeros(len(rows), width, dtype=torch.long, device=lm.device)
        for r, s in enumerate(splits):
            true_mask[r, :s] = 1
        # a row without prefix would attend to nothing (NaN); let it see its first (pad)
        # token during the prefix pass only — the suffix pass masks that token out again
        run_mask = true_mask.clone()
        run_mask[:, 0] = 1
        pos = torch.arange(width, device=lm.device).expand(len(rows), width)
        return cls(batch, splits, true_mask, prefill(lm, pids, run_mask, pos))

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (local indices), in place: the cached prefix is sliced, not
        recomputed, so dropping finished requests from an optimisation costs nothing."""
        b = self.batch
        width = int(b.attention_mask[rows].sum(1).max())
        index = torch.tensor(rows, device=b.input_ids.device)
        self.batch = Batch(b.input_ids[index, :width], b.attention_mask[index, :width],
                           [b.owner[r] for r in rows], [b.lookup[r] for r in rows],
                           [b.labels[r] for r in rows] if b.labels else [])
        self.splits = [self.splits[r] for r in rows]
        if self.entry is not None:
            self.entry = self.entry[index, :width]
        if self.cache is not None:
            self.prefix_mask = self.prefix_mask[index]  # type: ignore[index]
            self.cache.batch_select_indices(index)

    def run(self, lm: LM, start: int = 0) -> None:
        """One forward of the suffixes (hooks entered by the caller see it).

        ``start`` > 0 promises that nothing the caller does changes the blocks before it: the
        first call records the suffixes' state entering block ``start``, later calls begin
        there (hooks on the earlier blocks then do not fire)."""
        b = self.batch
        if self.cache is None:
            lm.body(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
            return
        width = self.prefix_mask.shape[1]  # type: ignore[union-attr]
        mask = torch.cat([self.prefix_mask, b.attention_mask], 1)  # type: ignore[list-item]
        begin = torch.tensor(self.splits, device=lm.device)[:, None]
        pos = begin + torch.arange(b.input_ids.shape[1], device=lm.device)[None]
        record = start > 0 and (self.entry is None or self.entry_block != start)
        if record:
            context: Any = Trace(lm).capture(f"resid.{start - 1}")
        elif start > 0:
            context = started_at(lm, start, self.entry)  # type: ignore[arg-type]
        else:
            context = nullcontext()
        try:
            with context as tr:
                extend(lm, self.cache, b.input_ids, mask, pos)
            if record:
                self.entry, self.entry_block = tr[f"resid.{start - 1}"], start
        finally:  # drop the suffix again, layer by layer (a pass from `start` grows only some)
            crop_each(self.cache, width)
            _detach(self.cache)


def _detach(cache: Any) -> None:
    """Cut the kept prefix off the last step's graph. Cropping leaves slices of the step's
    prefix + suffix tensors, which would keep the suffix's memory alive in every group's cache
    between steps; they are copied down to the prefix instead."""
    map_cache(cache, _compact)


def _compact(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.clone() if t.untyped_storage().nbytes() > t.numel() * t.element_size() else t
