"""What every editor shares: hyper-parameters, statistics and templates, the step interface.

An editor is configured once (a preset for the model family plus overrides) and then called as
``editor.edit(lm, requests) -> WeightDelta``; sequential use goes through
``editor.step(lm, requests, state) -> (delta, state)``. Key statistics and context templates are
computed for the first model an editor sees and kept **on the editor object** (not in module
globals): later steps of a sequential run keep using the unedited model's C₀ and the same
templates, as in the papers, while two editor objects never share anything.

C₀ is kept as a float32 matrix per layer (half of the float64 sum it is collected and cached
as) and upcast layer by layer for the float64 solves: on SmolLM2 the deltas differ by ~1e-7
relative (below the float32 they are stored in), and MEMIT's five layers hold 47 MB instead of
94 MB while the target optimisation runs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data.corpus import check_corpus_spec
from ..data.records import EditRequest
from ..delta import ParamDelta, WeightDelta
from ..errors import RequestError
from ..models.lm import LM
from ..stats import KeyStats, collect_key_stats
from .prompts import SUBJECT_POSITIONS, context_templates
from .targets import TargetConfig, TargetMemo

log = logging.getLogger(__name__)


@dataclass
class EditHParams:
    """Every knob of ROME / MEMIT / AlphaEdit; presets fill them per model family."""

    layers: list[int] = field(default_factory=lambda: [0])
    subject_pos: str = "last"
    templates: list[list[int]] = field(default_factory=lambda: [[10, 5]])
    v_steps: int = 20
    v_lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp: float = 4.0
    early_stop: float = 5e-2
    chunk: int = 32
    group_rows: int | None = None  # cap on rows per forward of the target optimisation (memory)
    # what the target optimisation may hold, as a fraction of the model's parameter bytes
    # (None: no limit); sizes its chunks and forwards (edit/memory.py)
    memory_budget: float | None = None
    # ROME: optimise δ as the rank-one update will write it at each prompt (see rome.py)
    consistent_targets: bool = True
    # statistics
    use_cov: bool = True
    stats_corpus: str = "wiki"  # "wiki", "sampled" or a text file / folder (data/corpus.py)
    stats_tokens: int = 50_000
    stats_seq_len: int = 256
    stats_batch: int = 8
    # MEMIT
    mom2_weight: float = 20_000.0
    # AlphaEdit
    nullspace_threshold: float = 2e-2
    alpha: float = 10.0

    def target_config(self) -> TargetConfig:
        return TargetConfig(steps=self.v_steps, lr=self.v_lr, kl_factor=self.kl_factor,
                            weight_decay=self.weight_decay, clamp=self.clamp,
                            early_stop=self.early_stop, subject_pos=self.subject_pos,
                            chunk=self.chunk, group_rows=self.group_rows,
                            memory_budget=self.memory_budget)

    def replace(self, **changes: Any) -> EditHParams:
        known = {f.name: f for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - set(known))
        if unknown:
            raise RequestError(f"unknown hyper-parameter(s) {unknown}; known: {sorted(known)}")
        typed = {}
        for k, v in changes.items():
            f = known[k]  # typed by the field's default: the current value may be None
            like = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            try:
                typed[k] = _coerce(v, like)
            except ValueError as exc:
                kind = "a number or none" if like is None else type(like).__name__
                raise RequestError(f"hyper-parameter {k}={v!r}: expected {kind} ({exc})") from None
        out = dataclasses.replace(self, **typed)
        if out.subject_pos not in SUBJECT_POSITIONS:
            raise RequestError(f"subject_pos {out.subject_pos!r}; use one of {SUBJECT_POSITIONS}")
        check_corpus_spec(out.stats_corpus)
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, like: Any) -> Any:
    """``--set key=value`` strings become the field's type."""
    if not isinstance(value, str):
        return value
    if like is None:  # the optional numbers (group_rows, memory_budget): "none" or a number
        if value.lower() in ("none", "null", ""):
            return None
        return float(value) if any(ch in value for ch in ".eE") else int(value)
    if isinstance(like, bool):
        return value.lower() in ("1", "true", "yes", "on")
    if isinstance(like, int):
        return int(value)
    if isinstance(like, float):
        return float(value)
    if isinstance(like, list):
        import yaml

        return yaml.safe_load(value if value.startswith("[") else f"[{value}]")
    return value


def _held(stats: KeyStats) -> torch.Tensor:
    """C₀ as an editor keeps it between solves: float32 (see the module docstring)."""
    return stats.moment().float()


