"""Timing helpers shared by the speed benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

import engramlab as eg


def synchronizer(lm: eg.LM) -> Callable[[], None]:
    """Waits for the device's queued work (GPU kernels run asynchronously; CPU needs nothing)."""
    return torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)


@torch.no_grad()
def forward_seconds(lm: eg.LM, batches: Sequence[torch.Tensor]) -> float:
    """Seconds for plain no-grad forwards of the whole model over ``batches``, after one
    warm-up forward of the first batch."""
    sync = synchronizer(lm)
    lm.model(input_ids=batches[0].to(lm.device))
    sync()
    t = time.perf_counter()
    for rows in batches:
        lm.model(input_ids=rows.to(lm.device))
    sync()
    return time.perf_counter() - t
