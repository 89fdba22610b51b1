"""Labelled tasks a soft prompt is tuned and scored on: each row a text and one label from a
small set, answered by the label whose token the model ranks highest after the text.

Two tasks are built from real knowledge bases (a ParaRel folder: relation patterns and T-REx
triples), so nothing a model wrote is used as a label:

* ``fact-check``: a relation's sentence with the true T-REx object, or with a distractor (the
  object of another triple of the same relation); labels ``true`` / ``false``, balanced.
* ``relation``: a sentence made from a ParaRel paraphrase of one of eight relations,
  filled with a T-REx triple; the label names the relation. Validation and test sentences
  are worded by paraphrases no training sentence uses.

Any JSONL file of ``{"text", "label"}`` records is a task too. Rows are split by a seeded draw
into train / validation / test; the ParaRel tasks split by subject, so no test subject is seen
in tuning, and a JSONL file by text.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ..data.pararel import pararel_patterns, pararel_triples
from ..data.tasks import jsonl_records
from ..errors import InputError

T = TypeVar("T")
BUILT_IN = ("fact-check", "relation")
# relation -> label word: relations whose names are distinct single words
RELATIONS = {"P19": "birth", "P20": "death", "P36": "capital", "P37": "language",
             "P27": "citizenship", "P30": "continent", "P140": "religion",
             "P176": "manufacturer"}


@dataclass(frozen=True)
class LabelRow:
    text: str
    label: str


@dataclass
class LabelTask:
    """A task's rows in three parts and how a row is shown to the model: ``template`` with the
    row's text in ``{}``, answered by the next token; each label is read as the first token of
    ``" " + label``."""

    name: str
    labels: list[str]
    train: list[LabelRow]
    val: list[LabelRow]
    test: list[LabelRow]
    template: str = "{}\nAnswer:"

    def split(self, name: str) -> list[LabelRow]:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}; use train, val or test")
        return getattr(self, name)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def _split_by(rows: Sequence[T], keys: Sequence[str], seed: int, shares: tuple[float, float],
              caps: tuple[int, int, int]) -> tuple[list[T], ...]:
    """Rows into train / val / test by their keys (a key's rows stay together)."""
    distinct = sorted(set(keys))
    random.Random(f"{seed}/split").shuffle(distinct)
    n_val, n_test = (max(1, round(s * len(distinct))) for s in shares)
    part = {k: 2 for k in distinct[:n_test]}
    part.update({k: 1 for k in distinct[n_test:n_test + n_val]})
    out: tuple[list[T], ...] = ([], [], [])
    order = list(range(len(rows)))
    random.Random(f"{seed}/order").shuffle(order)
    for i in order:
        out[part.get(keys[i], 0)].append(rows[i])
    return tuple(p[:cap] for p, cap in zip(out, caps, strict=True))


def fact_check_task(root: str | Path, *, seed: int = 0,
                    caps: tuple[int, int, int] = (2000, 200, 500)) -> LabelTask:
    """True T-REx sentences against same-relation distractors, split by subject."""
    rng = random.Random(f"{seed}/fact-check")
    rows, keys = [], []
    for rel, patterns in sorted(pararel_patterns(root).items()):
        triples = pararel_triples(root, rel)
        objects = sorted({o for _, o in triples})
        if len(objects) < 2:
            continue
        true_of: dict[str, set[str]] = {}
        for subject, obj in triples:
            true_of.setdefault(subject, set()).add(obj)
        for subject, obj in triples:
            pattern = patterns[0]
            shown, label = obj, "true"
            if rng.random() < 0.5:
                # a distractor that T-REx does not list as true of this subject either
                wrong = [o for o in rng.sample(objects, min(8, len(objects)))
                         if o not in true_of[subject]]
                if not wrong:
                    continue
                shown, label = wrong[0], "false"
            rows.append(LabelRow(pattern.replace("[X]", subject).replace("[Y]", shown), label))
            keys.append(subject)
    train, val, test = _split_by(rows, keys, seed, (0.1, 0.2), caps)
    return LabelTask("fact-check", ["true", "false"], train, val, test,
                     template="{}\nTrue or false? Answer:")


def relation_task(root: str | Path, *, seed: int = 0,
                  caps: tuple[int, int, int] = (2000, 200, 500)) -> LabelTask:
    """Which of eight relations a sentence expresses, split by subject **and** by wording: a
    third of each relation's ParaRel paraphrases are kept for the validation and test rows, so
    a tuned prompt is scored on sentences worded as no training sentence was."""
    rng = random.Random(f"{seed}/relation")
    patterns = pararel_patterns(root)
    triples, keys = [], []
    for rel in RELATIONS:
        if rel not in patterns or len(patterns[rel]) < 3:
            raise InputError(f"{root} lacks relation {rel} (or its paraphrases); the relation "
                             f"task needs {', '.join(RELATIONS)}")
        for subject, obj in pararel_triples(root, rel):
            triples.append((rel, subject, obj))
            keys.append(subject)
    wording = {}
    for rel in RELATIONS:
        shuffled = patterns[rel][:]
        rng.shuffle(shuffled)
        cut = max(1, len(shuffled) // 3)
        wording[rel] = (shuffled[cut:], shuffled[:cut])  # (tuning, held out)
    # every part whole: its wordings are drawn in order, then the part is cut to its cap
    parts = _split_by(triples, keys, seed, (0.1, 0.2), (len(triples),) * 3)
    out = []
    for held, part in enumerate(parts):
        rows = []
        for rel, subject, obj in part:
            pattern = rng.choice(wording[rel][min(held, 1)])
            rows.append(LabelRow(pattern.replace("[X]", subject).replace("[Y]", obj),
                                 RELATIONS[rel]))
        out.append(rows[:caps[held]])
    return LabelTask("relation", list(RELATIONS.values()), *out, template="{}\nRelation:")


def public_facts(root: str | Path, task: LabelTask, n: int, *, seed: int = 0) -> list[str]:
    """``n`` sentences stating T-REx facts, the public set a prompt for ``task`` is transferred
    on (POST's task-related public data, as IMDB is for SST-2 in the paper): each a ParaRel
    paraphrase filled with a true triple, from relations that are not among the relation
    task's labels (for that task) and subjects that occur in none of ``task``'s rows."""
    seen = "\n".join(r.text for r in (*task.train, *task.val, *task.test))
    rng = random.Random(f"{seed}/public-facts")
    out = []
    for rel, patterns in sorted(pararel_patterns(root).items()):
        if task.name == "relation" and rel in RELATIONS:
            continue
        for subject, obj in pararel_triples(root, rel):
            if subject not in seen:
                pattern = rng.choice(patterns)
                out.append(pattern.replace("[X]", subject).replace("[Y]", obj))
    if not out:
        raise InputError(f"{root} holds no fact outside the {task.name} task's rows; give the "
                         "transfer other public text")
    rng.shuffle(out)
    return out[:n]


def jsonl_task(path: str | Path, *, seed: int = 0,
               caps: tuple[int, int, int] = (2000, 200, 500)) -> LabelTask:
    """A JSONL file of ``{"text", "label"}`` records, split by text."""
    path = Path(path)
    rows = []
    for n, record in jsonl_records(path):
        text = record.get("text") if isinstance(record, dict) else None
        label = record.get("label") if isinstance(record, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{path}:{n} has no \"text\" string")
        if not isinstance(label, (str, int)) or isinstance(label, bool) or not str(label).strip():
            raise InputError(f"{path}:{n} has no \"label\"; every record needs a text and a "
                             "label (a string or an integer)")
        rows.append(LabelRow(text.strip(), str(label).strip()))
    labels = sorted({r.label for r in rows})
    if len(labels) < 2:
        raise InputError(f"{path} has {len(labels)} distinct label(s); a task needs at least 2")
    train, val, test = _split_by(rows, [r.text for r in rows], seed, (0.1, 0.2), caps)
    if not train or not val or not test:
        raise InputError(f"{path} has too few rows ({len(rows)}) for train, validation and "
                         "test parts; give at least 10")
    return LabelTask(path.stem, labels, train, val, test)


def load_label_task(spec: str, *, pararel: str | Path | None = None,
                    seed: int = 0) -> LabelTask:
    """``fact-check`` or ``relation`` (built from the ParaRel folder ``pararel``), or a JSONL
    file of ``{"text", "label"}`` records."""
    if spec in BUILT_IN:
        if pararel is None:
            raise InputError(f"task {spec!r} is built from a ParaRel folder; pass --pararel DIR "
                             "(a folder with patterns/ and trex/)")
        root = Path(pararel)
        if not (root / "patterns").is_dir() or not (root / "trex").is_dir():
            raise InputError(f"--pararel {root} is not a ParaRel folder (expected patterns/ "
                             "and trex/)")
        return (fact_check_task if spec == "fact-check" else relation_task)(root, seed=seed)
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"task {spec!r} is neither {' nor '.join(BUILT_IN)} nor a JSONL file "
                         "of {\"text\", \"label\"} records")
    return jsonl_task(path, seed=seed)
