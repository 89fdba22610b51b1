"""Ray, when asked for: connecting to a cluster (or starting a local one) and polling tasks.

Ray is imported only where ``--ray`` (``ray=``) asks for it (here, and the statistics'
progress queue): without it the same work runs in this process or in local worker processes,
so Ray is an optional extra (``pip install 'engramlab[ray]'``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import SettingsError

RAY_HINT = "pip install 'engramlab[ray]'"


def require_ray() -> Any:
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise SettingsError(f"--ray needs Ray, which is not installed: {RAY_HINT}") from None
    return ray


@contextlib.contextmanager
def connected(address: str | None = None, *, num_cpus: int | None = None) -> Iterator[Any]:
    """Ray, connected for the duration of the block.

    ``address`` None or ``"local"`` starts a private local cluster (``num_cpus`` CPUs, default
    all) and stops it on exit; ``"auto"`` or ``"HOST:PORT"`` joins a running cluster and leaves
    it running. A Ray already initialised by the caller is used as it is.
    """
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    settings: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                "logging_level": logging.WARNING}
    try:
        if address in (None, "local"):
            ray.init(num_cpus=num_cpus, **settings)
        else:
            ray.init(address=address, **settings)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = "a local Ray cluster" if address in (None, "local") else f"Ray at {address}"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SettingsError(f"could not start or reach {where} ({reason}); check the address "
                            "(`ray status` on the head node) or run without --ray") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def drain(refs: list[Any], on_done: Callable[[Any, Any], None], *, poll: float = 0.5,
          tick: Callable[[], None] | None = None) -> None:
    """Wait for every task in ``refs``, calling ``on_done(ref, result)`` as each finishes (in
    finishing order) and ``tick()`` between polls, e.g. to move a progress bar. A task that
    raised re-raises here."""
    ray = require_ray()
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=poll)
        for ref in done:
            on_done(ref, ray.get(ref))
        if tick is not None:
            tick()
