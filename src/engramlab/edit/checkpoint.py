"""Checkpoints of a sequential run, so that a run of a thousand edits survives an interruption.

A sequential run is a chain: each batch is edited on the weights every earlier batch left, and
AlphaEdit and DeltaEdit carry an :class:`~.solve.EditState` from one batch to the next. A
checkpoint folder holds what the chain needs to go on (the sum of the deltas so far, the
editor's state, the times and the curve, and a noise recorder's history) together with the
run's *identity*: the unedited weights' fingerprint, the editor and its settings, the cases and
the batching. A run resumes only from a checkpoint of the same identity; anything else is
refused with the setting that differs, because continuing another run's chain would give
numbers that belong to neither.

Written atomically (the folder is replaced whole), so an interruption while saving leaves the
previous checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .._io import atomic_dir
from ..data.records import EditCase
from ..delta import WeightDelta
from ..errors import CacheError, RequestError
from ..models.lm import LM
from .base import EditHParams
from .solve import EditState

FORMAT_VERSION = 1
_PROGRESS = "progress.json"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_identity(lm: LM, method: str, hparams: EditHParams, cases: Sequence[EditCase],
                 batch_size: int, eval_every: int | None, noise: bool) -> dict[str, Any]:
    """What two runs must share for one to continue the other (call on the unedited model).
    The settings enter as those the run reads (:meth:`EditHParams.read_settings`), so that a
    preset gaining a setting its runs do not read leaves them resumable."""
    return {"method": method, "model": lm.name, "model_fingerprint": lm.fingerprint(),
            "hparams": _digest(hparams.read_settings()),
            "cases": _digest([dataclasses.asdict(c) for c in cases]),
            "n": len(cases), "batch_size": batch_size, "eval_every": eval_every,
            "noise": noise}


@dataclass
class Resumed:
    """Where an interrupted run stopped."""

    batches_done: int
    weights: dict[str, torch.Tensor]
    total: WeightDelta | None
    state: EditState | None
    times: list[float]
    curve: list[dict[str, Any]]
    recorder: tuple[dict[str, torch.Tensor], dict[str, Any]] | None


def load_checkpoint(folder: str | Path, identity: dict[str, Any]) -> Resumed | None:
    """The checkpoint in ``folder`` (None when there is none yet); a checkpoint of another run
    is refused, naming what differs."""
    folder = Path(folder)
    if not (folder / _PROGRESS).is_file():
        if folder.exists() and any(folder.iterdir()):
            raise RequestError(f"checkpoint folder {folder} holds something else; give an "
                               "empty or new folder")
        return None
    try:
        doc = json.loads((folder / _PROGRESS).read_text())
        saved = doc["identity"]
    except (OSError, ValueError, KeyError) as exc:
        raise CacheError(f"checkpoint {folder} is corrupt ({exc}); delete it to start "
                         "again") from exc
    if doc.get("format") != FORMAT_VERSION:
        raise CacheError(f"checkpoint {folder} has format {doc.get('format')}; delete it to "
                         "start again")
    differ = sorted(k for k in identity if saved.get(k) != identity[k])
    if differ:
        what = ", ".join(f"{k} {saved.get(k)!r} there, {identity[k]!r} here" for k in differ)
        raise RequestError(f"checkpoint {folder} is of another run ({what}); give another "
                           "folder, or delete it to start again")
    weights = load_file(str(folder / "weights.safetensors"))
    total = WeightDelta.load(folder / "delta") if (folder / "delta").is_dir() else None
    state = EditState.load(folder / "state") if (folder / "state").is_dir() else None
    recorder = None
    if doc.get("recorder") is not None:
        recorder = (load_file(str(folder / "recorder.safetensors")), doc["recorder"])
    return Resumed(int(doc["batches_done"]), weights, total, state, list(doc["times"]),
                   list(doc["curve"]), recorder)


def save_checkpoint(folder: str | Path, identity: dict[str, Any], *, batches_done: int,
                    weights: dict[str, torch.Tensor], total: WeightDelta | None, state: Any,
                    times: list[float], curve: list[dict[str, Any]], recorder: Any = None
                    ) -> None:
    """Replace ``folder`` with the run as it stands after ``batches_done`` batches; ``weights``
    are the current values of every parameter the run has changed."""
    if state is not None and not isinstance(state, EditState):
        raise RequestError(f"a sequential run whose editor carries a {type(state).__name__} "
                           "cannot be checkpointed; run it without a checkpoint")
    doc: dict[str, Any] = {"format": FORMAT_VERSION, "identity": identity,
                           "batches_done": batches_done, "times": times, "curve": curve,
                           "recorder": None}
    with atomic_dir(folder) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()},
                  str(tmp / "weights.safetensors"))
        if total is not None:
            total.save(tmp / "delta")
        if state is not None:
            state.save(tmp / "state")
        if recorder is not None:
            tensors, doc["recorder"] = recorder.checkpoint()
            save_file(tensors, str(tmp / "recorder.safetensors"))
        (tmp / _PROGRESS).write_text(json.dumps(doc, indent=1, default=str))
