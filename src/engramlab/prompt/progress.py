"""A progress bar on stderr for any prompt optimisation that reports through ``on_step``
(tuning, prefix tuning, PEZ, transfer): one tick per step with its loss, and a line per
validation."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


def step_progress(total: int, desc: str = "prompt tuning"
                  ) -> tuple[Any, Callable[[dict[str, Any]], None]]:
    """``(bar, on_step)``: pass ``on_step`` to the optimisation, close ``bar`` after it."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr)

    def on_step(info: dict[str, Any]) -> None:
        if "loss" in info:
            bar.update(1)
            bar.set_postfix(loss=f"{info['loss']:.3f}")
        else:
            bar.write(f"step {info['step']}: validation accuracy {info['val_accuracy']:.3f}",
                      file=sys.stderr)

    return bar, on_step
