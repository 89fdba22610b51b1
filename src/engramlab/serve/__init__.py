"""The local web workbench: one loaded model behind a JSON API and pages that read it."""

from __future__ import annotations

from .app import make_app
from .workbench import Workbench

__all__ = ["Workbench", "make_app"]
