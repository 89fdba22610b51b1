"""Sparse-feature concept erasure in the parameters (PISCES).

Follows Gur-Arieh et al. 2025, "Precise In-Parameter Concept Erasure in Large Language Models"
(PISCES): a disentangler decomposes MLP vectors into features; the features of the concept are
found automatically (vocabulary projection and activation on concept text); every MLP vector
that carries one of them strongly is rewritten without it. Because the change is made in the
features' basis, vectors keep everything else they encode — more specific than zeroing them
(ConceptVectors) and deeper than fine-tuning.

Recipe, per layer of the dictionary:

1. **Label** each dictionary feature by the largest keyword z-score of its decoder direction's
   vocabulary projection (final norm + unembedding), and by how much more the model writes that
   direction (sum of the MLP outputs of all dictionary layers) on the concept's probes and text
   than on control probes and neutral text, in units of the control spread.
2. **Select** the ``n_features`` features with the highest vocabulary score among those whose
   score is at least ``min_vocab_z`` and whose activation is positive.
3. **Erase**: a value vector v_j is *affected* by feature f when the dictionary's code of
   v_j for f exceeds ``tau · max_i code_f(v_i)`` over all dictionary layers (the paper's τ).
   (A first version compared dense projections ``|d_f · v_j|`` instead: in 576 dimensions
   every vector projects a little on every direction, and τ = 0.2 touched 37k of SmolLM2's 46k
   vectors for 4 features, destroying the model.) Each affected
   vector loses its component in the span of the selected directions:
   ``v_j ← v_j − strength · Q Qᵀ v_j`` with Q an orthonormal basis of that span; with
   ``strength = 1`` the vector is left exactly orthogonal to every selected feature. Per layer
   this is a rank-|S| ``WeightDelta``.

Deviations from the paper:

* The disentangler is a TopK sparse dictionary trained on the value vectors themselves
  (:mod:`.dictionary`); the paper uses pretrained SAEs of the MLP *outputs*, which do not exist
  for most models.
* Features are labelled by keyword z-scores instead of an LLM judge reading their top tokens.
* The paper sets a feature's coefficient to ``μ · max`` in the SAE's code and keeps the SAE's
  reconstruction error; we project the direction out (μ = 0), which removes the feature exactly
  rather than through an imperfect encoder, and expose ``strength`` > 1 to push past zero as the
  paper's negative μ does.

What it does on SmolLM2-135M (CPU, session 7; ``bench/erase.py``) — it does **not** reach the
paper's result there, and the reason is the disentangler, not the removal:

* The value-vector dictionary (4096 features, k = 8, 1000 steps) explains 0.32 of the unit
  vectors' variance. Its features do not name concepts: the best keyword z-score for Harry
  Potter is 3.8 (a "both / respectively" feature); for The Beatles the two features above 6 are
  "now / today" and "early / earlier". Erasing every feature with z ≥ 3.5 and positive
  activation (13 for Shakespeare, τ = 0, strength 3) leaves 0.86 of its probes answered.
* Labelling the dictionary's features by activation instead (each vector's activation on the
  concept's text, summed through its code) finds no specific feature either (best
  specificity z 1.8 for Harry Potter, generic top tokens).
* An activation SAE of the MLP outputs, as in the paper but trained here (13k tokens of
  sampled text plus every bundled concept's text, 30 layers pooled, 4096 features, k = 16,
  explained variance 0.49, 800 s on 2 cores), has no Harry Potter feature either: the most
  specific fires 4.2x more on it than on any other concept, at a mean code of 0.003.

PISCES relies on SAEs trained on billions of tokens of large models (Gemma Scope, Llama
Scope). The removal step, :func:`features_delta`, takes any directions and per-vector codes, so
such an SAE's decoder rows and its encoding of the value vectors can be passed to it directly;
for the embedded model, ``concept-vectors`` is the in-parameter eraser that meets the bar.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..data.concepts import Concept, Probe, controls_for, general_text
from ..delta import ParamDelta, WeightDelta
from ..errors import ConceptError
from ..evaluate.erasure import _encode_prompts
from ..models.lm import LM
from ..trace import Trace
from .dictionary import ValueDictionary, train_dictionary
from .vectors import KeywordZ, keyword_tokens

log = logging.getLogger(__name__)


@dataclass
class FeatureLabel:
    feature: int
    vocab: float
    activation: float
    top_tokens: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@torch.no_grad()
def _written(lm: LM, texts: Sequence[str], layers: Sequence[int], directions: torch.Tensor,
             batch_size: int = 16) -> torch.Tensor:
    """Per token, how much the MLPs of ``layers`` together write along each direction,
    ``[tokens, n_directions]``."""
    points = [f"mlp_out.{layer}" for layer in layers]
    dirs = directions.to(lm.device, torch.float32)
    out = []
    for s in range(0, len(texts), batch_size):
        ids, lengths = _encode_prompts(lm, list(texts[s:s + batch_size]))
        mask = torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]
        with Trace(lm).capture(*points) as tr:
            lm.model(input_ids=ids, attention_mask=mask.long())
        total = sum(tr[p].float() for p in points)
        out.append((total[mask] @ dirs.T).cpu())  # type: ignore[union-attr]
    return torch.cat(out)


def label_features(lm: LM, dictionary: ValueDictionary, concept: Concept,
                   controls: Sequence[Probe], neutral: Sequence[str], *,
                   min_vocab_z: float = 4.0, max_candidates: int = 256) -> list[FeatureLabel]:
    """The concept's candidate features, best vocabulary score first, with their activation."""
    dictionary.check_model(lm)
    vocab = KeywordZ(lm, keyword_tokens(lm, [*concept.keywords, concept.name]))(
        dictionary.decoder)
    order = vocab.argsort(descending=True)[:max_candidates]
    order = order[vocab[order] >= min_vocab_z]
    if len(order) == 0:
        return []
    layers = dictionary.layers
    dirs = dictionary.decoder[order]
    on = _written(lm, [p.prompt for p in concept.probes] + concept.forget_text, layers, dirs)
    off = _written(lm, [p.prompt for p in controls] + list(neutral), layers, dirs)
    activation = (on.mean(0) - off.mean(0)) / (off.std(0) + 1e-6)
    logits = lm.logits_from_hidden(dirs.to(lm.device, lm.dtype)).float()
    tops = logits.topk(8, dim=-1).indices.tolist()
    return [FeatureLabel(int(f), float(vocab[f]), float(a), [lm.decode(t) for t in top])
            for f, a, top in zip(order.tolist(), activation.tolist(), tops, strict=True)]


