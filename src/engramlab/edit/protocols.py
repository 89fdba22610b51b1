"""Editing protocols: how requests meet the model, and when they are evaluated.

* ``independent``: each request is edited into the unedited model and evaluated alone, then
  reverted (ROME's CounterFact tables). Target values of many requests are still optimised in
  one batch when the editor supports it (:meth:`ROME.edit_each`): the edits stay independent.
* ``batch``: all requests in one edit (MEMIT's mass-editing tables); with ``batch_size``,
  consecutive batches of that many, each edited into the unedited model and scored under its
  own edit (so a large case set is reported at the batch size a preset was chosen for).
* ``sequential``: batches of ``batch_size`` (default 10) edited one after another, each on the
  weights the previous left, everything evaluated at the end — and every ``eval_every``
  batches if asked, which draws the decay curve of the AlphaEdit paper (Fig. 1).

``seconds_per_edit`` is the median wall time of the editing step per request (statistics,
templates and evaluation excluded); when requests are edited in a batch, each request is
charged the batch time divided by its size.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.records import EditCase
from ..delta import WeightDelta
from ..errors import RequestError
from ..evaluate.bootstrap import case_intervals
from ..evaluate.counterfact import (
    HEADLINE,
    METRICS,
    CaseScores,
    case_scores,
    fill_relation_answers,
    summarize,
)
from ..models.lm import LM
from .base import Editor

PROTOCOLS = ("independent", "batch", "sequential")


@dataclass
class RunResult:
    method: str
    model: str
    protocol: str
    n: int
    pre: dict[str, Any]
    post: dict[str, Any]
    seconds_per_edit: float
    stats_seconds: float
    per_case: list[dict[str, Any]] = field(default_factory=list)
    curve: list[dict[str, Any]] = field(default_factory=list)
    delta: WeightDelta | None = None
    deltas: list[WeightDelta] = field(default_factory=list)
    hparams: dict[str, Any] = field(default_factory=dict)
    noise: dict[str, Any] | None = None  # sequential runs with noise=True (see .noise)

    def table(self) -> list[str]:
        """Before/after scores as text lines (what ``engram edit`` prints)."""
        def num(value: Any, width: int) -> str:
            return f"{'-':>{width}}" if value is None else f"{value:>{width}.3f}"

        lines = [f"{self.method} on {self.model}, protocol {self.protocol}, {self.n} facts",
                 f"{'':<14}{'efficacy':>10}{'paraphrase':>12}{'neighbourhood':>15}"
                 f"{'fluency':>9}"]
        for name, s in (("before", self.pre), ("after", self.post)):
            lines.append(f"{name:<14}{num(s['efficacy'], 10)}{num(s['paraphrase'], 12)}"
                         f"{num(s['neighborhood'], 15)}{num(s.get('fluency'), 9)}")
        if self.post.get("relation_specificity") is not None:
            lines.append(f"relation specificity (same subject, other relations): "
                         f"{num(self.pre.get('relation_specificity'), 0)} before, "
                         f"{num(self.post['relation_specificity'], 0)} after")
        lines.append(f"{self.seconds_per_edit:.2f} s per edit (median); statistics "
                     f"{self.stats_seconds:.1f} s")
        return lines

    def report_markdown(self) -> str:
        """A short report: every score before and after (``report.md`` of ``engram edit``)."""
        rows = "\n".join(f"| {k} | {self.pre.get(k)} | {self.post.get(k)} |"
                         for k in self.post if k != "n")
        return (f"# {self.method} on {self.model}\n\nprotocol {self.protocol}, {self.n} "
                f"facts, {self.seconds_per_edit:.3f} s per edit (median)\n\n"
                f"| metric | before | after |\n| --- | --- | --- |\n{rows}\n")

    def to_json(self) -> dict[str, Any]:
        """The object ``engram edit --json`` prints."""
        shown = (*HEADLINE, "relation_specificity")
        post = {k: self.post.get(k) for k in (*shown, "fluency")}
        out = {"method": self.method, "model": self.model, "protocol": self.protocol,
               "n": self.n, "pre": {k: self.pre.get(k) for k in shown}, "post": post,
               "seconds_per_edit": self.seconds_per_edit, "stats_seconds": self.stats_seconds,
               "pre_all": self.pre, "post_all": self.post, "hparams": self.hparams}
        if self.per_case:
            out["post_ci95"] = case_intervals(self.per_case, {k: METRICS[k] for k in shown})
        if self.curve:
            out["curve"] = self.curve
        if self.noise is not None:
            out["noise"] = self.noise
        return out


def without_edited_neighbours(cases: Sequence[EditCase]) -> list[EditCase]:
    """Drop neighbourhood prompts that mention a subject edited in the same run.

    In the batch and sequential protocols every request is in place when a case is scored, so
    a neighbour that is itself an edited subject no longer has the old answer: counting it
    would charge the editor for doing its job. (On the bundled facts every neighbour is such a
    subject; on CounterFact and ParaRel cases few are.)
    """
    subjects = {c.request.subject for c in cases}
    out = []
    for case in cases:
        others = subjects - {case.request.subject}
        keep = [i for i, p in enumerate(case.neighborhood_prompts)
                if not any(s in p for s in others)]
        if len(keep) == len(case.neighborhood_prompts):
            out.append(case)
            continue
        answers = case.neighborhood_targets() if case.neighborhood_prompts else []
        out.append(dataclasses.replace(
            case, neighborhood_prompts=tuple(case.neighborhood_prompts[i] for i in keep),
            neighborhood_answers=tuple(answers[i] for i in keep)))
    return out


def _as_scored(cases: Sequence[EditCase], protocol: str, batch_size: int | None
               ) -> list[EditCase]:
    """The cases as they are scored: in the sequential protocol every earlier request is in
    place when a case is scored; in the batch protocol each batch goes into the unedited model,
    so only its own subjects are."""
    if protocol == "sequential":
        return without_edited_neighbours(cases)
    if protocol == "batch":
        size = batch_size or len(cases)
        return [c for start in range(0, len(cases), size)
                for c in without_edited_neighbours(cases[start:start + size])]
    return list(cases)


def run_protocol(lm: LM, editor: Editor, cases: Sequence[EditCase], *,
                 protocol: str = "independent", batch_size: int | None = None,
                 eval_every: int | None = None, fluency_tokens: int = 0,
                 progress: bool = False,
                 on_point: Callable[[dict[str, Any]], None] | None = None,
                 pre: dict[str, Any] | None = None, noise: bool = False,
                 checkpoint: str | Path | None = None) -> RunResult:
    """Edit ``cases`` under ``protocol`` and score them; ``pre``, the unedited model's summary
    of these cases under this protocol (``RunResult.pre`` of an earlier run), skips scoring
    them again. ``noise`` (sequential, MEMIT-family editors) records the superimposed noise
    and the drift of earlier edits (:mod:`.noise`) into ``RunResult.noise``. ``checkpoint``
    (sequential): a folder the run saves itself to at every evaluation point (else at every
    tenth of the batches) and resumes from when it holds an earlier save of the same run
    (:mod:`.checkpoint`)."""
    if protocol not in PROTOCOLS:
        raise RequestError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
    if not cases:
        raise RequestError("no cases to edit")
    check_noise(editor, protocol, noise)
    if checkpoint is not None and protocol != "sequential":
        raise RequestError("only sequential runs are checkpointed: add --protocol sequential "
                           "or drop --checkpoint")
    cases = fill_relation_answers(lm, _as_scored(cases, protocol, batch_size))
    if pre is None:
        pre = summarize(case_scores(lm, cases, fluency_tokens=fluency_tokens, progress=progress))
    editor.prepare(lm)
    hparams = editor.hparams_for(lm)
    hp = hparams.to_dict()
    stats_seconds = editor.stats_seconds
    curve: list[dict[str, Any]] = []
    deltas: list[WeightDelta] = []
    delta: WeightDelta | None = None
    recorder = None
    if protocol == "independent":
        chunk = max(1, int(hp["target"]["chunk"]))
        results, deltas, times = _independent(lm, editor, cases, chunk, fluency_tokens,
                                              progress)
    elif protocol == "batch":
        results, deltas, times = _batches(lm, editor, cases, batch_size or len(cases),
                                          fluency_tokens, progress)
        if len(deltas) == 1:  # one batch: its delta is the run's
            delta, deltas = deltas[0], []
    else:
        size = batch_size or 10
        if noise:
            from .noise import NoiseRecorder

            n_batches = -(-len(cases) // size)
            span = size * (eval_every or max(1, n_batches // 10))
            recorder = NoiseRecorder(lm, max(hp["layers"]), span, hp["subject_pos"])
        saving = None
        if checkpoint is not None:
            from .checkpoint import run_identity

            saving = (Path(checkpoint),
                      run_identity(lm, editor.method, hparams, cases, size, eval_every, noise))
        results, delta, curve, times = _sequential(
            lm, editor, cases, size, eval_every, fluency_tokens, progress, on_point, recorder,
            saving)
    post = summarize(results)
    return RunResult(editor.method, lm.name, protocol, len(cases), pre, post,
                     statistics.median(times), stats_seconds,
                     [r.to_dict() for r in results], curve, delta, deltas, hp,
                     None if recorder is None else recorder.to_json())


def check_noise(editor: Editor, protocol: str, noise: bool) -> None:
    """Noise is measured at the layer where an editor places its targets, in a sequential run;
    refuse anything else before a model is loaded."""
    from .memit import MEMIT

    if noise and protocol != "sequential":
        raise RequestError("noise is measured in sequential runs: add --protocol sequential")
    if noise and not isinstance(editor, MEMIT):
        raise RequestError(f"noise is measured for editors with a target layer (memit, "
                           f"alphaedit, deltaedit), not {editor.method}")


def _independent(lm: LM, editor: Editor, cases: list[EditCase], chunk: int,
                 fluency_tokens: int, progress: bool
                 ) -> tuple[list[CaseScores], list[WeightDelta], list[float]]:
    """Each case edited alone into the unedited model (``chunk`` of them optimised together)
    and scored under its own delta: scores, deltas, seconds per edit."""
    from tqdm.auto import tqdm

    results: list[CaseScores] = []
    deltas: list[WeightDelta] = []
    times: list[float] = []
    bar = tqdm(total=len(cases), desc=f"{editor.method} independent", unit="edit",
               disable=not progress)
    for start in range(0, len(cases), chunk):
        part = cases[start:start + chunk]
        t0 = time.perf_counter()
        made = editor.edit_each(lm, [c.request for c in part])
        times += [(time.perf_counter() - t0) / len(part)] * len(part)
        for case, d in zip(part, made, strict=True):
            with d.applied(lm):
                results += case_scores(lm, [case], fluency_tokens=fluency_tokens)
        deltas += made
        bar.update(len(part))
    bar.close()
    return results, deltas, times


def _batches(lm: LM, editor: Editor, cases: list[EditCase], size: int, fluency_tokens: int,
             progress: bool) -> tuple[list[CaseScores], list[WeightDelta], list[float]]:
    """Consecutive batches of ``size``, each edited into the unedited model and its cases
    scored under its delta: scores, one delta per batch, seconds per edit."""
    results: list[CaseScores] = []
    deltas: list[WeightDelta] = []
    times: list[float] = []
    n_batches = -(-len(cases) // size)
    for start in range(0, len(cases), size):
        part = cases[start:start + size]
        if n_batches > 1 and progress:
            print(f"batch {start // size + 1}/{n_batches}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        delta = editor.edit(lm, [c.request for c in part])
        times += [(time.perf_counter() - t0) / len(part)] * len(part)
        with delta.applied(lm):
            results += case_scores(lm, part, fluency_tokens=fluency_tokens, progress=progress)
        deltas.append(delta)
    return results, deltas, times


def _sequential(lm: LM, editor: Editor, cases: list[EditCase], batch_size: int,
                eval_every: int | None, fluency_tokens: int, progress: bool,
                on_point: Callable[[dict[str, Any]], None] | None, recorder: Any = None,
                saving: tuple[Path, dict[str, Any]] | None = None
                ) -> tuple[list[CaseScores], WeightDelta | None, list[dict[str, Any]], list[float]]:
    from tqdm.auto import tqdm

    from .checkpoint import load_checkpoint, save_checkpoint

    params = dict(lm.model.named_parameters())
    snapshot: dict[str, torch.Tensor] = {}  # one copy of each touched tensor, not one per step
    state: Any = None
    total: WeightDelta | None = None
    times: list[float] = []
    curve: list[dict[str, Any]] = []
    batches = [cases[i:i + batch_size] for i in range(0, len(cases), batch_size)]
    save_every = eval_every or max(1, len(batches) // 10)
    first = 0
    last: list[CaseScores] | None = None
    resumed = None if saving is None else load_checkpoint(*saving)
    bar = tqdm(total=len(cases), desc=f"{editor.method} sequential", unit="edit",
               disable=not progress)
    try:
        if resumed is not None:
            first, total, state = resumed.batches_done, resumed.total, resumed.state
            times, curve = resumed.times, resumed.curve
            with torch.no_grad():  # the very weights the interrupted run had reached
                for name, value in resumed.weights.items():
                    snapshot[name] = params[name].detach().clone()
                    params[name].copy_(value)
            lm.invalidate_fingerprint()
            if recorder is not None and resumed.recorder is not None:
                recorder.restore(*resumed.recorder,
                                 [c.request for p in batches[:first] for c in p])
            bar.update(sum(len(p) for p in batches[:first]))
        for b, part in enumerate(batches[first:], first + 1):
            requests = [c.request for c in part]
            if recorder is not None:
                recorder.before(requests)
            t0 = time.perf_counter()
            d, state = editor.step(lm, requests, state)
            times += [(time.perf_counter() - t0) / len(part)] * len(part)
            if recorder is not None:
                targets = editor.last_targets  # type: ignore[attr-defined]
                recorder.after(requests, d, targets.value, targets.delta, state)
            for name in d.entries:
                if name not in snapshot:
                    snapshot[name] = params[name].detach().clone()
            d.apply(lm, force=True, keep_backup=False)
            total = d if total is None else total + d
            bar.update(len(part))
            point = None
            if eval_every and (b % eval_every == 0 or b == len(batches)):
                done = [c for p in batches[:b] for c in p]
                scored = case_scores(lm, done)
                if b == len(batches):
                    last = scored
                s = summarize(scored)
                point = {"edits": len(done), **{k: s[k] for k in HEADLINE}}
                if recorder is not None:
                    drift = recorder.evaluate()
                    point |= {"mean_drift": drift["mean_drift"],
                              "mean_later_noise": drift["mean_later_noise"]}
                curve.append(point)
            if saving is not None and (b % save_every == 0 or b == len(batches)):
                save_checkpoint(*saving, batches_done=b,
                                weights={name: params[name] for name in snapshot}, total=total,
                                state=state, times=times, curve=curve, recorder=recorder)
            if point is not None and on_point is not None:  # after the save: it may stop the run
                on_point(point)
        if recorder is not None and not (recorder.points
                                         and recorder.points[-1]["edits"] == len(cases)):
            recorder.evaluate()
        # the last evaluation scored every case on the final weights already
        results = last if last is not None and not fluency_tokens else \
            case_scores(lm, cases, fluency_tokens=fluency_tokens)
    finally:
        bar.close()
        with torch.no_grad():
            for name, value in snapshot.items():
                params[name].copy_(value)
        lm.invalidate_fingerprint()
    return results, total, curve, times
