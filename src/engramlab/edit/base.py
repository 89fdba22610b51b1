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
from .relation import RelationConfig, check_mode, edit_targets
from .targets import TargetConfig, TargetMemo, Targets

log = logging.getLogger(__name__)


@dataclass
class StatsConfig:
    """Where and how much C₀ = E[k kᵀ] is collected from."""

    corpus: str = "wiki"  # "wiki", "sampled" or a text file / folder (data/corpus.py)
    tokens: int = 50_000
    seq_len: int = 256
    batch: int = 8


@dataclass
class BandConfig:
    """DeltaEdit's trigger and projection (defaults: the reference code's GPT-2 XL values).

    A request's superimposed noise (the norm of the past updates' response to its key) leaves
    the band when it is more than ``width`` running standard deviations from the running mean;
    its target change then avoids the directions in which the past updates write most."""

    width: float = 3.0
    warmup: int = 20  # requests seen before the band can trigger
    momentum: float = 0.9  # of the running mean and variance (exponential averages)
    space: float = 0.25  # at most this share of d_model is avoided
    floor: float = 0.1  # eigenvalues of the past updates' Gram matrix above this are avoided


# the settings only some methods read; every other field is shared
METHOD_FIELDS: dict[str, frozenset[str]] = {
    "rome": frozenset({"consistent_targets"}),
    "memit": frozenset({"mom2_weight"}),
    "alphaedit": frozenset({"nullspace_threshold", "alpha"}),
    "deltaedit": frozenset({"nullspace_threshold", "alpha", "band"}),
}
# names of the flat settings these came from, for a message that says where each went
RENAMED = {"v_steps": "target.steps", "v_lr": "target.lr", "kl_factor": "target.kl_factor",
           "weight_decay": "target.weight_decay", "clamp": "target.clamp",
           "early_stop": "target.early_stop", "chunk": "target.chunk",
           "group_rows": "target.group_rows", "memory_budget": "target.memory_budget",
           "stats_corpus": "stats.corpus", "stats_tokens": "stats.tokens",
           "stats_seq_len": "stats.seq_len", "stats_batch": "stats.batch"}


