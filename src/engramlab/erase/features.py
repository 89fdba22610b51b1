"""Sparse-feature concept erasure in the parameters (PISCES).

Follows Gur-Arieh et al. 2025, "Precise In-Parameter Concept Erasure in Large Language Models"
(PISCES): a disentangler decomposes MLP vectors into features, the concept's features are found
automatically, and each MLP value vector that carries one of them strongly is rewritten in the
feature's basis. Everything else the vector encodes is kept, so this is more specific than
zeroing whole vectors (ConceptVectors) and deeper than fine-tuning.

The disentangler is the paper's: one SAE of the MLP output per layer
(:mod:`.sae`, trained here because GemmaScope-like SAEs exist for few models). Recipe:

1. **Find** the concept's features by how often they fire: the share of the concept's tokens
   (probe prompts and text) on which a feature is active, against the larger of its share on the
   controls plus neutral text and on the near controls' tuning half. A feature scores
   ``on − contrast · other`` (``contrast`` = 3: it must fire at least three times as often on the
   concept as anywhere else); the best ``n_features`` are taken.
2. **Affected vectors**: vector j of layer ℓ drives feature f on the concept when its push on f's
   encoder, ``(mean coefficient of j on the concept − on the controls) · (enc_f · v_j)``, exceeds
   τ × the largest push in the layer.
3. **Edit**: each driving vector's component along f's decoder direction is set to −μ·M·s_j,
   where M is the largest such component among them and s_j the sign of j's coefficient on the
   concept. Where the vector fires as it does on the concept, it now writes against the feature.
   μ = 0 removes the component. Per layer this is a rank-|features| ``WeightDelta``.
4. **Tune** n_features × τ × μ under the specificity budget every eraser shares (:mod:`.budget`).
   μ runs through the grid (up to 12), then doubles while the row stays inside the budget, up
   to ``mu_max`` = 48, so that a best setting never sits on the grid's edge by accident.

Deviations from the paper, and why:

* **Selection by firing frequency, not by vocabulary.** The paper keeps features whose
  vocabulary projection names the concept, checks each feature's effect, and uses an LLM judge.
  The projections of these small SAEs' decoder directions are noise (the features that fire most
  specifically on Harry Potter project onto " strugg", " interspers", ...). Activation is the
  label that carries signal here.
* **Affected vectors by their push on the concept, not by weights alone.** The paper thresholds
  ``|enc_f · v_j|``. On SmolLM2 that rule touches thousands of vectors per layer and every
  setting that lowered the concept also cost the controls far beyond the budget; the push rule
  touches tens to hundreds (figures in ``docs/erasure.md``).
* **μ is a multiple of the largest component among the driving vectors.** The paper's μ
  multiplies the largest encoder value, and its SAE's code and error term rebuild the vector.
  Here the component is set directly along the unit decoder direction, so with μ = 0 the feature
  is gone exactly rather than through an imperfect encoder.
* **The SAEs' training text includes text the model writes about each bundled concept**
  (:func:`.sae.feature_corpus`). It never includes the probes.

SAEs are trained once per model and cached. The measurements behind these choices are in
``docs/erasure.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..data.concepts import Concept, Probe, bundled_concepts, controls_for, general_text
from ..data.corpus import TextCorpus
from ..delta import ParamDelta, WeightDelta
from ..errors import ConceptError
from ..models.lm import LM
from .budget import Budget, BudgetSearch
from .dictionary import TopKDictionary, unit_rows
from .sae import feature_corpus, train_output_saes
from .vectors import token_activations

log = logging.getLogger(__name__)


@dataclass
class OutputFeature:
    """A feature of one layer's MLP-output SAE and how often it fires (share of tokens) on
    the concept's text, on controls and neutral text, and on the near controls' tuning half."""

    layer: int
    feature: int
    on: float
    off: float
    near: float
    score: float
    top_tokens: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass
class _Firing:
    rates: dict[int, torch.Tensor]  # per layer, share of tokens each feature fires on
    keys: dict[int, torch.Tensor]  # per layer, each value vector's mean coefficient


@torch.no_grad()
def _firing(lm: LM, saes: dict[int, TopKDictionary], texts: Sequence[str],
            batch_size: int = 16) -> _Firing:
    layers = list(saes)
    points = [f"mlp_out.{i}" for i in layers] + [f"mlp_key.{i}" for i in layers]
    fired = {i: torch.zeros(saes[i].n_features) for i in layers}
    keys = {i: torch.zeros(lm.layout.d_mlp) for i in layers}
    n = 0
    for acts in token_activations(lm, texts, points, batch_size):
        for i in layers:
            fired[i] += (saes[i].encode(unit_rows(acts[f"mlp_out.{i}"])) > 0).sum(0)
            keys[i] += acts[f"mlp_key.{i}"].sum(0)
        n += acts[points[0]].shape[0]
    return _Firing({i: f / max(n, 1) for i, f in fired.items()},
                   {i: k / max(n, 1) for i, k in keys.items()})


def rank_output_features(lm: LM, saes: dict[int, TopKDictionary], concept: Concept,
                         controls: Sequence[Probe], neutral: Sequence[str], *,
                         contrast: float = 3.0,
                         top: int = 64) -> tuple[list[OutputFeature], _Firing, _Firing]:
    """The features that fire on the concept's probes and text more than ``contrast`` times
    as often as on the controls and neutral text and on the near controls' tuning half, best
    first (score = rate on the concept − contrast × the larger other rate), with the firing
    evidence the removal needs."""
    on = _firing(lm, saes, [p.prompt for p in concept.probes] + concept.forget_text)
    off = _firing(lm, saes, [p.prompt for p in controls] + list(neutral))
    near_probes = concept.near("tune")
    near = _firing(lm, saes, [p.prompt for p in near_probes]) if near_probes else None
    rows = []
    for layer, sae in saes.items():
        other = off.rates[layer] if near is None else torch.maximum(off.rates[layer],
                                                                    near.rates[layer])
        score = on.rates[layer] - contrast * other
        best = score.topk(min(top, sae.n_features))
        for sc, f in zip(best.values.tolist(), best.indices.tolist(), strict=True):
            if sc > 0:
                rows.append(OutputFeature(
                    layer, f, float(on.rates[layer][f]), float(off.rates[layer][f]),
                    float(near.rates[layer][f]) if near is not None else 0.0, sc))
    rows = sorted(rows, key=lambda r: -r.score)[:top]
    if rows:  # reported, not used: these SAEs' decoder directions project onto noise tokens
        directions = torch.stack([saes[r.layer].decoder[r.feature] for r in rows])
        top_ids = lm.logits_from_hidden(directions.to(lm.device, lm.dtype)).float().topk(8)
        for r, ids in zip(rows, top_ids.indices.tolist(), strict=True):
            r.top_tokens = [lm.decode(t) for t in ids]
    return rows, on, off


def output_features_delta(lm: LM, saes: dict[int, TopKDictionary],
                          features: Sequence[OutputFeature], on: _Firing, off: _Firing, *,
                          tau: float = 0.1, mu: float = 1.0, **meta: object) -> WeightDelta:
    """Rewrite each value vector that drives a chosen feature on the concept's text.

    Vector j of layer ℓ *drives* feature f when its push on f's encoder, (mean coefficient
    on the concept − on the controls) × ``enc_f · v_j``, exceeds τ × the largest push in the
    layer. Its component along f's (unit) decoder direction d_f is then set to
    ``−μ · M · s_j``: M is the largest |d_f · v| among the driving vectors and s_j the sign of
    j's mean coefficient on the concept, so that where it fires as it does on the concept it
    now writes *against* the feature. μ = 0 removes the component exactly.
    """
    if not 0.0 <= tau < 1.0:
        raise ConceptError(f"tau={tau} must lie in [0, 1): the share of the strongest push a "
                           "vector needs to count as driving the feature")
    if mu < 0:
        raise ConceptError(f"mu={mu} must be ≥ 0: 0 removes the feature, larger values write "
                           "against it")
    entries = {}
    n_affected: dict[int, int] = {}
    for layer in sorted({f.layer for f in features}):
        lm.layout.check_layer(layer)
        if layer not in saes:
            raise ConceptError(f"no SAE for layer {layer}: train one for every layer to edit")
        w = lm.layout.value_weight(layer).detach().double().cpu()  # [d_model, d_mlp]
        k_on, k_off = on.keys[layer].double(), off.keys[layer].double()
        sign = torch.where(k_on < 0, -1.0, 1.0).double()
        us, vs = [], []
        hit = torch.zeros(w.shape[1], dtype=torch.bool)
        for feat in (f for f in features if f.layer == layer):
            sae = saes[layer]
            push = (k_on - k_off) * (sae.encoder[:, feat.feature].double() @ w)
            if push.max() <= 0:
                continue
            driving = push > tau * push.max()
            d = sae.decoder[feat.feature].double()
            d = d / d.norm()
            c = d @ w
            coef = torch.zeros_like(c)
            coef[driving] = -mu * c[driving].abs().max() * sign[driving] - c[driving]
            us.append(d)
            vs.append(coef)
            hit |= driving
        if not us:
            continue
        n_affected[layer] = int(hit.sum())
        a, b = lm.layout.to_storage(layer, torch.stack(us, 1).float(),
                                    torch.stack(vs, 1).float())
        entries[lm.layout.value_param_name(layer)] = ParamDelta(u=a, v=b)
    return WeightDelta.for_model(lm, entries, affected=n_affected, tau=tau, mu=mu, **meta)


@dataclass
class FeatureEraser:
    """PISCES-style erasure through sparse features of the MLP outputs (per-layer SAEs,
    :mod:`.sae`).

    With ``tune`` the number of features, τ and μ are chosen like every other
    eraser's setting: the grid point that lowers the concept's accuracy most inside the
    specificity budget (:mod:`.budget`); μ grows along each row until it leaves the budget."""

    n_features: int = 16
    tau: float = 0.2
    mu: float = 1.0
    layers: list[int] | None = None
    tune: bool = True
    n_features_grid: tuple[int, ...] = (1, 2, 4, 8)
    taus: tuple[float, ...] = (0.3, 0.1, 0.03)
    mus: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)
    mu_max: float = 48.0
    contrast: float = 3.0
    budget: Budget = field(default_factory=Budget)  # what a tuned setting may cost
    saes: dict[int, TopKDictionary] | None = None
    sae_features: int = 2048
    sae_k: int = 16
    sae_steps: int = 1500
    sae_tokens: int = 100_000
    sae_text: str | None = None
    chosen: list[OutputFeature] = field(default_factory=list, init=False)
    ranked: list[OutputFeature] = field(default_factory=list, init=False)
    trials: list[dict[str, object]] = field(default_factory=list, init=False)

    def erase(self, lm: LM, concept: Concept,
              controls: Sequence[Probe] | None = None) -> WeightDelta:
        controls = list(controls_for(concept) if controls is None else controls)
        saes = self.saes if self.saes is not None else self.fit_saes(lm, names=[concept.name])
        for sae in saes.values():
            sae.check_model(lm)
        neutral = general_text(split="tune")
        self.ranked, on, off = rank_output_features(lm, saes, concept, controls, neutral,
                                                    contrast=self.contrast)
        if not self.ranked:
            raise ConceptError(f"no SAE feature fires {self.contrast}x as often on "
                               f"{concept.name!r}'s text as on its controls: train the SAEs "
                               "on text about it, or lower contrast")
        n, tau, mu = self.n_features, self.tau, self.mu
        if self.tune:
            n, tau, mu = self._tune(lm, concept, controls, saes, on, off)
        self.chosen = self.ranked[:n]
        log.info("erasing %d MLP-output features of %r (tau %g, mu %g)", len(self.chosen),
                 concept.name, tau, mu)
        return output_features_delta(lm, saes, self.chosen, on, off, tau=tau, mu=mu,
                                     method="features", concept=concept.name,
                                     n_features=len(self.chosen),
                                     chosen=[[f.layer, f.feature] for f in self.chosen])

    def fit_saes(self, lm: LM, corpus: TextCorpus | None = None, *, names: Sequence[str] = (),
                 progress: bool = True) -> dict[int, TopKDictionary]:
        """Train (or load from the cache) the per-layer MLP-output SAEs with this eraser's
        settings, and keep them for every later :meth:`erase`.

        The one place the SAE settings are read, so a benchmark that times the training apart
        gets exactly the SAEs :meth:`erase` would have trained. Without ``corpus`` the text is
        :meth:`corpus`."""
        if corpus is None:
            corpus = self.corpus(lm, names, progress=progress)
        self.saes = train_output_saes(lm, corpus, self.layers, n_features=self.sae_features,
                                      k=self.sae_k, steps=self.sae_steps,
                                      n_tokens=self.sae_tokens, progress=progress)
        return self.saes

    def corpus(self, lm: LM, names: Sequence[str] = (), *,
               progress: bool = True) -> TextCorpus:
        """The SAEs' training text: ``sae_text`` first when given (a .txt file of blank-line
        separated documents, a .jsonl of ``text`` fields, or a folder of them: real text about
        a concept the model writes little about), then :func:`.sae.feature_corpus` on the
        bundled concepts plus ``names`` (a concept outside the bundle needs its own topical
        text, and so new SAEs). The SAEs see its first ``sae_tokens`` tokens."""
        # read first: a bad path fails before minutes of sampling, not after
        own = TextCorpus.from_path(self.sae_text) if self.sae_text is not None else None
        bundled = [c.name for c in bundled_concepts()]
        corpus = feature_corpus(lm, [*bundled, *(n for n in names if n not in bundled)],
                                progress=progress)
        if own is None:
            return corpus
        corpus = TextCorpus(own.documents + corpus.documents)
        corpus.name = f"features-{corpus.fingerprint()}"
        return corpus

    def _mu_row(self) -> Iterator[float]:
        """The grid's μ values, then doubling past its end up to ``mu_max``: a row that is
        still inside the budget at the grid's last μ goes on (the caller stops a row at its
        first failure), so the chosen setting never sits on the grid's edge by accident."""
        grid = sorted(set(self.mus))
        yield from grid
        mu = 2 * grid[-1] if grid and grid[-1] > 0 else 1.0
        while mu <= self.mu_max:
            yield mu
            mu *= 2

    def _tune(self, lm: LM, concept: Concept, controls: Sequence[Probe],
              saes: dict[int, TopKDictionary], on: _Firing,
              off: _Firing) -> tuple[int, float, float]:
        search = BudgetSearch(self.budget, lm, concept, controls, general_text(split="tune"))
        self.trials = search.trials
        for n in sorted(set(self.n_features_grid)):
            if n > len(self.ranked) and n != min(self.n_features_grid):
                continue  # fewer features than asked: a smaller n already covers them
            for tau in sorted(set(self.taus), reverse=True):
                for mu in self._mu_row():
                    delta = output_features_delta(lm, saes, self.ranked[:n], on, off,
                                                  tau=tau, mu=mu)
                    ok, _ = search.score_delta({"n_features": n, "tau": tau, "mu": mu}, delta)
                    if not ok:
                        break  # a stronger push would leave the budget too
        if search.best is None:
            raise ConceptError(f"no setting of n_features {list(self.n_features_grid)} × tau "
                               f"{list(self.taus)} × mu {list(self.mus)} keeps "
                               f"{search.budget.describe(concept)}: loosen the budget")
        best = search.best[0]
        return best["n_features"], best["tau"], best["mu"]
