"""Superimposed noise in sequential editing (Cao et al., "On the Superimposed Noise Accumulation
Problem in Sequential Knowledge Editing of Large Language Models", AAAI 2026, §3).

MEMIT, AlphaEdit and DeltaEdit write each batch's target values z at the last edited layer L.
When a new batch arrives, the sum of the updates already made there, ΔW_past, adds
``ΔW_past k`` to whatever is written at a new request's key k: its *superimposed noise*. Before
each batch the recorder measures ``‖ΔW_past k‖`` per request and, after the step, its ratio to
``‖z − h‖``, the change the edit itself has to make at L. At evaluation points it reads every
earlier edit's state at L on the current weights and reports how far it is from its target z,
and the response ``ΔW_s k`` of each earlier edit's key to the updates of every later span s of
edits: the linear part of the drift at L, split by when the updates that cause it were made.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.records import EditRequest
from ..delta import WeightDelta
from ..models.lm import LM
from .keys import at_subject


@dataclass
class NoiseRecorder:
    """Follows one sequential run at layer ``layer``; ``span`` edits make one span of the
    drift's split (the run's evaluation interval)."""

    lm: LM
    layer: int
    span: int
    subject_pos: str = "last"
    steps: list[dict[str, Any]] = field(default_factory=list)
    points: list[dict[str, Any]] = field(default_factory=list)
    _past: torch.Tensor | None = None
    _batches: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    _requests: list[EditRequest] = field(default_factory=list)
    _targets: list[torch.Tensor] = field(default_factory=list)
    _noise: torch.Tensor | None = None

    def _keys(self, requests: Sequence[EditRequest]) -> torch.Tensor:
        point = f"mlp_key.{self.layer}"
        return at_subject(self.lm, requests, [point], ["{}"], self.subject_pos)[point].float()

    def before(self, requests: Sequence[EditRequest]) -> None:
        """Before a batch is edited: the past updates' response to its keys."""
        if self._past is None:
            self._noise = None
            return
        self._noise = (self._keys(requests).cpu() @ self._past.T).norm(dim=1)

    def after(self, requests: Sequence[EditRequest], delta: WeightDelta,
              targets: torch.Tensor, changes: torch.Tensor, state: Any = None) -> None:
        """After the batch's step: its targets z (``[n, d_model]``), the changes ``z − h`` they
        asked for, and the update it made at the layer (from ``delta``); with DeltaEdit's
        ``state``, how many requests so far had their targets kept off the past directions."""
        layout = self.lm.layout
        entry = delta.entries.get(layout.value_param_name(self.layer))
        first = len(self._requests)
        need = changes.float().norm(dim=1).cpu()
        record: dict[str, Any] = {"edits": first + len(requests),
                                  "change_norm": need.tolist()}
        band = getattr(state, "band", None)
        if band:
            record["projected"] = int(band.get("projected", 0))
        if self._noise is not None:
            record["noise"] = self._noise.tolist()
            record["ratio"] = (self._noise / need.clamp_min(1e-12)).tolist()
        self.steps.append(record)
        if entry is not None:
            if entry.is_low_rank:  # storage and [d_model, d_mlp] order differ by one swap
                u, v = layout.to_storage(self.layer, entry.u.float(), entry.v.float())
            else:  # a dense update, as its own factors
                dense = layout.dense_to_storage(self.layer, entry.to_dense().float())
                u, v = dense, torch.eye(dense.shape[1])
            # contiguous as a checkpoint stores them: a resumed run's products then take the
            # same kernels, and so the same rounding, as an uninterrupted one's
            u, v = u.cpu().contiguous(), v.cpu().contiguous()
            self._batches.append((first, u, v))
            update = u @ v.T
            self._past = update if self._past is None else self._past + update
        self._requests += list(requests)
        self._targets += list(targets.float().cpu())

    def evaluate(self) -> dict[str, Any]:
        """Drift of every edit so far from its target, and the later spans' share in it."""
        n = len(self._requests)
        point = f"resid.{self.layer}"
        key = f"mlp_key.{self.layer}"
        read = at_subject(self.lm, self._requests, [key, point], ["{}"], self.subject_pos)
        keys, states = read[key].float().cpu(), read[point].float().cpu()
        drift = (states - torch.stack(self._targets)).norm(dim=1)
        later = torch.zeros(n, self.lm.d_model)  # Σ over later batches of ΔW_j k_i
        spans: dict[int, torch.Tensor] = {}  # span → its updates' response at earlier keys
        for first, u, v in self._batches:
            response = (keys[:first] @ v) @ u.T  # [first, d_model]: ΔW_j at each earlier key
            later[:first] += response
            s = first // self.span
            if s not in spans:
                spans[s] = torch.zeros(n, self.lm.d_model)
            spans[s][:first] += response
        # each span against the edits made before it began: all of its updates came later
        by_span = [{"edits": [s * self.span, (s + 1) * self.span],
                    "earlier_edits": s * self.span,
                    "mean_noise": float(spans[s][:s * self.span].norm(dim=1).mean())}
                   for s in sorted(spans) if s > 0]
        out = {"edits": n, "mean_drift": float(drift.mean()),
               "median_drift": float(drift.median()),
               "mean_later_noise": float(later.norm(dim=1).mean()), "by_span": by_span}
        self.points.append(out)
        return out

    def checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The history so far as tensors and JSON (see :mod:`.checkpoint`)."""
        tensors = {f"batch.{i}.{k}": t.contiguous() for i, (_, u, v) in enumerate(self._batches)
                   for k, t in (("u", u), ("v", v))}
        if self._past is not None:
            tensors["past"] = self._past.contiguous()
        if self._targets:
            tensors["targets"] = torch.stack(self._targets)
        doc = {"steps": self.steps, "points": self.points,
               "firsts": [first for first, _, _ in self._batches]}
        return tensors, doc

    def restore(self, tensors: dict[str, torch.Tensor], doc: dict[str, Any],
                requests: Sequence[EditRequest]) -> None:
        """Take up a checkpoint's history; ``requests`` are those edited before it."""
        targets = tensors.get("targets")
        if len(requests) != (0 if targets is None else len(targets)):
            raise ValueError(f"noise checkpoint holds {0 if targets is None else len(targets)} "
                             f"targets for {len(requests)} edited requests")
        self.steps, self.points = list(doc["steps"]), list(doc["points"])
        self._batches = [(first, tensors[f"batch.{i}.u"], tensors[f"batch.{i}.v"])
                         for i, first in enumerate(doc["firsts"])]
        self._past = tensors.get("past")
        self._requests = list(requests)
        self._targets = [] if targets is None else list(targets)

    def to_json(self) -> dict[str, Any]:
        """Per step, the mean noise and ratio (and every request's); per evaluation point, the
        drift and its split."""
        steps = []
        for s in self.steps:
            row = {"edits": s["edits"],
                   "mean_change_norm": sum(s["change_norm"]) / len(s["change_norm"])}
            if "projected" in s:
                row["projected"] = s["projected"]
            if "noise" in s:
                row["mean_noise"] = sum(s["noise"]) / len(s["noise"])
                row["mean_ratio"] = sum(s["ratio"]) / len(s["ratio"])
            steps.append({**row, "per_request": {k: s[k] for k in ("noise", "ratio",
                                                                   "change_norm") if k in s}})
        return {"layer": self.layer, "span": self.span, "steps": steps, "points": self.points}


def plot_noise(noise: dict[str, Any], out: str | Path, title: str = "") -> None:
    """The noise ratio per batch (left) and, at each evaluation point, the drift of earlier
    edits from their targets and the mean later noise (right)."""
    from ..figures import figure

    steps = [s for s in noise["steps"] if "mean_ratio" in s]
    with figure(out, ncols=2, figsize=(10, 4)) as (_fig, (left, right)):
        left.plot([s["edits"] for s in steps], [s["mean_ratio"] for s in steps], lw=1)
        left.set_xlabel("edits made")
        left.set_ylabel("‖ΔW_past k‖ / ‖z − h‖ (batch mean)")
        left.set_title(f"superimposed noise at layer {noise['layer']}")
        points = noise["points"]
        x = [p["edits"] for p in points]
        right.plot(x, [p["mean_drift"] for p in points], marker="o", label="‖h − z‖ (drift)")
        right.plot(x, [p["mean_later_noise"] for p in points], marker="s",
                   label="‖Σ later ΔW k‖")
        right.set_xlabel("edits made")
        right.set_ylabel("mean over earlier edits")
        right.legend()
        right.set_title(title or "earlier edits")
