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

What the routes run is :class:`~.workbench.Workbench` (one model, one lock, the session's
edits). Bad input (an empty or over-long prompt, an unknown lens, a malformed body) gets a 400
with ``{"error": ...}``; JSON bodies are read up to 64 kB and never unpickled.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import EngramError
from ..lens import Lens
from ..models.lm import LM
from .workbench import Workbench, finite

log = logging.getLogger(__name__)
PAGES = Path(__file__).parent / "pages"
MAX_BODY = 64 * 1024  # bytes of JSON a request may send


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

    def answer(compute: Any) -> JSONResponse:
        """``compute()``'s answer, or a 400 with the reason the workbench refused it."""
        try:
            return JSONResponse(compute())
        except EngramError as e:
            return bad(str(e))

    def info(_request: Request) -> JSONResponse:
        return JSONResponse(bench.info())

    def lens(request: Request) -> JSONResponse:
        q = request.query_params
        try:
            k = int(q.get("k", "5"))
        except ValueError:
            return bad(f"k must be a whole number, got {q.get('k')!r}")
        return answer(lambda: bench.lens(q.get("prompt", ""), q.get("lens", "logit"), k,
                                         q.get("delta") or None))

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
        return answer(bench.atlas_summary)

    def neuron(request: Request) -> JSONResponse:
        q = request.query_params
        try:
            layer, index = int(q.get("layer", "")), int(q.get("index", ""))
        except ValueError:
            return bad("layer and index must be whole numbers")
        return answer(lambda: bench.neuron(layer, index))

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
        q = request.query_params
        return answer(lambda: bench.compare(q.get("a", ""), q.get("b", "")))

    def delta(request: Request) -> JSONResponse:
        delta_id = request.path_params["delta_id"]
        if request.method == "DELETE":
            return answer(lambda: {"deleted": bench.forget(delta_id)})
        return answer(lambda: {"saved": bench.save(delta_id)})

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
