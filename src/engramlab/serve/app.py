"""``engram serve``: a local web workbench on one loaded model.

A Starlette app. The pages are static HTML with plain JavaScript (nothing for a user to build)
that read the same JSON API a script can call:

* ``GET /api/info`` — the model's name, its layers and the lenses on offer;
* ``GET /api/lens?prompt=...&lens=logit&k=5`` — every layer's top ``k`` tokens at every
  position of the prompt: ``{"tokens": [...], "layers": [0, ..., n], "top": [[[{"token",
  "prob"}, ...] per position] per layer], ...}``. The last layer, ``n``, is the model's own
  output distribution, so the grid ends on what the model says.

The model is loaded once and every request that runs it holds one lock, so two browser tabs are
served one after the other and never see each other's work half done. Bad input (an empty or
over-long prompt, an unknown lens, a non-numeric ``k``) gets a 400 with ``{"error": ...}``.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import EngramError
from ..lens import Lens, LogitLens, layer_view
from ..models.lm import LM

PAGES = Path(__file__).parent / "pages"
MAX_K = 20


class Workbench:
    """The model, its lenses and the lock every use of the model holds."""

    def __init__(self, lm: LM, lenses: Mapping[str, Lens] | None = None) -> None:
        self.lm = lm
        self.lenses: dict[str, Lens] = {"logit": LogitLens(lm), **(lenses or {})}
        self.lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        return {"model": self.lm.label, "n_layers": self.lm.n_layers,
                "lenses": list(self.lenses)}

    def lens(self, prompt: str, lens: str = "logit", k: int = 5) -> dict[str, Any]:
        if lens not in self.lenses:
            raise EngramError(f"unknown lens {lens!r}; this workbench has {list(self.lenses)}")
        if not 1 <= k <= MAX_K:
            raise EngramError(f"k must lie between 1 and {MAX_K}, got {k}")
        with self.lock:
            view = layer_view(self.lm, prompt, self.lenses[lens], k=k)
        n = len(view.top)

        def cells(rows: list[list[tuple[str, float]]]) -> list[list[dict[str, Any]]]:
            return [[{"token": t, "prob": p} for t, p in pos] for pos in rows]

        return {"tokens": view.tokens, "lens": lens, "layers": list(range(n + 1)),
                "top": [cells(row) for row in view.top] + [cells(view.output_top)],
                "final_top": view.final_top,
                # the output row is the final distribution itself: rank 0 by definition
                "final_prob": [*view.final_prob, [pos[0][1] for pos in view.output_top]],
                "final_rank": [*view.final_rank, [0] * len(view.tokens)]}


def make_app(lm: LM, lenses: Mapping[str, Lens] | None = None) -> Any:
    """The Starlette application serving ``lm`` (and any trained ``lenses`` beside the logit
    lens)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, RedirectResponse
    from starlette.routing import Route

    bench = Workbench(lm, lenses)

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
            return JSONResponse(bench.lens(q.get("prompt", ""), q.get("lens", "logit"), k))
        except EngramError as e:
            return bad(str(e))

    def page(name: str) -> Any:
        def serve(_request: Request) -> FileResponse:
            return FileResponse(PAGES / name, media_type="text/html")
        return serve

    routes = [Route("/", lambda _r: RedirectResponse("/lens")),
              Route("/lens", page("lens.html")),
              Route("/api/info", info),
              Route("/api/lens", lens)]
    app = Starlette(routes=routes)
    app.state.workbench = bench
    return app
