"""``engram serve``: a local web workbench on one loaded model.

A Starlette app. The pages are static HTML with plain JavaScript (nothing for a user to build)
that read the same JSON API a script can call:

* ``GET /api/info`` — the model's name, its layers and the lenses on offer;
* ``GET /api/lens?prompt=...&lens=logit&k=5[&delta=ID]`` — every layer's top ``k`` tokens at
  every position of the prompt: ``{"tokens": [...], "layers": [0, ..., n], "top": [[[{"token",
  "prob"}, ...] per position] per layer], ...}``. The last layer, ``n``, is the model's own
  output distribution, so the grid ends on what the model says. ``delta`` reads the model with
  an edit of this session applied;
* ``POST /api/edit`` with ``{"method", "prompt", "subject", "target_new", "target_true"?,
  "paraphrases"?, "neighbours"?, "set"?}`` — starts an edit in the background and answers
  ``{"job": ID}``; ``GET /api/jobs/ID`` reports its phase and, once done, the scores and greedy
  continuations before and after, and the id of the kept delta;
* ``POST /api/erase`` with ``{"concept": NAME or a concept object, "method", "relearn_steps"?,
  "set"?}`` — erases a bundled or uploaded concept in the background (``GET /api/concepts``
  lists the bundled ones); the finished job holds the erasure report and its text lines;
* ``POST /api/trace`` with ``{"prompt", "subject", "answer"?, "samples"?, "window"?}`` —
  causal tracing of one fact in the background (ROME's fig. 1); the finished job holds the
  grids and the heatmap as a PNG data URI;
* ``GET /api/atlas`` and ``GET /api/neuron?layer=L&index=I`` — with ``--atlas DIR``, the
  neuron atlas's summary and one neuron's page (top contexts, promoted tokens, category);
* ``GET /api/deltas`` lists this session's edits; ``GET /api/deltas/compare?a=ID&b=ID`` sets
  two side by side: their scores, their norms per parameter and their cosine similarity;
  ``POST /api/deltas/ID/save`` writes one to the ``--out`` folder as a saved ``WeightDelta``;
  ``DELETE /api/deltas/ID`` forgets it. Edits saved in ``--out`` by an earlier workbench on
  the same model are listed again at start.

Edits never stay in the model: each is kept as a delta and applied, under the lock, only for
the request that asks for it, then reverted.

The model is loaded once and every request that runs it holds one lock, so two browser tabs are
served one after the other and never see each other's work half done. Bad input (an empty or
over-long prompt, an unknown lens, a non-numeric ``k``) gets a 400 with ``{"error": ...}``.
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
from ..lens import Lens, LogitLens, layer_view
from ..models.lm import LM
from .jobs import Job, Jobs

log = logging.getLogger(__name__)
PAGES = Path(__file__).parent / "pages"
MAX_K = 20
MAX_BODY = 64 * 1024  # bytes of JSON a request may send
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

        settings = body.get("set") or {}
        if not isinstance(settings, dict):
            raise EngramError("'set' must be an object of editing settings")
        method = str(body.get("method", "rome"))
        editor = get_editor(method, progress=False, **settings)
        fields = {k: body.get(k) for k in ("prompt", "subject", "target_new", "target_true")}
        if any(v is not None and not isinstance(v, str) for v in fields.values()):
            raise EngramError("prompt, subject, target_new and target_true must be strings")
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
        settings = body.get("set") or {}
        if not isinstance(settings, dict):
            raise EngramError("'set' must be an object of erasure settings")
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

        fields = {k: body.get(k) for k in ("prompt", "subject", "answer")}
        if any(v is not None and not isinstance(v, str) for v in fields.values()):
            raise EngramError("prompt, subject and answer must be strings")
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
    return {k: summary.get(k) for k in ("efficacy", "paraphrase", "neighborhood")}


def make_app(lm: LM, lenses: Mapping[str, Lens] | None = None, *,
             out: str | Path | None = None, atlas: Any = None) -> Any:
    """The Starlette application serving ``lm`` (and any trained ``lenses`` beside the logit
    lens); ``out`` is where saved edits go, ``atlas`` a loaded neuron atlas to page through."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, RedirectResponse
    from starlette.responses import JSONResponse as StarletteJSON
    from starlette.routing import Route

    bench = Workbench(lm, lenses, out=out, atlas=atlas)
    for reason in bench.load_saved():
        log.warning("not listing a saved edit: %s", reason)

    class JSONResponse(StarletteJSON):
        def render(self, content: Any) -> bytes:
            return super().render(finite(content))

    def bad(message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=400)

    def info(_request: Request) -> JSONResponse:
        return JSONResponse(bench.info())

    def lens(request: Request) -> JSONResponse:
        q = request.query_params
        try:
            k = int(q.get("k", "5"))
        except ValueError:
            return bad(f"k must be a whole number, got {q.get('k')!r}")
        try:
            return JSONResponse(bench.lens(q.get("prompt", ""), q.get("lens", "logit"), k,
                                           q.get("delta") or None))
        except EngramError as e:
            return bad(str(e))

    def starts(begin: Any) -> Any:
        """A POST route that reads a size-limited JSON object and starts a job with it."""
        async def route(request: Request) -> JSONResponse:
            raw = await request.body()
            if len(raw) > MAX_BODY:
                return bad(f"the request is {len(raw)} bytes; at most {MAX_BODY} are read")
            try:
                body = json.loads(raw or b"{}")
            except (json.JSONDecodeError, UnicodeDecodeError):
                return bad("the request body must be a JSON object")
            if not isinstance(body, dict):
                return bad("the request body must be a JSON object")
            try:
                job = begin(body)
            except (EngramError, TypeError) as e:  # TypeError: a setting nothing takes
                return bad(str(e))
            return JSONResponse({"job": job.id}, status_code=202)
        return route

    def atlas_summary(_request: Request) -> JSONResponse:
        try:
            return JSONResponse(bench.atlas_summary())
        except EngramError as e:
            return bad(str(e))

    def neuron(request: Request) -> JSONResponse:
        q = request.query_params
        try:
            layer, index = int(q.get("layer", "")), int(q.get("index", ""))
        except ValueError:
            return bad("layer and index must be whole numbers")
        try:
            return JSONResponse(bench.neuron(layer, index))
        except EngramError as e:
            return bad(str(e))

    def concepts(_request: Request) -> JSONResponse:
        from ..data.concepts import bundled_concepts

        return JSONResponse([c.name for c in bundled_concepts()])

    def job(request: Request) -> JSONResponse:
        found = bench.jobs.get(request.path_params["job_id"])
        if found is None:
            return JSONResponse({"error": "no such job"}, status_code=404)
        return JSONResponse(found.to_json())

    def deltas(_request: Request) -> JSONResponse:
        return JSONResponse([k.to_json() for k in bench.deltas.values()])

    def compare(request: Request) -> JSONResponse:
        try:
            return JSONResponse(bench.compare(request.query_params.get("a", ""),
                                              request.query_params.get("b", "")))
        except EngramError as e:
            return bad(str(e))

    def delta(request: Request) -> JSONResponse:
        delta_id = request.path_params["delta_id"]
        try:
            if request.method == "DELETE":
                bench.kept(delta_id)
                del bench.deltas[delta_id]
                return JSONResponse({"deleted": delta_id})
            return JSONResponse({"saved": bench.save(delta_id)})
        except EngramError as e:
            return bad(str(e))

    def page(name: str, media_type: str = "text/html") -> Any:
        def serve(_request: Request) -> FileResponse:
            return FileResponse(PAGES / name, media_type=media_type)
        return serve

    routes = [Route("/", lambda _r: RedirectResponse("/lens")),
              Route("/lens", page("lens.html")),
              Route("/static/common.css", page("common.css", "text/css")),
              Route("/static/common.js", page("common.js", "text/javascript")),
              Route("/edit", page("edit.html")),
              Route("/erase", page("erase.html")),
              Route("/trace", page("trace.html")),
              Route("/neurons", page("neurons.html")),
              Route("/api/atlas", atlas_summary),
              Route("/api/neuron", neuron),
              Route("/api/info", info),
              Route("/api/lens", lens),
              Route("/api/edit", starts(bench.start_edit), methods=["POST"]),
              Route("/api/erase", starts(bench.start_erase), methods=["POST"]),
              Route("/api/trace", starts(bench.start_trace), methods=["POST"]),
              Route("/api/concepts", concepts),
              Route("/api/jobs/{job_id}", job),
              Route("/api/deltas", deltas),
              Route("/api/deltas/compare", compare),
              Route("/api/deltas/{delta_id}/save", delta, methods=["POST"]),
              Route("/api/deltas/{delta_id}", delta, methods=["DELETE"])]
    app = Starlette(routes=routes)
    app.state.workbench = bench
    return app
