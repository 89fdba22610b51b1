"""engramlab: read, write and erase knowledge inside the parameters of transformer LMs."""

from __future__ import annotations

__version__ = "0.1.0"

from ._io import cache_root
from .data import EditCase, EditRequest
from .delta import ParamDelta, WeightDelta
from .errors import EngramError
from .models import LM, Layout, load_model
from .trace import Trace, record

__all__ = [
    "LM",
    "EditCase",
    "EditRequest",
    "EngramError",
    "Layout",
    "ParamDelta",
    "Trace",
    "WeightDelta",
    "__version__",
    "cache_root",
    "load_model",
    "record",
]
