"""The demo edit: one counterfactual written into the embedded model, shown before and after."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..data.records import EditCase, EditRequest
from ..evaluate.counterfact import case_scores
from ..models.lm import LM
from .rome import ROME

DEMO_CASE = EditCase(
    request=EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower",
                        target_new="Rome", target_true="Paris"),
    paraphrase_prompts=("The Eiffel Tower can be found in the city of",),
    neighborhood_prompts=("The Louvre is located in the city of",),
    generation_prompts=("The Eiffel Tower is located in the city of",
                        "To visit the Eiffel Tower, you travel to"),
)


def demo_edit(lm: LM, *, progress: bool = True, max_new_tokens: int = 12,
              say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """ROME-edit "The Eiffel Tower is in Paris" to Rome; return scores, generations and lines.

    ``say`` receives each line of the report as soon as it is known."""
    case = DEMO_CASE
    lines: list[str] = []

    def emit(line: str) -> None:
        lines.append(line)
        if say is not None:
            say(line)

    prompts = [case.request.text, *case.paraphrase_prompts, *case.neighborhood_prompts,
               case.generation_prompts[1]]
    before = lm.generate(prompts, max_new_tokens=max_new_tokens)
    pre = case_scores(lm, [case])[0].to_dict()
    editor = ROME(progress=progress)
    hp = editor.hparams_for(lm)
    if say is not None and progress:
        say(f"ROME needs key statistics of layer {hp.layers[0]} over {hp.stats.tokens:,} tokens "
            f"of the {hp.stats.corpus!r} corpus: a few seconds on 2 CPU cores the first time, "
            "then read from the cache")
    editor.prepare(lm)
    t0 = time.perf_counter()
    delta = editor.edit(lm, case.request)
    seconds = time.perf_counter() - t0
    with delta.applied(lm):
        after = lm.generate(prompts, max_new_tokens=max_new_tokens)
        post = case_scores(lm, [case])[0].to_dict()
    layer = delta.meta["hparams"]["layers"]
    emit(f"ROME edit at layer {layer[0]}: {case.request.text!r} -> "
         f"{case.request.target_new!r} (was {case.request.target_true!r}); "
         f"{seconds:.1f} s, delta of {delta.num_params()} numbers "
         f"(statistics {editor.stats_seconds:.0f} s, cached for next time)")
    kinds = ["edit prompt", "paraphrase", "neighbour", "generation"]
    for kind, prompt, b, a in zip(kinds, prompts, before, after, strict=True):
        for line in (f"  [{kind}] {prompt}", f"      before: {b.strip()!r}",
                     f"      after:  {a.strip()!r}"):
            emit(line)
    emit("  scores before -> after: " + ", ".join(
        f"{k} {pre[k]:.2f} -> {post[k]:.2f}" for k in ("efficacy", "paraphrase",
                                                        "neighborhood")))
    return {"method": "rome", "layer": layer[0], "seconds": seconds, "pre": pre, "post": post,
            "before": dict(zip(prompts, before, strict=True)),
            "after": dict(zip(prompts, after, strict=True)), "lines": lines}
