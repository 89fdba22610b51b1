"""Percentile bootstrap intervals over cases: the spread a reported mean carries.

Cases are resampled with replacement (Efron & Tibshirani 1993, ch. 13); the interval is the
``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the resampled means. Seeded, so a
result file is reproducible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


def bootstrap_interval(values: Sequence[float], *, level: float = 0.95, n_boot: int = 2000,
                       seed: int = 0) -> tuple[float, float] | None:
    """The percentile interval of the mean of ``values`` (``None`` when there are none)."""
    if not values:
        return None
    x = torch.tensor([float(v) for v in values], dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    means = x[torch.randint(len(x), (n_boot, len(x)), generator=gen)].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2],
                                                dtype=torch.float64)).tolist()
    return lo, hi


def case_intervals(rows: Sequence[Mapping[str, Any]], fields: Mapping[str, str], *,
                   level: float = 0.95, seed: int = 0) -> dict[str, list[float] | None]:
    """``{name: [lo, hi]}`` for each ``name -> field`` of per-case score rows (missing values
    are left out, as the means leave them out)."""
    out: dict[str, list[float] | None] = {}
    for name, key in fields.items():
        ci = bootstrap_interval([r[key] for r in rows if r.get(key) is not None], level=level,
                                seed=seed)
        out[name] = None if ci is None else [ci[0], ci[1]]
    return out


def paired_intervals(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]],
                     fields: Mapping[str, str], *, level: float = 0.95, seed: int = 0
                     ) -> dict[str, dict[str, Any]]:
    """``{name: {"mean", "ci95", "n"}}``: the mean of ``b − a`` per case for each
    ``name -> field``, with its bootstrap interval. ``a`` and ``b`` score the same cases in the
    same order (two methods, or two settings, on one case list), so the case-to-case spread
    that both share cancels; a case either leaves out is left out of the difference."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same cases: {len(a)} rows against {len(b)}")
    out: dict[str, dict[str, Any]] = {}
    for name, key in fields.items():
        diffs = [float(y[key]) - float(x[key]) for x, y in zip(a, b, strict=True)
                 if x.get(key) is not None and y.get(key) is not None]
        ci = bootstrap_interval(diffs, level=level, seed=seed)
        out[name] = {"mean": sum(diffs) / len(diffs) if diffs else None,
                     "ci95": None if ci is None else [ci[0], ci[1]], "n": len(diffs)}
    return out
