"""Editors that write facts into the weights; each returns a :class:`~engramlab.WeightDelta`."""

from __future__ import annotations

from .alphaedit import AlphaEdit
from .base import EditHParams, Editor
from .memit import MEMIT
from .rome import ROME
from .solve import EditState

METHODS: dict[str, type[Editor]] = {"rome": ROME, "memit": MEMIT, "alphaedit": AlphaEdit}


def get_editor(method: str, **kwargs: object) -> Editor:
    """An editor by name (``rome``, ``memit``, ``alphaedit``)."""
    from ..errors import RequestError

    key = method.lower()
    if key not in METHODS:
        raise RequestError(f"unknown editing method {method!r}; choose one of {sorted(METHODS)}")
    return METHODS[key](**kwargs)  # type: ignore[arg-type]


__all__ = [
    "MEMIT",
    "METHODS",
    "ROME",
    "AlphaEdit",
    "EditHParams",
    "EditState",
    "Editor",
    "get_editor",
]
