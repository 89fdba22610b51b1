"""Fact sets shipped with the package (see ``scripts/build_facts.py`` for how they were made)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .loaders import load_cases
from .records import EditCase


def bundled_facts_path(name: str = "smollm2_facts") -> Path:
    path = Path(str(resources.files("engramlab.data") / "bundled" / f"{name}.json"))
    if not path.is_file():
        raise FileNotFoundError(f"no bundled fact set {name!r} (looked for {path})")
    return path


def bundled_cases(name: str = "smollm2_facts") -> list[EditCase]:
    """CounterFact-format cases the embedded SmolLM2-135M answers correctly before editing."""
    return load_cases(bundled_facts_path(name))
