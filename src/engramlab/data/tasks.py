"""Prompt-completion tasks: the data a fine-tune learns a skill from, and the downstream score.

A task row is trained on its completion only (the prompt's tokens carry no loss, as in
instruction tuning) and scored, like a probe, by whether the model's greedy next token after the
prompt starts the completion. Rows come from a JSONL file of ``{"prompt", "completion"}``
records the user points at, or from T-REx: every triple of a ParaRel folder as a cloze question
(:func:`~.pararel.pararel_qa`), real facts rather than labels a model wrote. Either way the rows
are split by a seeded draw into a training part and a test part, and a question's subject never
falls on both sides, so the downstream score is on facts the fine-tune did not see.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from .pararel import pararel_qa


@dataclass(frozen=True)
class TaskRow:
    prompt: str
    completion: str


@dataclass
class Task:
    name: str
    train: list[TaskRow]
    test: list[TaskRow]


def is_task(spec: str | Path) -> bool:
    """Whether ``spec`` names task data: a ParaRel folder, or a JSONL file whose first record
    has a prompt and a completion (a JSONL of ``text`` records is a text corpus)."""
    path = Path(spec)
    if path.is_dir():
        return (path / "patterns").is_dir() and (path / "trex").is_dir()
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    try:
        with path.open(encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        record = json.loads(first) if first else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(record, dict) and "prompt" in record and "completion" in record


def jsonl_records(path: str | Path) -> list[tuple[int, Any]]:
    """``(line number, parsed record)`` of each non-empty line of a UTF-8 JSONL file, with a
    one-line error naming the file (and line) that cannot be read."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError:
            raise InputError(f"{path}:{n} is not a JSON record") from None
    return out


def task_rows(path: str | Path) -> list[TaskRow]:
    """The usable ``{"prompt", "completion"}`` records of a JSONL file (both non-empty)."""
    path = Path(path)
    rows = []
    for _, record in jsonl_records(path):
        if not isinstance(record, dict):
            continue
        prompt, completion = record.get("prompt"), record.get("completion")
        if isinstance(prompt, str) and isinstance(completion, str) and prompt.strip() \
                and completion.strip():
            rows.append(TaskRow(prompt.rstrip(), completion.strip()))
    if not rows:
        raise InputError(f"{path} has no usable rows: each line needs a JSON object with "
                        "non-empty \"prompt\" and \"completion\" strings")
    return rows


def load_task(spec: str | Path, *, exclude_subjects: Iterable[str] = (), test_share: float = 0.2,
              max_test: int | None = 500, seed: int = 0) -> Task:
    """The task ``spec`` names (see :func:`is_task`), split into train and test.

    ParaRel rows are split by subject; a JSONL file's rows by prompt. ``exclude_subjects``
    (ParaRel only) leaves out the facts being edited; ``max_test`` caps the test part so that
    scoring it stays quick (the first rows of the seeded order)."""
    if not 0 < test_share < 1:
        raise ValueError(f"test_share must lie in (0, 1), got {test_share}")
    path = Path(spec)
    if path.is_dir():
        triples = pararel_qa(path, exclude_subjects=exclude_subjects, seed=seed)
        rows = [TaskRow(prompt, obj) for _, _, prompt, obj in triples]
        keys = [subject for _, subject, _, _ in triples]
    else:
        rows = task_rows(path)
        keys = [r.prompt for r in rows]
    test_keys = _held_out(keys, test_share, seed)
    train = [r for r, k in zip(rows, keys, strict=True) if k not in test_keys]
    test = [r for r, k in zip(rows, keys, strict=True) if k in test_keys]
    if max_test is not None:
        test = test[:max_test]
    if not train or not test:
        raise InputError(f"{spec} has too few rows to hold {test_share:.0%} out for testing")
    return Task(name=path.name, train=train, test=test)


def _held_out(keys: Sequence[str], share: float, seed: int) -> set[str]:
    distinct = sorted(set(keys))
    random.Random(f"{seed}/test").shuffle(distinct)
    return set(distinct[:max(1, round(share * len(distinct)))])
