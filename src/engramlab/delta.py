"""``WeightDelta``: every change engramlab makes to a model, as a small, reversible object.

An edit, an erasure or a fine-tune becomes a named set of parameter changes, kept low-rank
(``u @ v.T``) when it is: a ROME edit of GPT-2 XL is two vectors, not a 6 GB model (the PEFT idea
applied to editing). Deltas apply and revert (bit-exactly: applying keeps a copy of just the
touched tensors), compose, measure themselves (norm, rank, overlap with another delta) and save
as ``delta.safetensors`` + ``delta.json`` in a folder written atomically. A delta remembers the
fingerprint of the weights it was computed on; applying it to other weights is refused unless
forced.

Factors and dense changes are stored in the parameter's *storage* orientation (e.g. GPT-2's
``Conv1D`` weights are ``[in, out]``); editors convert with ``Layout.to_storage``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ._io import atomic_dir
from .errors import DeltaMismatchError
from .models.lm import LM
from .models.placement import offloaded_parameters

FORMAT_VERSION = 1
_WEIGHTS = "delta.safetensors"
_META = "delta.json"


@dataclass
class ParamDelta:
    """One parameter's change: ``u @ v.T`` (low-rank) or ``dense``."""

    u: torch.Tensor | None = None
    v: torch.Tensor | None = None
    dense: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.dense is None) == (self.u is None or self.v is None):
            raise ValueError("a ParamDelta is either dense or low-rank (u and v), not both")
        if self.u is not None and self.v is not None:
            if self.u.dim() == 1:
                self.u = self.u[:, None]
            if self.v.dim() == 1:
                self.v = self.v[:, None]
            if self.u.shape[1] != self.v.shape[1]:
                raise ValueError(f"factor ranks differ: u {tuple(self.u.shape)}, "
                                 f"v {tuple(self.v.shape)}")

    @property
    def is_low_rank(self) -> bool:
        return self.dense is None

    @property
    def shape(self) -> tuple[int, ...]:
        if self.dense is not None:
            return tuple(self.dense.shape)
        assert self.u is not None and self.v is not None
        return (self.u.shape[0], self.v.shape[0])

    def to_dense(self) -> torch.Tensor:
        if self.dense is not None:
            return self.dense
        assert self.u is not None and self.v is not None
        return self.u @ self.v.T

    def rank(self) -> int:
        if self.is_low_rank:
            assert self.u is not None
            return int(self.u.shape[1])
        d = self.to_dense()
        return int(torch.linalg.matrix_rank(d.float())) if d.dim() == 2 else int(d.any())

    def scaled(self, alpha: float) -> ParamDelta:
        if self.dense is not None:
            return ParamDelta(dense=self.dense * alpha)
        return ParamDelta(u=self.u * alpha, v=self.v)  # type: ignore[operator]

    def inner(self, other: ParamDelta) -> float:
        """Frobenius inner product, without densifying two low-rank factors."""
        if self.shape != other.shape:
            raise DeltaMismatchError(f"shapes differ: {self.shape} vs {other.shape}")
        if self.is_low_rank and other.is_low_rank:
            a = (self.u.double().T @ other.u.double())  # type: ignore[union-attr]
            b = (self.v.double().T @ other.v.double())  # type: ignore[union-attr]
            return float((a * b).sum())
        if other.is_low_rank:
            return other.inner(self)
        if self.is_low_rank:
            dense = other.to_dense().double()
            return float((self.u.double() * (dense @ self.v.double())).sum())  # type: ignore
        return float((self.to_dense().double() * other.to_dense().double()).sum())


_HALF = (torch.float16, torch.bfloat16)


def _add_change(p: torch.Tensor, d: ParamDelta, sign: int = 1) -> None:
    """``p += sign * change`` in place, on ``p``'s device. A half-precision weight gets the
    change formed in float32 and the sum rounded once, so an edit loses no more than the
    weight's own rounding."""
    if p.dtype in _HALF:
        change = d.u.to(p.device).float() @ d.v.to(p.device).float().T if d.is_low_rank \
            else d.to_dense().to(device=p.device, dtype=torch.float32)  # type: ignore[union-attr]
        p.copy_(p.float().add_(change, alpha=sign))
    elif d.is_low_rank:
        p.addmm_(d.u.to(p), d.v.to(p).T, alpha=sign)  # type: ignore[union-attr]
    else:
        p.add_(d.to_dense().to(p), alpha=sign)


