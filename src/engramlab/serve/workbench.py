"""The workbench behind ``engram serve``: one loaded model, its lenses, the edits of the session
and the jobs that run on it, independent of any web framework (:mod:`.app` serves it).

The model is loaded once and every use of it holds one lock, so two browser tabs are served
one after the other and never see each other's work half done. Edits never stay in the model:
each is kept as a delta and applied, under the lock, only for the request that asks for it,
then reverted. Input that cannot work raises :class:`~engramlab.errors.EngramError` with what
to change, before any work starts.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.records import EditCase, EditRequest
from ..delta import WeightDelta
from ..errors import EngramError
from ..evaluate.counterfact import HEADLINE
from ..lens import Lens, LogitLens, layer_view
from ..models.lm import LM
from .jobs import Job, Jobs

log = logging.getLogger(__name__)
MAX_K = 20
MAX_PROMPTS = 20  # paraphrases or neighbours per edit
GENERATE_TOKENS = 12
SAVED = "workbench.json"  # beside a saved delta: the request and scores the page shows


@dataclass
class Kept:
    """An edit made in this session: its delta and what it was asked and scored."""

    id: str
    method: str
    delta: WeightDelta
    request: dict[str, Any]
    scores: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "method": self.method, "request": self.request,
                "scores": self.scores}


class Workbench:
    """The model, its lenses and the lock every use of the model holds."""

    def __init__(self, lm: LM, lenses: Mapping[str, Lens] | None = None, *,
                 out: str | Path | None = None, atlas: Any = None) -> None:
        self.lm = lm
        self.atlas = atlas
        self.lenses: dict[str, Lens] = {"logit": LogitLens(lm), **(lenses or {})}
        self.lock = threading.Lock()
        self.jobs = Jobs()
        self.deltas: dict[str, Kept] = {}
        self.out = Path(out) if out is not None else None

    def info(self) -> dict[str, Any]:
        return {"model": self.lm.label, "n_layers": self.lm.n_layers,
                "lenses": list(self.lenses), "atlas": self.atlas is not None}

    def atlas_summary(self) -> dict[str, Any]:
        book = self._atlas()
        return {"model": book.index["model"], "layers": book.layers,
                "neurons": {str(layer): int(book.arrays[f"L{layer}.top_act"].shape[1])
                            for layer in book.layers},
                "lines": book.lines()}

    def neuron(self, layer: int, index: int) -> dict[str, Any]:
        return self._atlas().neuron(layer, index)

    def _atlas(self) -> Any:
        if self.atlas is None:
            raise EngramError("this workbench has no neuron atlas: build one with `engram atlas "
                              "--out DIR` and start the workbench with --atlas DIR")
        return self.atlas

    def kept(self, delta_id: str) -> Kept:
        if delta_id not in self.deltas:
            raise EngramError(f"no edit {delta_id!r} in this session")
        return self.deltas[delta_id]

    def forget(self, delta_id: str) -> str:
        """Drop an edit from the session (a copy saved to ``--out`` stays there)."""
        self.kept(delta_id)  # an unknown id is refused with the reason
        del self.deltas[delta_id]
        return delta_id

    def lens(self, prompt: str, lens: str = "logit", k: int = 5,
             delta: str | None = None) -> dict[str, Any]:
        if lens not in self.lenses:
            raise EngramError(f"unknown lens {lens!r}; this workbench has {list(self.lenses)}")
        if not 1 <= k <= MAX_K:
            raise EngramError(f"k must lie between 1 and {MAX_K}, got {k}")
        edit = self.kept(delta).delta if delta else None
        with self.lock, (edit.applied(self.lm) if edit is not None else nullcontext()):
            view = layer_view(self.lm, prompt, self.lenses[lens], k=k)
        n = len(view.top)

        def cells(rows: list[list[tuple[str, float]]]) -> list[list[dict[str, Any]]]:
            return [[{"token": t, "prob": p} for t, p in pos] for pos in rows]

        return {"tokens": view.tokens, "lens": lens, "delta": delta,
                "layers": list(range(n + 1)),
                "top": [cells(row) for row in view.top] + [cells(view.output_top)],
                "final_top": view.final_top,
                # the output row is the final distribution itself: rank 0 by definition
                "final_prob": [*view.final_prob, [pos[0][1] for pos in view.output_top]],
                "final_rank": [*view.final_rank, [0] * len(view.tokens)]}

    def start_edit(self, body: dict[str, Any]) -> Job:
        """Check an edit request at once (a 400, not a failed job) and run it in the
        background."""
        from ..edit import get_editor

        method = str(body.get("method", "rome"))
        editor = get_editor(method, progress=False, **_settings(body, "editing"))
        fields = _texts(body, ("prompt", "subject", "target_new", "target_true"))
        request = EditRequest(prompt=fields["prompt"] or "", subject=fields["subject"] or "",
                              target_new=fields["target_new"] or "",
                              target_true=(fields["target_true"] or "").strip() or None)
        prompts = {k: _prompt_list(body.get(k), k) for k in ("paraphrases", "neighbours")}
        return self.jobs.start("edit", 3, lambda job: self._edit(job, method, editor, request,
                                                                 **prompts))

    def _edit(self, job: Job, method: str, editor: Any, request: EditRequest,
              paraphrases: list[str], neighbours: list[str]) -> dict[str, Any]:
        from dataclasses import replace

        from ..evaluate.counterfact import case_scores, summarize

        lm = self.lm
        with self.lock:
            job.advance("reading the model before the edit")
            if request.target_true is None:  # what the model says now is what the edit replaces
                said = lm.generate(request.text, max_new_tokens=3)[0].strip().split()
                request = replace(request, target_true=said[0] if said else None)
            case = EditCase(request, tuple(paraphrases), tuple(neighbours))
            prompts = [request.text, *paraphrases]
            before = summarize(case_scores(lm, [case]))
            said_before = lm.generate(prompts, max_new_tokens=GENERATE_TOKENS)
            job.advance(f"editing with {method}")
            delta = editor.edit(lm, [request])
            job.advance("reading the edited model")
            with delta.applied(lm):
                after = summarize(case_scores(lm, [case]))
                said_after = lm.generate(prompts, max_new_tokens=GENERATE_TOKENS)
        kept = Kept(job.id, method, delta,
                    {"prompt": request.prompt, "subject": request.subject,
                     "target_new": request.target_new, "target_true": request.target_true,
                     "paraphrases": paraphrases, "neighbours": neighbours},
                    {"before": _headline(before), "after": _headline(after)})
        self.deltas[kept.id] = kept
        return {"delta": kept.id, **kept.to_json(),
                "generations": [{"prompt": p, "before": b, "after": a}
                                for p, b, a in zip(prompts, said_before, said_after,
                                                   strict=True)]}

    def start_erase(self, body: dict[str, Any]) -> Job:
        """Check an erasure request at once and run it in the background."""
        from ..data.concepts import Concept, get_concept
        from ..erase.run import make_eraser

        spec = body.get("concept")
        if isinstance(spec, str):
            concept = get_concept(spec)
        elif isinstance(spec, dict):
            concept = Concept.from_dict(spec, "the uploaded concept")
        else:
            raise EngramError("'concept' must be a bundled concept's name or a concept object "
                              "(name, probes, paraphrases, controls, near_controls, text)")
        settings = _settings(body, "erasure")
        method = str(body.get("method", "concept-vectors"))
        relearn = body.get("relearn_steps", 10)
        if not isinstance(relearn, int) or isinstance(relearn, bool) or relearn < 0:
            raise EngramError("relearn_steps must be a whole number, 0 or more")
        make_eraser(method, **settings)  # unknown methods and settings fail here, not later
        return self.jobs.start("erase", 1, lambda job: self._erase(job, concept, method,
                                                                   relearn, settings))

    def _erase(self, job: Job, concept: Any, method: str, relearn: int,
               settings: dict[str, Any]) -> dict[str, Any]:
        from ..erase.run import report_lines, run_erasure

        with self.lock:
            job.advance(f"erasing {concept.name!r} with {method}: tuning under the budget, "
                        "then the held-out report")
            report = run_erasure(self.lm, concept, method, relearn_steps=relearn, **settings)
        return {"report": report, "lines": report_lines(report, self.lm.label)}

    def start_trace(self, body: dict[str, Any]) -> Job:
        """Check a tracing request at once and trace the fact in the background."""
        from ..data.records import Fact
        from ..inspect import TraceConfig

        fields = _texts(body, ("prompt", "subject", "answer"))
        fact = Fact(fields["prompt"] or "", fields["subject"] or "",
                    (fields["answer"] or "").strip() or None)
        numbers = {k: body.get(k, d) for k, d in (("samples", 10), ("window", 10))}
        if any(not isinstance(v, int) or isinstance(v, bool) for v in numbers.values()):
            raise EngramError("samples and window must be whole numbers")
        if numbers["samples"] > 50:
            raise EngramError("at most 50 samples per state in the workbench")
        config = TraceConfig(**numbers)
        config.check()
        return self.jobs.start("trace", 1, lambda job: self._trace(job, fact, config))

    def _trace(self, job: Job, fact: Any, config: Any) -> dict[str, Any]:
        import base64
        import tempfile

        from ..inspect import plot_fact, trace_facts

        with self.lock:
            job.advance(f"restoring each state of {fact.text!r} under noise")
            report = trace_facts(self.lm, [fact], config, known_only=False)
        traced = report.facts[0]
        with tempfile.TemporaryDirectory() as tmp:
            png = plot_fact(traced, Path(tmp) / "trace.png", config.window,
                            f"{self.lm.label}: {fact.text!r}")
            image = base64.b64encode(png.read_bytes()).decode("ascii")
        return {**traced.to_json(), "png": f"data:image/png;base64,{image}"}

    def compare(self, a: str, b: str) -> dict[str, Any]:
        """Two edits side by side: scores, per-parameter norms, and how aligned they are."""
        first, second = self.kept(a), self.kept(b)
        da, db = first.delta, second.delta
        na, nb = da.norms(), db.norms()
        shared = [n for n in na if n in nb]
        return {"a": first.to_json(), "b": second.to_json(),
                "parameters": [{"parameter": n, "norm_a": na.get(n), "norm_b": nb.get(n)}
                               for n in sorted(set(na) | set(nb))],
                "shared_parameters": shared, "cosine": da.overlap(db)}

    def save(self, delta_id: str) -> str:
        """Write an edit to ``--out`` as a saved ``WeightDelta``, with what it was asked and
        scored (``workbench.json``), so a later workbench on the same folder lists it again."""
        from .._io import atomic_file

        kept = self.kept(delta_id)
        if self.out is None:
            raise EngramError("this workbench has no folder to save to: start it with --out DIR")
        path = kept.delta.save(self.out / f"{kept.method}-{kept.id}")
        with atomic_file(path / SAVED) as tmp:
            tmp.write_text(json.dumps(finite(kept.to_json()), indent=1))
        return str(path)

    def load_saved(self) -> list[str]:
        """The edits saved earlier in ``--out`` for this model, back in the session's list;
        returns what was skipped and why (another model's edits, unreadable folders)."""
        skipped: list[str] = []
        if self.out is None or not self.out.is_dir():
            return skipped
        for record in sorted(self.out.glob(f"*/{SAVED}")):
            try:
                info = json.loads(record.read_text())
                delta = WeightDelta.load(record.parent, self.lm)
            except (OSError, ValueError, KeyError, EngramError) as e:
                skipped.append(f"{record.parent.name}: {e}")
                continue
            self.deltas[info["id"]] = Kept(info["id"], info["method"], delta, info["request"],
                                           info["scores"])
        return skipped


def _texts(body: dict[str, Any], names: tuple[str, ...]) -> dict[str, str | None]:
    """The request's text fields by name (None where absent); anything but a string is refused."""
    fields = {k: body.get(k) for k in names}
    if any(v is not None and not isinstance(v, str) for v in fields.values()):
        raise EngramError(f"{', '.join(names)} must be strings")
    return fields


def _settings(body: dict[str, Any], what: str) -> dict[str, Any]:
    """The request's ``set`` object (settings passed on to the method)."""
    settings = body.get("set") or {}
    if not isinstance(settings, dict):
        raise EngramError(f"'set' must be an object of {what} settings")
    return settings


def _prompt_list(value: Any, name: str) -> list[str]:
    """A list of prompts from a JSON list or newline-separated text, blank lines dropped."""
    if value is None:
        return []
    items = value.splitlines() if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise EngramError(f"{name} must be a list of strings or lines of text")
    items = [x.strip() for x in items if x.strip()]
    if len(items) > MAX_PROMPTS:
        raise EngramError(f"at most {MAX_PROMPTS} {name}, got {len(items)}")
    return items


def finite(obj: Any) -> Any:
    """``obj`` with NaN and infinities as null: JSON has no such numbers (a report's accuracy
    on an empty probe set is NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def _headline(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: summary.get(k) for k in HEADLINE}
