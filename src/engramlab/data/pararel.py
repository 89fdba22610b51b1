"""Counterfactual edit cases generated from ParaRel patterns × T-REx triples.

ParaRel (Elazar et al. 2021, "Measuring and Improving Consistency in Pretrained Language
Models") gives several human-written paraphrase patterns per Wikidata relation; T-REx (via LAMA)
gives subject–object triples. A case takes one triple, rewrites its object to another object of
the same relation (seeded choice), uses the first usable pattern as the edit prompt and the other
patterns as *real* paraphrases, and other subjects with the same true object as neighbourhood
prompts. The same subject under up to ``relation_prompts`` other relations it has in T-REx
gives the relation prompts (answers left to the unedited model, as the relation-specificity
metric asks). This gives thousands of CounterFact-shaped cases for long sequential runs (the
AlphaEdit paper's 2,000–3,000 edit setting) without the CounterFact files.

Only patterns that end with the object (``[Y]``, optionally followed by a full stop) can be
used as prompts for next-token scoring; the others are skipped.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterable
from pathlib import Path

from .records import EditCase, EditRequest

_END = re.compile(r"\s*\[Y\]\s*\.?\s*$")


def _prompt(pattern: str) -> str | None:
    if "[X]" not in pattern or pattern.count("[Y]") != 1 or not _END.search(pattern):
        return None
    return _END.sub("", pattern).replace("[X]", "{}").strip()


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pararel_cases(root: str | os.PathLike[str], n: int, *, seed: int = 0,
                  relations: list[str] | None = None, neighbours: int = 2,
                  relation_prompts: int = 3) -> list[EditCase]:
    """``n`` generated cases, relations interleaved, reproducible for a given ``seed``."""
    root = Path(root)
    pattern_dir, trex_dir = root / "patterns", root / "trex"
    if not pattern_dir.is_dir() or not trex_dir.is_dir():
        raise FileNotFoundError(f"{root} is not a ParaRel folder (expected patterns/ and trex/)")
    rng = random.Random(seed)
    # a stream of its own: which cases are drawn does not depend on the relation prompts
    pick = random.Random(f"{seed}/relations")
    pools = []
    first_prompt: dict[str, str] = {}  # every relation's edit prompt, for relation prompts
    subject_relations: dict[str, list[str]] = {}
    for path in sorted(pattern_dir.glob("P*.jsonl")):
        rel = path.stem
        prompts = list(dict.fromkeys(p for p in (_prompt(d["pattern"]) for d in _read_jsonl(path))
                                     if p and p.count("{}") == 1))
        trex = trex_dir / f"{rel}.jsonl"
        if not prompts or not trex.is_file():
            continue
        triples = [(d["sub_label"], d["obj_label"]) for d in _read_jsonl(trex)]
        first_prompt[rel] = prompts[0]
        for subject in dict.fromkeys(sub for sub, _ in triples):
            subject_relations.setdefault(subject, []).append(rel)
        if (relations and rel not in relations) or len(prompts) < 2:
            continue
        objects = sorted({o for _, o in triples})
        if len(objects) < 2:
            continue
        by_object: dict[str, list[str]] = {}
        for s, o in triples:
            by_object.setdefault(o, []).append(s)
        order = list(range(len(triples)))
        rng.shuffle(order)
        pools.append((rel, prompts, triples, objects, by_object, order))
    if not pools:
        raise FileNotFoundError(f"no usable ParaRel relations under {root}")
    cases: list[EditCase] = []
    cursor = [0] * len(pools)
    while len(cases) < n and any(c < len(p[5]) for c, p in zip(cursor, pools, strict=True)):
        for i, (rel, prompts, triples, objects, by_object, order) in enumerate(pools):
            if len(cases) >= n or cursor[i] >= len(order):
                continue
            subject, true = triples[order[cursor[i]]]
            cursor[i] += 1
            new = rng.choice([o for o in objects if o != true])
            others = [s for s in by_object[true] if s != subject and s not in subject
                      and subject not in s]
            picked = rng.sample(others, min(neighbours, len(others)))
            other_rels = [r for r in subject_relations[subject] if r != rel]
            asked = pick.sample(other_rels, min(relation_prompts, len(other_rels)))
            cases.append(EditCase(
                request=EditRequest(prompt=prompts[0], subject=subject, target_new=new,
                                    target_true=true, case_id=f"{rel}-{cursor[i]}",
                                    relation_id=rel),
                paraphrase_prompts=tuple(p.replace("{}", subject) for p in prompts[1:4]),
                neighborhood_prompts=tuple(prompts[0].replace("{}", s) for s in picked),
                generation_prompts=(),
                relation_prompts=tuple(first_prompt[r].replace("{}", subject) for r in asked)))
    return cases


def pararel_qa(root: str | os.PathLike[str], *, exclude_subjects: Iterable[str] = (),
               seed: int = 0) -> list[tuple[str, str, str, str]]:
    """Every T-REx triple as a cloze question: ``(relation, subject, prompt, object)``, the
    relation's first usable ParaRel pattern filled with the subject, in a seeded order.
    Triples of ``exclude_subjects`` (e.g. the subjects being edited) are left out, and so are
    questions with more than one answer in T-REx (twin cities, shared borders): a single
    greedy answer cannot be right for all of them."""
    root = Path(root)
    pattern_dir, trex_dir = root / "patterns", root / "trex"
    if not pattern_dir.is_dir() or not trex_dir.is_dir():
        raise FileNotFoundError(f"{root} is not a ParaRel folder (expected patterns/ and trex/)")
    skip = set(exclude_subjects)
    rows = []
    for path in sorted(pattern_dir.glob("P*.jsonl")):
        prompts = [p for p in (_prompt(d["pattern"]) for d in _read_jsonl(path))
                   if p and p.count("{}") == 1]
        trex = trex_dir / f"{path.stem}.jsonl"
        if not prompts or not trex.is_file():
            continue
        rows += [(path.stem, d["sub_label"], prompts[0].replace("{}", d["sub_label"]),
                  d["obj_label"]) for d in _read_jsonl(trex) if d["sub_label"] not in skip]
    answers: dict[str, set[str]] = {}
    for _, _, prompt, obj in rows:
        answers.setdefault(prompt, set()).add(obj)
    rows = [r for r in dict.fromkeys(rows) if len(answers[r[2]]) == 1]
    random.Random(seed).shuffle(rows)
    return rows


def pararel_patterns(root: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Each relation's paraphrases as whole sentences with ``[X]`` and ``[Y]`` (one of each),
    the spacing before a final full stop removed."""
    pattern_dir = Path(root) / "patterns"
    out = {}
    for path in sorted(pattern_dir.glob("P*.jsonl")):
        sentences = []
        for d in _read_jsonl(path):
            p = d["pattern"]
            if p.count("[X]") == 1 and p.count("[Y]") == 1:
                sentences.append(re.sub(r"\s+\.$", ".", p.strip()))
        if sentences:
            out[path.stem] = list(dict.fromkeys(sentences))
    return out


def pararel_triples(root: str | os.PathLike[str], relation: str) -> list[tuple[str, str]]:
    """The relation's T-REx ``(subject, object)`` pairs, in file order, without repeats."""
    path = Path(root) / "trex" / f"{relation}.jsonl"
    if not path.is_file():
        return []
    return list(dict.fromkeys((d["sub_label"], d["obj_label"]) for d in _read_jsonl(path)))
