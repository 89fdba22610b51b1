"""Readers for the edit data formats the field uses, detected from the records themselves.

* CounterFact (ROME release): ``case_id, requested_rewrite{prompt, subject, target_new{str},
  target_true{str}}, paraphrase_prompts, neighborhood_prompts, generation_prompts``, and our
  optional ``relation_prompts`` (``[{"prompt", "answer"}]``: the same subject, other relations)
* flat CounterFact (EasyEdit): ``prompt, subject, target_new, ground_truth, rephrase_prompt,
  locality_prompt, locality_ground_truth`` — the prompt holds the subject in full
* zsRE (MEND/EasyEdit): ``src, subject, alt, answers, rephrase, loc, loc_ans``
* our own JSON/JSONL records (:meth:`EditCase.to_dict`)

Facts to trace (:func:`load_facts`) come from any of these (the prompt and ``target_true``) or
from ROME's ``known_1000.json`` (``prompt, subject, attribute``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .._io import atomic_file, read_text
from ..errors import RequestError
from .records import EditCase, EditRequest, Fact, relation_prompts_from


def _counterfact(d: dict[str, Any]) -> EditCase:
    rw = d["requested_rewrite"]
    req = EditRequest(prompt=rw["prompt"], subject=rw["subject"],
                      target_new=rw["target_new"]["str"],
                      target_true=rw.get("target_true", {}).get("str"),
                      case_id=d.get("case_id"), relation_id=rw.get("relation_id"))
    prompts, answers = relation_prompts_from(d.get("relation_prompts"), d.get("case_id"))
    return EditCase(req, tuple(d.get("paraphrase_prompts", ())),
                    tuple(d.get("neighborhood_prompts", ())),
                    generation_prompts=tuple(d.get("generation_prompts", ())),
                    relation_prompts=prompts, relation_answers=answers)


def _flat_counterfact(d: dict[str, Any]) -> EditCase:
    req = EditRequest.from_text(d["prompt"], d["subject"], d["target_new"],
                                target_true=d.get("ground_truth"), case_id=d.get("case_id"))
    loc = d.get("locality_prompt")
    loc_ans = d.get("locality_ground_truth")
    return EditCase(
        req,
        paraphrase_prompts=(d["rephrase_prompt"],) if d.get("rephrase_prompt") else (),
        neighborhood_prompts=(loc,) if loc else (),
        neighborhood_answers=(loc_ans,) if loc and loc_ans else None,
    )


def _zsre(d: dict[str, Any]) -> EditCase:
    answers = d.get("answers") or []
    req = EditRequest.from_text(d["src"], d["subject"], d["alt"],
                                target_true=answers[0] if answers else None,
                                case_id=d.get("case_id"))
    loc, loc_ans = d.get("loc"), d.get("loc_ans")
    return EditCase(req, paraphrase_prompts=(d["rephrase"],) if d.get("rephrase") else (),
                    neighborhood_prompts=(loc,) if loc else (),
                    neighborhood_answers=(loc_ans,) if loc and loc_ans else None)


def detect_format(record: dict[str, Any]) -> str:
    if "requested_rewrite" in record:
        return "counterfact"
    if "src" in record and "alt" in record:
        return "zsre"
    if "ground_truth" in record or "rephrase_prompt" in record:
        return "counterfact-flat"
    if {"prompt", "subject", "target_new"} <= record.keys():
        return "engramlab"
    raise RequestError(
        "unrecognised record format (keys: " + ", ".join(sorted(record)) + "); expected "
        "CounterFact (requested_rewrite), flat CounterFact (prompt, subject, target_new, "
        "ground_truth), zsRE (src, subject, alt, answers) or engramlab records")


_PARSERS = {"counterfact": _counterfact, "counterfact-flat": _flat_counterfact, "zsre": _zsre,
            "engramlab": EditCase.from_dict}


def _read_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"facts file {path} does not exist")
    text = read_text(path, "facts file")
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError as exc:
                    raise RequestError(f"{path}:{n}: invalid JSON ({exc})") from exc
        return out
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise RequestError(f"{path}: invalid JSON ({exc})") from exc
    if isinstance(data, dict):
        data = data.get("cases") or data.get("data") or [data]
    return list(data)


def parse_cases(records: Iterable[dict[str, Any]], *, fmt: str | None = None,
                source: str = "records") -> list[EditCase]:
    cases = []
    for n, record in enumerate(records):
        kind = fmt or detect_format(record)
        try:
            cases.append(_PARSERS[kind](record))
        except KeyError as exc:
            raise RequestError(f"{source}: record {n} ({kind} format) lacks field {exc}") from exc
    return cases


def load_cases(path: str | os.PathLike[str], *, limit: int | None = None,
               fmt: str | None = None) -> list[EditCase]:
    """Read edit cases from any supported JSON/JSONL format (auto-detected per record)."""
    path = Path(path)
    records = _read_records(path)
    if limit is not None:
        records = records[:limit]
    return parse_cases(records, fmt=fmt, source=str(path))


def load_requests(path: str | os.PathLike[str], *, limit: int | None = None) -> list[EditRequest]:
    return [c.request for c in load_cases(path, limit=limit)]


def save_cases(cases: Iterable[EditCase], path: str | os.PathLike[str]) -> Path:
    """JSONL of our own records, written atomically."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text("".join(json.dumps(c.to_dict()) + "\n" for c in cases))
    return path


def load_facts(path: str | os.PathLike[str], *, limit: int | None = None) -> list[Fact]:
    """Facts to trace: ROME's known_1000 records, or the requests of any edit-case format."""
    path = Path(path)
    records = _read_records(path)[:limit]
    out = []
    for n, record in enumerate(records):
        if "attribute" in record and "requested_rewrite" not in record:
            try:
                out.append(Fact.from_text(record["prompt"], record["subject"],
                                          record["attribute"], record.get("known_id", n)))
            except KeyError as exc:
                raise RequestError(f"{path}: record {n} (known facts) lacks field {exc}") from exc
        else:
            req = parse_cases([record], source=str(path))[0].request
            out.append(Fact(req.prompt, req.subject, req.target_true, req.case_id))
    return out