def select_features(labels: Sequence[FeatureLabel], n_features: int,
                    min_activation: float = 0.0) -> list[FeatureLabel]:
    """The ``n_features`` best-named features that the model also writes more on the concept."""
    return [lab for lab in labels if lab.activation > min_activation][:n_features]


def feature_codes(lm: LM, dictionary: ValueDictionary, features: Sequence[int],
                  layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """How strongly each value vector of ``layers`` carries each feature: the dictionary's
    TopK code of the unit vector, ``{layer: [d_mlp, len(features)]}`` (zero where the feature
    is not among the vector's k)."""
    out = {}
    for layer in layers:
        w = lm.layout.value_weight(lm.layout.check_layer(layer)).detach().float().cpu()
        unit = w.T / w.T.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        out[layer] = dictionary.encode(unit)[:, list(features)]
    return out


def features_delta(lm: LM, directions: torch.Tensor, layers: Sequence[int], *, tau: float = 0.2,
                   strength: float = 1.0, codes: dict[int, torch.Tensor] | None = None,
                   **meta: object) -> WeightDelta:
    """Remove ``directions`` ``[n, d_model]`` from each strongly affected value vector.

    With ``codes`` (:func:`feature_codes`) a vector is affected when its code for a feature
    exceeds τ × that feature's largest code over all ``layers`` — the paper's rule, which
    touches only vectors the dictionary says carry the feature. Without, the dense projection
    on the unit direction is compared with τ × its largest value in the layer (for directions
    that come from no dictionary)."""
    if directions.ndim != 2 or directions.shape[1] != lm.layout.d_model:
        raise ConceptError(f"directions must be [n, {lm.layout.d_model}], got "
                           f"{tuple(directions.shape)}")
    if not 0.0 <= tau < 1.0:
        raise ConceptError(f"tau={tau} must lie in [0, 1): the share of the strongest "
                           "vector's projection a vector needs to count as affected")
    dirs = directions.double()
    q, _ = torch.linalg.qr(dirs.T)  # [d_model, n] orthonormal basis of their span
    entries = {}
    n_affected = {}
    layers = list(dict.fromkeys(lm.layout.check_layer(i) for i in layers))
    if codes is not None:
        missing = [i for i in layers if i not in codes]
        if missing:
            raise ConceptError(f"codes lack layers {missing}: compute them with feature_codes "
                               "for every layer to edit")
        top = torch.stack([codes[i].amax(0) for i in layers]).amax(0)  # [n]
    for layer in layers:
        w = lm.layout.value_weight(layer).detach().double().cpu()  # [d_model, d_mlp]
        if codes is not None:
            c = codes[layer]
            big = ((c > tau * top) & (c > 0)).T
        else:
            proj = (dirs / dirs.norm(dim=-1, keepdim=True)) @ w  # [n, d_mlp]
            big = proj.abs() > tau * proj.abs().amax(-1, keepdim=True)
        cols = big.any(0).nonzero().flatten()
        if len(cols) == 0:
            continue
        n_affected[layer] = len(cols)
        v = torch.zeros(w.shape[1], q.shape[1], dtype=torch.float64)
        v[cols] = (q.T @ w[:, cols]).T
        a, b = lm.layout.to_storage(layer, (-strength * q).float(), v.float())
        entries[lm.layout.value_param_name(layer)] = ParamDelta(u=a, v=b)
    return WeightDelta.for_model(lm, entries, affected=n_affected, **meta)


@dataclass
class FeatureEraser:
    """PISCES-style erasure through a sparse dictionary of the value vectors."""

    n_features: int = 16
    tau: float = 0.2
    strength: float = 1.0
    min_vocab_z: float = 4.0
    layers: list[int] | None = None
    dictionary_features: int = 4096
    dictionary_k: int = 8
    dictionary_steps: int = 1000
    dictionary: ValueDictionary | None = None
    chosen: list[FeatureLabel] = field(default_factory=list, init=False)

    def erase(self, lm: LM, concept: Concept,
              controls: Sequence[Probe] | None = None) -> WeightDelta:
        d = self.dictionary
        if d is None:
            d = train_dictionary(lm, n_features=self.dictionary_features, k=self.dictionary_k,
                                 steps=self.dictionary_steps)
            self.dictionary = d
        d.check_model(lm)
        controls = list(controls_for(concept) if controls is None else controls)
        labels = label_features(lm, d, concept, controls, general_text(split="tune"),
                                min_vocab_z=self.min_vocab_z)
        self.chosen = select_features(labels, self.n_features)
        if not self.chosen:
            raise ConceptError(f"no dictionary feature is named by {concept.name!r}'s keywords "
                               f"(z ≥ {self.min_vocab_z}) and written more on its text: lower "
                               "min_vocab_z or add keywords")
        layers = self.layers if self.layers is not None else d.layers
        feats = [lab.feature for lab in self.chosen]
        log.info("erasing %d features of %r", len(self.chosen), concept.name)
        return features_delta(lm, d.decoder[feats], layers, tau=self.tau,
                              strength=self.strength, codes=feature_codes(lm, d, feats, layers),
                              method="features", concept=concept.name,
                              features=[lab.feature for lab in self.chosen])
