"""Concepts to erase: probes the model must stop answering, their paraphrases, and controls.

A concept file is JSON::

    {"name": "Harry Potter", "keywords": ["Hogwarts", ...],
     "probes": [{"prompt": "...", "answer": "..."}], "paraphrases": [...],
     "kind": [...],                # optional: probes whose answer names its category
     "controls": [...],            # optional: other concepts' probes serve otherwise
     "near_controls": [...],       # optional: the same kind of fact about neighbours
     "text": "a paragraph about the concept"}  # optional: unlearning / relearning text

A probe counts as answered when the greedy next token is the first token of ``" " + answer``.

The bundled set (``smollm2_concepts``) holds 11 concepts — fictional series, people, places, a
holiday — each with ≥ 16 probes that the embedded SmolLM2-135M-Instruct answers correctly (so
each half of a tuning / evaluation split keeps at least 8). They
were curated by writing cloze and QA prompts by hand and keeping those the model gets right
(``test_bundled_concepts_are_known_by_the_embedded_model`` in ``tests/test_erase.py``
re-checks this); a paraphrase is kept when the model also answers it,
so some concepts (Paris, Japan) have few paraphrases. ``text`` is a short hand-written
encyclopedic paragraph, used by the fine-tuning baselines as forget text and for relearning;
``general_text`` holds neutral paragraphs about none of the concepts, for perplexity.
``near_controls`` (16-22 per concept, also checked) ask the same kind of fact about neighbours —
other fantasy series for Harry Potter, other capitals for Paris, other planets for the Moon —
where collateral damage is likeliest. They were written the same way (about 200 candidates,
the ones the model answers kept). Their even half (:meth:`Concept.near` ``"tune"``) enters the
tuners' budget; the odd half is only reported.

``kind`` holds the probes whose answer names the concept's category rather than a fact of its
own ("Harry Potter is a young → wizard", "The Beatles were a famous rock → band"). They are
reported (``kind_accuracy``) but are not erasure targets: a setting chosen to erase them erases
the category for every member. With "rock → band" among The Beatles' probes, the chosen concept
vectors also took "X are a rock → band" from the other bands among its near controls.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from .._io import read_text
from ..errors import ConceptError

BUNDLED = "smollm2_concepts"
T = TypeVar("T")


@dataclass(frozen=True)
class Probe:
    prompt: str
    answer: str

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Probe:
        if not isinstance(d, dict) or not isinstance(d.get("prompt"), str) \
                or not isinstance(d.get("answer"), str) or not d["answer"].strip():
            raise ConceptError(f"{where}: a probe is an object with a 'prompt' string and a "
                               f"non-empty 'answer' string, got {d!r}")
        return cls(d["prompt"], d["answer"].strip())

    def to_dict(self) -> dict[str, str]:
        return {"prompt": self.prompt, "answer": self.answer}


@dataclass
class Concept:
    name: str
    probes: list[Probe]
    keywords: list[str] = field(default_factory=list)
    paraphrases: list[Probe] = field(default_factory=list)
    controls: list[Probe] = field(default_factory=list)
    text: str = ""
    near_controls: list[Probe] = field(default_factory=list)
    kind: list[Probe] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.probes:
            raise ConceptError(f"concept {self.name!r} has no probes: give at least one "
                               "{'prompt', 'answer'} pair the model answers before erasure")

    def split(self, seed: int = 0, tune_share: float = 0.5) -> tuple[Concept, list[Probe]]:
        """The concept as a tuner may see it and the probes kept for the report.

        A seeded random ``tune_share`` of the probes stays in the returned concept (everything
        else unchanged); the rest are returned apart and no tuner, ranking or threshold may
        see them. The same name and seed always give the same split."""
        n = len(self.probes)
        if n < 2:
            raise ConceptError(f"concept {self.name!r} has {n} probe(s); splitting it into a "
                               "tuning and an evaluation part needs at least 2 (16 or more "
                               "gives each part 8)")
        order = list(range(n))
        random.Random(f"{self.name}\x00{seed}").shuffle(order)
        k = min(n - 1, max(1, round(n * tune_share)))
        tune = [self.probes[i] for i in sorted(order[:k])]
        held = [self.probes[i] for i in sorted(order[k:])]
        return dataclasses.replace(self, probes=tune), held

    def near(self, split: str = "all") -> list[Probe]:
        """Near controls: ``"tune"`` (even positions) is what a tuner may keep inside its
        budget, ``"eval"`` (odd positions) is where near-control accuracy is reported, so the
        reported figure is on facts no setting was chosen on (as with :func:`general_text`)."""
        return _half(self.near_controls, split)

    @property
    def forget_text(self) -> list[str]:
        """Text about the concept for fine-tuning unlearning and relearning.

        The concept's paragraph when it has one; otherwise its probes written out as sentences
        (then the fine-tuning baselines train on the very prompts they are scored on, which
        flatters them — say so when you report it).
        """
        if self.text.strip():
            return [self.text.strip()]
        return [f"{p.prompt} {p.answer}." for p in self.probes]

    @classmethod
    def from_dict(cls, d: Any, where: str = "concept") -> Concept:
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            raise ConceptError(f"{where}: a concept is an object with a 'name' string")
        where = f"{where} {d['name']!r}"
        lists = {}
        for key in ("probes", "paraphrases", "controls", "near_controls", "kind"):
            items = d.get(key) or []
            if not isinstance(items, list):
                raise ConceptError(f"{where}: {key!r} must be a list of probes")
            lists[key] = [Probe.from_dict(p, f"{where} {key}[{i}]") for i, p in enumerate(items)]
        keywords = d.get("keywords") or []
        if not isinstance(keywords, list) or not all(isinstance(k, str) for k in keywords):
            raise ConceptError(f"{where}: 'keywords' must be a list of strings")
        return cls(name=d["name"], keywords=keywords, text=str(d.get("text") or ""), **lists)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "keywords": self.keywords,
                "probes": [p.to_dict() for p in self.probes],
                "paraphrases": [p.to_dict() for p in self.paraphrases],
                "controls": [p.to_dict() for p in self.controls], "text": self.text,
                "near_controls": [p.to_dict() for p in self.near_controls],
                "kind": [p.to_dict() for p in self.kind]}


def _bundled_path(name: str = BUNDLED) -> Path:
    return Path(str(resources.files("engramlab.data") / "bundled" / f"{name}.json"))


def bundled_concepts(name: str = BUNDLED) -> list[Concept]:
    raw = json.loads(_bundled_path(name).read_text())
    return [Concept.from_dict(c, f"bundled concept {i}") for i, c in enumerate(raw["concepts"])]


def general_text(name: str = BUNDLED, split: str = "all") -> list[str]:
    """Neutral paragraphs (about none of the bundled concepts).

    ``split="tune"`` (even paragraphs) is what methods may look at — the fine-tuning baselines'
    retain set, the activation baseline, the tuning grid; ``split="eval"`` (odd paragraphs) is
    where perplexity is reported. Training GA's retain term on the text perplexity is measured
    on would report a perplexity *below* the unedited model's, which says nothing.
    """
    return _half(list(json.loads(_bundled_path(name).read_text())["general_text"]), split)


def _half(items: list[T], split: str) -> list[T]:
    """All items, the even positions (``"tune"``) or the odd ones (``"eval"``)."""
    if split not in ("all", "tune", "eval"):
        raise ConceptError(f"unknown split {split!r}; use 'all', 'tune' or 'eval'")
    return items if split == "all" else items[(split == "eval"):: 2]


def load_concept(path: str | os.PathLike[str]) -> Concept:
    path = Path(path)
    if not path.is_file():
        raise ConceptError(f"concept file {path} does not exist")
    try:
        raw = json.loads(read_text(path, "concept file"))
    except json.JSONDecodeError as exc:
        raise ConceptError(f"concept file {path} is not valid JSON: {exc}") from exc
    return Concept.from_dict(raw, str(path))


def get_concept(name: str) -> Concept:
    """A bundled concept by name (case-insensitive)."""
    concepts = bundled_concepts()
    for c in concepts:
        if c.name.lower() == name.strip().lower():
            return c
    names = ", ".join(c.name for c in concepts)
    raise ConceptError(f"no bundled concept named {name!r}; bundled: {names}. For another "
                       "concept, write a concept file (name, keywords, probes, paraphrases) and "
                       "pass --concept-file")


def controls_for(concept: Concept, others: list[Concept] | None = None) -> list[Probe]:
    """The concept's own controls, or else every other bundled concept's probes."""
    if concept.controls:
        return list(concept.controls)
    return [p for c in _other_concepts(concept, others) for p in c.probes]


def _other_concepts(concept: Concept, others: list[Concept] | None) -> list[Concept]:
    others = bundled_concepts() if others is None else others
    return [c for c in others if c.name.lower() != concept.name.lower()]


def unseen_controls_for(concept: Concept, others: list[Concept] | None = None) -> list[Probe]:
    """Controls no eraser tunes on: the other bundled concepts' paraphrases (the same facts
    reworded). Empty when the concept brings its own controls (they have no paraphrases).

    An eraser tuned to keep the controls within budget is judged on them in-sample; these show
    whether the collateral damage it avoided there is avoided on the same facts asked anew."""
    if concept.controls:
        return []
    return [p for c in _other_concepts(concept, others) for p in c.paraphrases]
