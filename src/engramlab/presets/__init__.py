"""Hyper-parameter presets per model family, as YAML files beside this module.

Each file has a ``match`` block (``model_type``, ``n_layers``, ``d_model``) compared with the
loaded model's config, so a preset applies whether the model came from the hub, a folder or a
GGUF file, and one section per method; ``like: METHOD`` starts a section from another
method's (DeltaEdit is AlphaEdit plus its band). Models without a preset get ``default.yaml``,
whose layers are placed at the same relative depth as GPT-2 XL's (ROME's layer 17 of 48).
"""

from __future__ import annotations

import copy
import functools
from importlib import resources
from typing import Any

import yaml

from ..errors import RequestError
from ..models.lm import LM


def _load(name: str) -> dict[str, Any]:
    """A preset file's content; a copy, so a caller's changes never reach the parsed one."""
    return copy.deepcopy(_parsed(name))


@functools.cache
def _parsed(name: str) -> dict[str, Any]:
    """Parsed once per process: an editor resolves its preset on every edit, and parsing the
    six files took ~27 ms of a ~0.9 s ROME edit."""
    text = resources.files(__package__).joinpath(f"{name}.yaml").read_text()
    return yaml.safe_load(text)


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__package__).iterdir()
                  if p.name.endswith(".yaml"))


def match_preset(lm: LM) -> str:
    """Name of the preset whose ``match`` block fits ``lm`` (``default`` if none)."""
    facts = {"model_type": lm.layout.model_type, "n_layers": lm.n_layers, "d_model": lm.d_model}
    for name in preset_names():
        match = _parsed(name).get("match")
        if match and all(facts.get(k) == v for k, v in match.items()):
            return name
    return "default"


def load_preset(lm: LM, method: str, name: str | None = None) -> Any:
    """The :class:`~engramlab.edit.base.EditHParams` of ``method`` for ``lm``."""
    from ..edit.base import EditHParams

    name = name or match_preset(lm)
    if name not in preset_names():
        raise RequestError(f"unknown preset {name!r}; available: {preset_names()}")
    doc = _load(name)
    section = doc.get(method)
    if section is None:
        raise RequestError(f"preset {name!r} has no section for method {method!r}")
    section = dict(section)
    like = section.pop("like", None)  # a method's section written as another's plus changes
    if like is not None:
        if like not in doc or "like" in doc[like]:
            raise RequestError(f"preset {name!r}: {method} is written like {like!r}, which "
                               "is missing or itself written like another")
        base = doc[like]
        # nested groups (target, stats, band) merge field by field, as --set does
        section = {**base, **{k: {**base[k], **v} if isinstance(v, dict)
                              and isinstance(base.get(k), dict) else v
                              for k, v in section.items()}}
    if "layers_relative" in section:  # default preset: fractions of the depth
        rel = section.pop("layers_relative")
        section["layers"] = sorted({min(lm.n_layers - 1, round(f * lm.n_layers)) for f in rel})
    section.pop("source", None)
    return EditHParams().replace(**section)