@dataclass
class EditHParams:
    """Every knob of ROME / MEMIT / AlphaEdit / DeltaEdit; presets fill them per model family.
    The target optimisation's settings are a :class:`TargetConfig` (``target``), the
    statistics' a :class:`StatsConfig` (``stats``), DeltaEdit's band a :class:`BandConfig`
    (``band``), TOP's second stage a :class:`~.relation.RelationConfig` (``relation``, read
    when ``targets`` is ``two_stage``); nested keys are written ``target.lr`` in ``--set``."""

    layers: list[int] = field(default_factory=lambda: [0])
    subject_pos: str = "last"
    templates: list[list[int]] = field(default_factory=lambda: [[10, 5]])
    target: TargetConfig = field(default_factory=TargetConfig)
    # "one_stage" (ROME eq. 4) or "two_stage" (TOP's subject + relation aware targets)
    targets: str = "one_stage"
    relation: RelationConfig = field(default_factory=RelationConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    use_cov: bool = True  # solve against C₀ (the papers); False: plain least squares
    # ROME: optimise δ as the rank-one update will write it at each prompt (see rome.py)
    consistent_targets: bool = True
    # MEMIT
    mom2_weight: float = 20_000.0
    # AlphaEdit (and DeltaEdit)
    nullspace_threshold: float = 2e-2
    alpha: float = 10.0
    # DeltaEdit
    band: BandConfig = field(default_factory=BandConfig)

    def replace(self, **changes: Any) -> EditHParams:
        """A copy with ``changes``: top-level fields, ``target`` / ``stats`` as dicts of some of
        their fields, or dotted names (``**{"target.lr": 1.0}``); strings are typed by the
        field (as ``--set`` gives them)."""
        nested: dict[str, dict[str, Any]] = {"target": {}, "stats": {}, "band": {},
                                             "relation": {}}
        top: dict[str, Any] = {}
        for key, value in changes.items():
            head, dot, rest = key.partition(".")
            if key in RENAMED:
                raise RequestError(f"hyper-parameter {key!r} is now {RENAMED[key]!r}")
            if dot and head in nested:
                nested[head][rest] = value
            elif key in nested and isinstance(value, dict):
                nested[key].update(value)
            else:
                top[key] = value
        out = _replaced(self, top, "")
        for name, part in nested.items():
            if part:
                out = dataclasses.replace(out, **{name: _replaced(getattr(out, name), part,
                                                                  f"{name}.")})
        if out.subject_pos not in SUBJECT_POSITIONS:
            raise RequestError(f"subject_pos {out.subject_pos!r}; use one of {SUBJECT_POSITIONS}")
        check_mode(out.targets)
        check_corpus_spec(out.stats.corpus)
        return out

    def check_method(self, method: str, keys: Sequence[str]) -> None:
        """Refuse settings that belong to another method (ROME has no ``alpha``)."""
        mine = METHOD_FIELDS.get(method, frozenset())
        others = set().union(*METHOD_FIELDS.values()) - mine
        wrong = sorted(k for k in keys if k.partition(".")[0] in others)
        if wrong:
            raise RequestError(f"{wrong} {'is' if len(wrong) == 1 else 'are'} not "
                               f"setting{'' if len(wrong) == 1 else 's'} of {method}; its own "
                               f"are {sorted(mine) or 'none'} beside the shared ones")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def read_settings(self) -> dict[str, Any]:
        """The settings an edit with these hyper-parameters reads: all of them but TOP's
        ``relation`` group, which only two-stage targets read. Two configurations that agree
        here make the same edits."""
        out = self.to_dict()
        if self.targets != "two_stage":
            del out["relation"]
        return out


def _replaced(obj: Any, changes: dict[str, Any], prefix: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(obj)}
    unknown = sorted(set(changes) - set(known))
    if unknown:
        names = sorted(prefix + k for k in known)
        raise RequestError(f"unknown hyper-parameter(s) {[prefix + k for k in unknown]}; "
                           f"known: {names}")
    typed = {}
    for k, v in changes.items():
        f = known[k]  # typed by the field's default: the current value may be None
        like = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(like):
            raise RequestError(f"hyper-parameter {prefix}{k} is a group: set its fields, "
                               f"e.g. {prefix}{k}.{dataclasses.fields(like)[0].name}=...")
        try:
            typed[k] = _coerce(v, like)
        except ValueError as exc:
            kind = "a number or none" if like is None else type(like).__name__
            raise RequestError(f"hyper-parameter {prefix}{k}={v!r}: expected {kind} ({exc})"
                               ) from None
    return dataclasses.replace(obj, **typed)


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
                 key_stats: dict[int, KeyStats] | None = None, progress: bool = False,
                 **overrides: Any) -> None:
        """``overrides`` change the preset's settings: top-level names, ``target`` / ``stats``
        as dicts of some of their fields, or dotted names (``**{"target.lr": 1.0}``);
        ``key_stats`` are C₀ statistics already collected, by layer."""
        EditHParams().replace(**overrides).check_method(self.method, overrides)
        self._hparams = hparams
        self.preset = preset
        self.overrides = overrides
        self.progress = progress
        self._moments: dict[int, torch.Tensor] = {
            layer: _held(s) for layer, s in (key_stats or {}).items()}
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
                lm, missing, hp.stats.corpus, n_tokens=hp.stats.tokens,
                seq_len=hp.stats.seq_len, batch_size=hp.stats.batch, progress=self.progress)
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

    def optimise(self, lm: LM, hp: EditHParams, requests: Sequence[EditRequest], point: str,
                 templates: Sequence[str], *, row_scale: torch.Tensor | None = None,
                 avoid: Sequence[torch.Tensor | None] | None = None) -> Targets:
        """The requests' target values at ``point``, as ``hp.targets`` says to find them."""
        return edit_targets(lm, requests, point, templates, hp.target, hp.targets, hp.relation,
                            subject_pos=hp.subject_pos, row_scale=row_scale, avoid=avoid,
                            progress=self.progress)

    def _delta(self, lm: LM, hp: EditHParams, factors: dict[int, tuple[torch.Tensor, ...]],
               requests: Sequence[EditRequest], **meta: Any) -> WeightDelta:
        return WeightDelta.for_model(
            lm, self._entries(lm, factors), method=self.method,  # type: ignore[arg-type]
            hparams=hp.to_dict(), n_requests=len(requests),
            case_ids=[r.case_id for r in requests], **meta)
