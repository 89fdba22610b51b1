"""One way to draw a figure to a PNG file: the headless backend, the layout, the file written
whole or not at all, and the figure closed, whichever panels the caller draws in between."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ._io import atomic_file
from .errors import EngramError


@contextmanager
def figure(out: str | Path, *, ncols: int = 1,
           figsize: tuple[float, float] = (5.5, 4)) -> Iterator[tuple[Any, Any]]:
    """``with figure(out, ncols=2) as (fig, axes): ...`` draws into ``axes`` (one Axes, or a
    row of ``ncols``) and writes ``out`` when the block ends without an error."""
    try:
        import matplotlib
    except ImportError:  # an optional dependency: say how to get it
        raise EngramError("figures need matplotlib: pip install 'engramlab[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize)
    try:
        yield fig, axes
        fig.tight_layout()
        with atomic_file(out) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
