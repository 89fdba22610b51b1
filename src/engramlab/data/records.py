"""Edit requests and evaluation cases.

Targets are stored without their leading space (CounterFact's convention); wherever a target
follows a prompt, the model sees ``" " + target``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import RequestError


def _where(case_id: Any) -> str:
    return f" (case {case_id})" if case_id is not None else ""


@dataclass(frozen=True)
class EditRequest:
    """Rewrite "``prompt.format(subject)`` → ``target_new``" (replacing ``target_true``)."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: str | int | None = None
    relation_id: str | None = None

    def __post_init__(self) -> None:
        where = _where(self.case_id)
        if self.prompt.count("{}") != 1:
            raise RequestError(
                f"prompt {self.prompt!r} must contain the subject placeholder '{{}}' exactly once"
                f"{where}; write e.g. '{{}} is located in', or build the request with "
                "EditRequest.from_text(full_prompt, subject)")
        if not self.subject.strip():
            raise RequestError(f"empty subject{where}")
        if not self.target_new.strip():
            raise RequestError(f"empty target_new for subject {self.subject!r}{where}")
        if self.target_true is not None and not self.target_true.strip():
            raise RequestError(f"empty target_true for subject {self.subject!r}{where}; "
                               "leave it out (None) when unknown")

    @classmethod
    def from_text(cls, text: str, subject: str, target_new: str, **kw: Any) -> EditRequest:
        """From a full prompt that contains ``subject`` (its first occurrence becomes ``{}``)."""
        template, subject = as_template(text, subject, kw.get("case_id"))
        return cls(prompt=template, subject=subject, target_new=target_new, **kw)

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def as_template(text: str, subject: str, case_id: object = None) -> tuple[str, str]:
    """``text`` with the first occurrence of ``subject`` (any case) replaced by ``{}``, and the
    subject as written there."""
    at = text.find(subject)
    if at < 0:
        at = text.lower().find(subject.lower())
        if at < 0:
            raise RequestError(
                f"subject {subject!r} not found in prompt {text!r}{_where(case_id)}"
                " — check the spelling, or write the prompt as a template with '{}'")
    return text[:at] + "{}" + text[at + len(subject):], text[at:at + len(subject)]


@dataclass(frozen=True)
class Fact:
    """A prompt whose next token recalls something about ``subject`` (``prompt`` holds ``{}``
    where the subject goes), and the expected answer when known: what causal tracing reads."""

    prompt: str
    subject: str
    answer: str | None = None
    fact_id: str | int | None = None

    def __post_init__(self) -> None:
        if self.prompt.count("{}") != 1:
            raise RequestError(f"prompt {self.prompt!r} must contain '{{}}' exactly once"
                               f"{_where(self.fact_id)}")
        if not self.subject.strip():
            raise RequestError(f"empty subject{_where(self.fact_id)}")

    @classmethod
    def from_text(cls, text: str, subject: str, answer: str | None = None,
                  fact_id: str | int | None = None) -> Fact:
        template, subject = as_template(text, subject, fact_id)
        return cls(template, subject, answer, fact_id)

    @property
    def text(self) -> str:
        return self.prompt.replace("{}", self.subject)


@dataclass(frozen=True)
class EditCase:
    """A request plus the prompts that measure it (CounterFact's structure).

    ``neighborhood_prompts`` are about other subjects whose answer must stay ``target_true``
    (or the matching entry of ``neighborhood_answers`` when given, as in zsRE).
    ``relation_prompts`` are about the same subject under other relations ("The Eiffel Tower
    was designed by"); each must keep its ``relation_answers`` entry, what the unedited model
    says there (:func:`engramlab.evaluate.fill_relation_answers` fills in missing ones).
    """

    request: EditRequest
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    neighborhood_answers: tuple[str, ...] | None = None
    generation_prompts: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    relation_prompts: tuple[str, ...] = ()
    relation_answers: tuple[str | None, ...] | None = None

    def __post_init__(self) -> None:
        if self.neighborhood_answers is not None and len(self.neighborhood_answers) != len(
                self.neighborhood_prompts):
            raise RequestError(f"{len(self.neighborhood_prompts)} neighbourhood prompts but "
                               f"{len(self.neighborhood_answers)} answers"
                               f"{_where(self.request.case_id)}")
        if self.relation_answers is not None and len(self.relation_answers) != len(
                self.relation_prompts):
            raise RequestError(f"{len(self.relation_prompts)} relation prompts but "
                               f"{len(self.relation_answers)} answers"
                               f"{_where(self.request.case_id)}")

    @property
    def case_id(self) -> str | int | None:
        return self.request.case_id

    def neighborhood_targets(self) -> list[str]:
        if self.neighborhood_answers is not None:
            return list(self.neighborhood_answers)
        if self.request.target_true is None:
            raise RequestError(f"neighbourhood prompts need target_true or explicit answers"
                               f"{_where(self.case_id)}")
        return [self.request.target_true] * len(self.neighborhood_prompts)

    def relation_targets(self) -> list[str | None]:
        """One answer per relation prompt; None where none is known yet."""
        return list(self.relation_answers or (None,) * len(self.relation_prompts))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self.request.to_dict(),
                               "paraphrase_prompts": list(self.paraphrase_prompts),
                               "neighborhood_prompts": list(self.neighborhood_prompts),
                               "generation_prompts": list(self.generation_prompts)}
        if self.neighborhood_answers is not None:
            out["neighborhood_answers"] = list(self.neighborhood_answers)
        if self.relation_prompts:
            out["relation_prompts"] = [{"prompt": p, "answer": a} for p, a in
                                       zip(self.relation_prompts, self.relation_targets(),
                                           strict=True)]
        if self.extra:
            out["extra"] = self.extra
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EditCase:
        req_keys = {"prompt", "subject", "target_new", "target_true", "case_id", "relation_id"}
        missing = {"prompt", "subject", "target_new"} - d.keys()
        if missing:
            raise RequestError(f"record is missing {sorted(missing)}: {str(d)[:120]}")
        answers = d.get("neighborhood_answers")
        prompts, rel_answers = relation_prompts_from(d.get("relation_prompts"), d.get("case_id"))
        return cls(
            request=EditRequest(**{k: d[k] for k in req_keys if k in d}),
            paraphrase_prompts=tuple(d.get("paraphrase_prompts", ())),
            neighborhood_prompts=tuple(d.get("neighborhood_prompts", ())),
            neighborhood_answers=tuple(answers) if answers is not None else None,
            generation_prompts=tuple(d.get("generation_prompts", ())),
            extra=dict(d.get("extra", {})),
            relation_prompts=prompts,
            relation_answers=rel_answers,
        )


def relation_prompts_from(items: Any, case_id: Any = None
                          ) -> tuple[tuple[str, ...], tuple[str | None, ...] | None]:
    """``[{"prompt": ..., "answer": ...}, ...]`` (answer optional) as prompts and answers;
    anything else is refused with the case it came from."""
    if items is None:
        return (), None
    if not isinstance(items, list) or not all(
            isinstance(x, dict) and isinstance(x.get("prompt"), str) and x["prompt"].strip()
            and isinstance(x.get("answer", ""), str | None) for x in items):
        raise RequestError("relation_prompts must be a list of {\"prompt\": text, \"answer\": "
                           f"text or null}}{_where(case_id)}")
    prompts = tuple(x["prompt"] for x in items)
    answers = tuple(x.get("answer") for x in items)
    return prompts, (answers if any(a is not None for a in answers) else None)