class Editor:
    """Base class: resolves hyper-parameters, owns statistics and templates for one model."""

    method = "editor"

    def __init__(self, hparams: EditHParams | None = None, *, preset: str | None = None,
                 stats: dict[int, KeyStats] | None = None, progress: bool = False,
                 **overrides: Any) -> None:
        self._hparams = hparams
        self.preset = preset
        self.overrides = overrides
        self.progress = progress
        self._moments: dict[int, torch.Tensor] = {
            layer: _held(s) for layer, s in (stats or {}).items()}
        self._templates: list[str] | None = None
        self._signature: str | None = None
        self.stats_seconds = 0.0
        # shared by a sweep's editors to optimise each request's target once (see TargetMemo)
        self.target_memo: TargetMemo | None = None

    # configuration ------------------------------------------------------------------------
    def hparams_for(self, lm: LM) -> EditHParams:
        if self._hparams is not None:
            hp = self._hparams
        else:
            from ..presets import load_preset

            hp = load_preset(lm, self.method, self.preset)
        hp = hp.replace(**self.overrides) if self.overrides else hp
        hp = hp.replace(layers=[lm.layout.check_layer(int(x)) for x in hp.layers])
        return hp

    def _bind(self, lm: LM) -> None:
        """Forget statistics and templates if this editor is now used on another model."""
        sig = lm.signature()
        if self._signature is not None and sig != self._signature:
            self._moments.clear()
            self._templates = None
        self._signature = sig

    def moments(self, lm: LM, layers: Sequence[int], hp: EditHParams) -> dict[int, torch.Tensor]:
        """C₀ = E[k kᵀ] per layer (float32), collected or read from the disk cache once."""
        self._bind(lm)
        missing = [layer for layer in layers if layer not in self._moments]
        if missing:
            start = time.perf_counter()
            collected = collect_key_stats(
                lm, missing, hp.stats_corpus, n_tokens=hp.stats_tokens, seq_len=hp.stats_seq_len,
                batch_size=hp.stats_batch, progress=self.progress)
            for layer in list(collected):  # free each float64 sum once its copy exists
                self._moments[layer] = _held(collected.pop(layer))
            self.stats_seconds += time.perf_counter() - start
        return {layer: self._moments[layer] for layer in layers}

    def templates(self, lm: LM, hp: EditHParams) -> list[str]:
        self._bind(lm)
        if self._templates is None:
            self._templates = context_templates(lm, hp.templates)
        return self._templates

    def prepare(self, lm: LM) -> None:
        """Collect statistics and templates now (so timing an edit excludes them)."""
        hp = self.hparams_for(lm)
        if hp.use_cov:
            self.moments(lm, hp.layers, hp)
        self.templates(lm, hp)

    # editing -------------------------------------------------------------------------------
    def step(self, lm: LM, requests: Sequence[EditRequest], state: Any = None
             ) -> tuple[WeightDelta, Any]:
        raise NotImplementedError

    def edit(self, lm: LM, requests: Sequence[EditRequest] | EditRequest) -> WeightDelta:
        """All ``requests`` into the current weights, as one delta."""
        if isinstance(requests, EditRequest):
            requests = [requests]
        if not requests:
            raise RequestError("no edit requests given")
        return self.step(lm, list(requests), None)[0]

    def edit_each(self, lm: LM, requests: Sequence[EditRequest]) -> list[WeightDelta]:
        """One delta per request, each computed on the current weights (independent edits)."""
        return [self.edit(lm, [r]) for r in requests]

    @staticmethod
    def _entries(lm: LM, factors: dict[int, tuple[torch.Tensor, torch.Tensor]]
                 ) -> dict[str, ParamDelta]:
        entries = {}
        for layer, (u, v) in factors.items():
            su, sv = lm.layout.to_storage(layer, u.float(), v.float())
            entries[lm.layout.value_param_name(layer)] = ParamDelta(u=su.cpu(), v=sv.cpu())
        return entries

    def _delta(self, lm: LM, hp: EditHParams, factors: dict[int, tuple[torch.Tensor, ...]],
               requests: Sequence[EditRequest], **meta: Any) -> WeightDelta:
        return WeightDelta.for_model(
            lm, self._entries(lm, factors), method=self.method,  # type: ignore[arg-type]
            hparams=hp.to_dict(), n_requests=len(requests),
            case_ids=[r.case_id for r in requests], **meta)