class WeightDelta:
    """Named parameter changes plus the metadata that says where they came from."""

    def __init__(self, entries: Mapping[str, ParamDelta] | None = None,
                 meta: Mapping[str, Any] | None = None) -> None:
        self.entries: dict[str, ParamDelta] = dict(entries or {})
        self.meta: dict[str, Any] = dict(meta or {})
        self._backup: dict[str, torch.Tensor] | None = None
        self._applied_to: int | None = None
        self._restores: tuple[str | None, tuple | None] = (None, None)

    # construction ----------------------------------------------------------------------
    @classmethod
    def for_model(cls, lm: LM, entries: Mapping[str, ParamDelta], **meta: Any) -> WeightDelta:
        """A delta stamped with the model's fingerprint, signature and the library version."""
        from . import __version__

        stamp = {
            "model": lm.name,
            "model_fingerprint": lm.fingerprint(),
            "model_signature": lm.signature(),
            "engramlab_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        return cls(entries, {**stamp, **meta})

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: rank {d.rank()}" if d.is_low_rank else f"{n}: dense"
                          for n, d in self.entries.items())
        return f"WeightDelta({self.meta.get('method', '?')}; {parts})"

    # checks ------------------------------------------------------------------------------
    def check(self, lm: LM, *, force: bool = False) -> None:
        """Refuse a model the delta was not made for (shapes always; weights unless ``force``)."""
        params = dict(lm.model.named_parameters())
        for name, d in self.entries.items():
            if name not in params:
                raise DeltaMismatchError(
                    f"delta changes parameter {name!r}, which model {lm.name!r} does not have; "
                    "was it made for another architecture?")
            if tuple(params[name].shape) != d.shape:
                raise DeltaMismatchError(
                    f"delta for {name!r} has shape {d.shape}, the model's parameter is "
                    f"{tuple(params[name].shape)}: the delta was made for another model")
        if force:
            return
        sig = self.meta.get("model_signature")
        if sig and sig != lm.signature():
            raise DeltaMismatchError(
                f"delta was made for a model with signature {sig} ({self.meta.get('model')}), "
                f"this is {lm.signature()} ({lm.name}); pass force=True / --force to apply anyway")
        fp = self.meta.get("model_fingerprint")
        if fp and fp != lm.fingerprint():
            raise DeltaMismatchError(
                f"delta was computed on weights with fingerprint {fp} ({self.meta.get('model')}) "
                f"but the model's weights are {lm.fingerprint()}: it was made for other weights "
                "(another model, or one with other deltas applied). Apply the deltas in the order "
                "they were made, or pass force=True / --force")

    # applying ------------------------------------------------------------------------------
    def apply(self, lm: LM, *, force: bool = False, keep_backup: bool = True) -> WeightDelta:
        """Add the changes to ``lm`` in place. ``keep_backup`` copies only touched tensors so
        :meth:`revert` restores them bit-exactly."""
        if self._applied_to is not None:
            raise DeltaMismatchError("this delta is already applied; revert it first")
        self.check(lm, force=force)
        params = dict(lm.model.named_parameters())
        offloaded = offloaded_parameters(lm.model, list(self.entries))
        if offloaded:
            raise DeltaMismatchError(
                f"{offloaded[0]} is offloaded by the device map (held as a meta tensor), so it "
                "cannot be edited in place: load with a device_map that keeps the edited layers "
                "on a GPU, or with device='cpu'")
        self._backup = {} if keep_backup else None
        before = lm.known_fingerprint()
        with torch.no_grad():
            for name, d in self.entries.items():
                p = params[name]
                if self._backup is not None:
                    self._backup[name] = p.detach().clone()
                _add_change(p, d)
        self._applied_to = id(lm.model)
        lm.invalidate_fingerprint()
        # an exact revert with nothing changed in between restores the weights' fingerprint
        self._restores = (before, lm.weights_version())
        return self

    def revert(self, lm: LM) -> WeightDelta:
        """Undo :meth:`apply`: exact from the backup, else by subtraction (rounding may differ)."""
        params = dict(lm.model.named_parameters())
        exact = self._backup is not None and self._applied_to == id(lm.model)
        before, version = self._restores
        untouched = exact and before is not None and lm.weights_version() == version
        with torch.no_grad():
            for name, d in self.entries.items():
                p = params[name]
                if exact:
                    p.copy_(self._backup[name])  # type: ignore[index]
                else:
                    _add_change(p, d, sign=-1)
        self._backup = None
        self._applied_to = None
        self._restores = (None, None)
        lm.invalidate_fingerprint()
        if untouched:  # the weights are bit for bit those before apply
            lm.restore_fingerprint(before)  # type: ignore[arg-type]
        return self

    @contextlib.contextmanager
    def applied(self, lm: LM, *, force: bool = False) -> Iterator[LM]:
        """Apply for the duration of a ``with`` block; reverted even when the body raises."""
        self.apply(lm, force=force)
        try:
            yield lm
        finally:
            self.revert(lm)

    # algebra -----------------------------------------------------------------------------
    def compose(self, other: WeightDelta) -> WeightDelta:
        """The sum of two deltas: low-rank factors are concatenated, so ranks add."""
        entries = dict(self.entries)
        for name, d in other.entries.items():
            if name not in entries:
                entries[name] = d
                continue
            a = entries[name]
            if a.shape != d.shape:
                raise DeltaMismatchError(f"cannot compose {name!r}: {a.shape} vs {d.shape}")
            if a.is_low_rank and d.is_low_rank:
                entries[name] = ParamDelta(u=torch.cat([a.u, d.u.to(a.u)], 1),  # type: ignore
                                           v=torch.cat([a.v, d.v.to(a.v)], 1))  # type: ignore
            else:
                entries[name] = ParamDelta(dense=a.to_dense() + d.to_dense().to(a.to_dense()))
        meta = {k: v for k, v in self.meta.items() if k.startswith("model")}
        # one flat list of the composed deltas' metadata, however many were added one by one:
        # nesting would grow a level per edit and no longer save (JSON's recursion limit)
        meta.update(method="compose", parts=self._parts() + other._parts())
        return WeightDelta(entries, meta)

    def _parts(self) -> list[dict[str, Any]]:
        return list(self.meta["parts"]) if self.meta.get("method") == "compose" else [self.meta]

    __add__ = compose

    def scaled(self, alpha: float) -> WeightDelta:
        return WeightDelta({n: d.scaled(alpha) for n, d in self.entries.items()},
                           {**self.meta, "scale": alpha * self.meta.get("scale", 1.0)})

    def inner(self, other: WeightDelta) -> float:
        return sum(d.inner(other.entries[n]) for n, d in self.entries.items()
                   if n in other.entries)

    def norm(self) -> float:
        """Frobenius norm over all entries."""
        return math.sqrt(max(self.inner(self), 0.0))

    def norms(self) -> dict[str, float]:
        return {n: math.sqrt(max(d.inner(d), 0.0)) for n, d in self.entries.items()}

    def ranks(self) -> dict[str, int]:
        return {n: d.rank() for n, d in self.entries.items()}

    def overlap(self, other: WeightDelta) -> float:
        """Cosine similarity of the two deltas as vectors (0: orthogonal, 1: same direction)."""
        denom = self.norm() * other.norm()
        return self.inner(other) / denom if denom else 0.0

    def num_params(self) -> int:
        """Stored numbers: what keeping this delta costs, versus a copy of the weights."""
        total = 0
        for d in self.entries.values():
            total += (d.u.numel() + d.v.numel()) if d.is_low_rank else d.dense.numel()  # type: ignore
        return total

    # files ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``path/`` with ``delta.safetensors`` and ``delta.json``, atomically."""
        tensors: dict[str, torch.Tensor] = {}
        kinds: dict[str, str] = {}
        for name, d in self.entries.items():
            if d.is_low_rank:
                tensors[f"{name}::u"] = d.u.detach().contiguous().cpu()  # type: ignore[union-attr]
                tensors[f"{name}::v"] = d.v.detach().contiguous().cpu()  # type: ignore[union-attr]
                kinds[name] = "low_rank"
            else:
                tensors[f"{name}::dense"] = d.dense.detach().contiguous().cpu()  # type: ignore
                kinds[name] = "dense"
        doc = {"format": FORMAT_VERSION, "entries": kinds, "meta": self.meta}
        path = Path(path)
        with atomic_dir(path) as tmp:
            save_file(tensors, str(tmp / _WEIGHTS))
            (tmp / _META).write_text(json.dumps(doc, indent=1, default=str))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], lm: LM | None = None, *,
             force: bool = False) -> WeightDelta:
        """Read a saved delta; with ``lm``, also check that it was made for that model."""
        path = Path(path)
        if not (path / _META).is_file() or not (path / _WEIGHTS).is_file():
            raise FileNotFoundError(f"{path} is not a saved delta (expected {_META} and "
                                    f"{_WEIGHTS} inside the folder)")
        try:
            doc = json.loads((path / _META).read_text())
            tensors = load_file(str(path / _WEIGHTS))
        except Exception as exc:
            raise DeltaMismatchError(f"delta {path} is corrupt ({exc}); recreate it") from exc
        if doc.get("format") != FORMAT_VERSION:
            raise DeltaMismatchError(f"delta {path} has format {doc.get('format')}, this "
                                     f"engramlab reads format {FORMAT_VERSION}")
        entries = {}
        for name, kind in doc["entries"].items():
            if kind == "low_rank":
                entries[name] = ParamDelta(u=tensors[f"{name}::u"], v=tensors[f"{name}::v"])
            else:
                entries[name] = ParamDelta(dense=tensors[f"{name}::dense"])
        delta = cls(entries, doc.get("meta", {}))
        if lm is not None:
            delta.check(lm, force=force)
        return delta
