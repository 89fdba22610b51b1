"""Editors that write facts into the weights; each returns a :class:`~engramlab.WeightDelta`."""

from __future__ import annotations

from .alphaedit import AlphaEdit
from .base import EditHParams, Editor
from .deltaedit import DeltaEdit
from .demo import demo_edit
from .memit import MEMIT
from .protocols import PROTOCOLS, RunResult, run_protocol
from .rome import ROME
from .solve import EditState

METHODS: dict[str, type[Editor]] = {"rome": ROME, "memit": MEMIT, "alphaedit": AlphaEdit,
                                    "deltaedit": DeltaEdit}


def get_editor(method: str, **kwargs: object) -> Editor:
    """An editor by name (``rome``, ``memit``, ``alphaedit``, ``deltaedit``)."""
    from ..errors import RequestError

    key = method.lower()
    if key not in METHODS:
        raise RequestError(f"unknown editing method {method!r}; choose one of {sorted(METHODS)}")
    return METHODS[key](**kwargs)  # type: ignore[arg-type]


__all__ = [
    "MEMIT",
    "METHODS",
    "PROTOCOLS",
    "ROME",
    "AlphaEdit",
    "DeltaEdit",
    "EditHParams",
    "EditState",
    "Editor",
    "RunResult",
    "demo_edit",
    "get_editor",
    "run_protocol",
]
