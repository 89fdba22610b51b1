"""Per-vector evidence that an MLP value vector belongs to a concept, for every layer at once.

Four kinds of evidence, each a ``[layers, d_mlp]`` tensor:

* **vocabulary** — project each value vector through the final norm and the unembedding (Geva et
  al. 2022; the ConceptVectors recipe) and take the largest z-score, within that vector's own
  vocabulary logits, of a token of the concept's keywords;
* **activation** — how much more the vector's coefficient (its MLP key) fires on the concept's
  prompts and text than on control prompts and neutral text, in units of the control spread;
  and **near activation**, how much more it fires on the concept's probes than on the tuning
  half of its *near controls* (the same kind of fact about its neighbours: other capitals for
  Paris), in the same units — low for the vectors that carry the concept's kind rather than
  the concept;
* **effect** — the first-order drop of the answers' log-probability if the vector were zeroed
  (activation × gradient on the coefficient, summed over positions: attribution patching, Nanda
  2023 / Syed et al. 2023), for the concept's probes and for control probes. One backward pass
  scores every vector of every layer; exact ablation then checks the chosen few;
* **direct** — how much the vector, weighted by its coefficient at the probe's last token, writes
  each probe's own answer into the logits (direct logit attribution, Elhage et al. 2021: the
  value vector through the final norm's gain and the centred unembedding row of the answer),
  averaged over the concept's probes. Unlike ``effect`` it is exact for the direct path and
  blind to the indirect one, so it cannot be fooled by the few vectors whose zeroing breaks
  everything downstream.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..batching import by_length, encode_prompts, length_mask, pad_rows, target_ids
from ..data.concepts import Concept, Probe
from ..evaluate.erasure import last_logits
from ..models.lm import LM
from ..trace import Trace, deepest_block, run_model


@dataclass
class VectorEvidence:
    layers: list[int]
    vocab: torch.Tensor
    activation: torch.Tensor
    effect: torch.Tensor
    control_effect: torch.Tensor
    direct: torch.Tensor
    near_activation: torch.Tensor | None = None  # None: the concept has no near controls

    def index(self, layer: int) -> int:
        return self.layers.index(layer)


_STOPWORDS = frozenset({"the", "a", "an", "of", "and", "in", "on", "to", "for", "by", "with"})


def keyword_tokens(lm: LM, keywords: Sequence[str]) -> list[int]:
    """Tokens that name the concept: each word of each keyword, with and without a leading
    space, lower-cased too, when it is one token or its first token carries most of it.

    A fragment such as " Her" (of "Hermione") or " The" (of "The Beatles") names nothing and
    matches every vector about pronouns or articles, so a first token counts only if it has at
    least four characters (" Herm", " Hogw" stay; " Her", " Hog" go).
    """
    ids: set[int] = set()
    for kw in keywords:
        for word in kw.split():
            if word.lower() in _STOPWORDS or len(word) < 3:
                continue
            for form in (word, " " + word, word.lower(), " " + word.lower()):
                toks = lm.encode(form)
                if not toks:
                    continue
                first = lm.decode(toks[0]).strip()
                if len(toks) == 1 or len(first) >= 4:
                    ids.add(toks[0])
    return sorted(ids)


class KeywordZ:
    """Largest keyword-token z-score of the vocabulary projection of residual-space vectors.

    The z-score needs each vector's mean and spread over the whole vocabulary, but the logits
    are linear in the normed vector h: mean = h·ū and variance = hᵀ Σ h with ū and Σ the mean
    and covariance of the unembedding rows. So only the keyword rows are multiplied (35 s → a
    fraction of a second for SmolLM2's 46k vectors). Models with an unembedding bias or a logit
    soft-cap take the direct path.
    """

    def __init__(self, lm: LM, token_ids: Sequence[int]) -> None:
        self.lm = lm
        self.tok = torch.tensor(list(token_ids), dtype=torch.long, device=lm.device)
        unembed = lm.layout.unembed
        self.linear = lm.unembedding_is_linear
        if self.linear and len(self.tok):
            weight = unembed.weight.detach().double()  # type: ignore[union-attr]
            self.mu = weight.mean(0)
            centred = weight - self.mu
            self.cov = centred.T @ centred / (weight.shape[0] - 1)
            self.rows = weight[self.tok]

    @torch.no_grad()
    def __call__(self, vectors: torch.Tensor, chunk: int = 512) -> torch.Tensor:
        """``[n]`` scores for ``vectors`` ``[n, d_model]`` (zeros without keyword tokens)."""
        out = torch.zeros(vectors.shape[0])
        if not len(self.tok):
            return out
        for s in range(0, vectors.shape[0], chunk):
            part = vectors[s:s + chunk].to(self.lm.device, self.lm.dtype)
            if self.linear:
                h = self.lm.layout.final_norm(part).double()
                sd = ((h @ self.cov) * h).sum(-1).clamp_min(1e-30).sqrt()
                z = (h @ self.rows.T - (h @ self.mu)[:, None]) / sd[:, None]
            else:
                logits = self.lm.logits_from_hidden(part).float()
                z = (logits[:, self.tok] - logits.mean(-1, keepdim=True)) \
                    / logits.std(-1, keepdim=True)
            out[s:s + chunk] = z.max(-1).values.float().cpu()
        return out


@torch.no_grad()
def vocab_scores(lm: LM, layers: Sequence[int], token_ids: Sequence[int]) -> torch.Tensor:
    """:class:`KeywordZ` of every value vector of ``layers``, ``[layers, d_mlp]``."""
    score = KeywordZ(lm, token_ids)
    return torch.stack([score(lm.layout.value_weight(layer).detach().T) for layer in layers]) \
        if layers else torch.zeros(0, lm.layout.d_mlp)


def _coefficients_and_effects(lm: LM, probes: Sequence[Probe], layers: Sequence[int],
                              batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Last-token coefficients ``[n, layers, d_mlp]`` and summed attribution ``[layers, d_mlp]``
    (first-order change of Σ log p(answer) when each vector is zeroed: −Σ a·∂/∂a)."""
    points = [f"mlp_key.{layer}" for layer in layers]
    coeffs, effect = [], torch.zeros(len(layers), lm.layout.d_mlp)
    for s in range(0, len(probes), batch_size):
        chunk = probes[s:s + batch_size]
        ids, lengths = encode_prompts(lm, [p.prompt for p in chunk])
        mask = length_mask(ids, lengths)
        answers = torch.tensor([target_ids(lm, p.prompt, p.answer)[0] for p in chunk],
                               device=ids.device)
        rows = torch.arange(len(chunk), device=ids.device)
        trace = Trace(lm).edit("embed", lambda t: t.detach().requires_grad_(True))
        with torch.enable_grad(), trace.capture(*points, detach=False) as tr:
            logits = lm.model(input_ids=ids, attention_mask=mask.long()).logits
            logp = torch.log_softmax(logits[rows, lengths - 1].float(), -1)[rows, answers]
            keys = [tr[pt] for pt in points]
            grads = torch.autograd.grad(logp.sum(), keys)
        for i, (k, g) in enumerate(zip(keys, grads, strict=True)):
            m = mask.unsqueeze(-1).to(k.dtype)
            effect[i] += (-(k.detach() * g * m).sum((0, 1))).float().cpu()
        coeffs.append(torch.stack([k.detach()[rows, lengths - 1].float().cpu() for k in keys], 1))
    return torch.cat(coeffs), effect


@torch.no_grad()
def token_activations(lm: LM, texts: Sequence[str], points: Sequence[str],
                      batch_size: int = 16) -> Iterator[dict[str, torch.Tensor]]:
    """Per batch of ``texts``, each point's activations at the real (unpadded) tokens,
    ``{point: [tokens, width]}``, float32 on CPU.

    Texts are batched shortest first, so short prompts are not padded to a paragraph's length:
    the tokens come back grouped by batch, not in the order of ``texts``."""
    texts = sorted(texts, key=len)
    for s in range(0, len(texts), batch_size):
        ids, lengths = encode_prompts(lm, list(texts[s:s + batch_size]))
        mask = length_mask(ids, lengths)
        with Trace(lm).capture(*points) as tr:
            run_model(lm, ids, mask.long(), stop_after=deepest_block(lm, points))
        yield {pt: tr[pt][mask].float().cpu() for pt in points}  # type: ignore[index]


@dataclass
class CoefficientMoments:
    """Running sums of each vector's coefficient over tokens: texts scored apart (short probe
    prompts, a long paragraph: no padding to the longest) combine exactly with ``+``."""

    total: torch.Tensor  # [layers, d_mlp] float64
    sq: torch.Tensor
    count: int

    def __add__(self, other: CoefficientMoments) -> CoefficientMoments:
        return CoefficientMoments(self.total + other.total, self.sq + other.sq,
                                  self.count + other.count)

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.total / max(self.count, 1)
        std = (self.sq / max(self.count, 1) - mean * mean).clamp_min(0).sqrt()
        return mean.float(), std.float()


@torch.no_grad()
def coefficient_moments(lm: LM, texts: Sequence[str], layers: Sequence[int],
                        batch_size: int = 16) -> CoefficientMoments:
    points = [f"mlp_key.{layer}" for layer in layers]
    total = torch.zeros(len(layers), lm.layout.d_mlp, dtype=torch.float64)
    sq = torch.zeros_like(total)
    count = 0
    for acts in token_activations(lm, texts, points, batch_size):
        for i, pt in enumerate(points):
            k = acts[pt].double()
            total[i] += k.sum(0)
            sq[i] += (k * k).sum(0)
        count += acts[points[0]].shape[0]
    return CoefficientMoments(total, sq, count)


def mean_coefficients(lm: LM, texts: Sequence[str], layers: Sequence[int],
                      batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation over every token of ``texts`` of each vector's coefficient."""
    return coefficient_moments(lm, texts, layers, batch_size).mean_std()


@torch.no_grad()
def answer_directions(lm: LM, probes: Sequence[Probe]) -> torch.Tensor:
    """``[n, d_model]``: the residual direction that raises each probe's answer logit above
    the vocabulary's mean — its unembedding row minus the mean row, times the final norm's gain
    (the norm's scale and, for LayerNorm, its centring are left out: a per-position factor)."""
    weight = lm.layout.unembed.weight.detach().float()  # type: ignore[union-attr]
    answers = [target_ids(lm, p.prompt, p.answer)[0] for p in probes]
    rows = weight[answers] - weight.mean(0)
    gain = getattr(lm.layout.final_norm, "weight", None)
    return rows * gain.detach().float() if gain is not None else rows


@torch.no_grad()
def direct_attribution(lm: LM, coefficients: torch.Tensor, probes: Sequence[Probe],
                       layers: Sequence[int]) -> torch.Tensor:
    """Mean over probes of coefficient × (value vector · answer direction), ``[layers, d_mlp]``;
    one layer at a time so GPT-2 XL's 48 value matrices never sit in float32 at once."""
    dirs = answer_directions(lm, probes).cpu()
    out = torch.zeros(len(layers), lm.layout.d_mlp)
    for i, layer in enumerate(layers):
        proj = dirs @ lm.layout.value_weight(layer).detach().float().cpu()  # [n, d_mlp]
        out[i] = (coefficients[:, i] * proj).mean(0)
    return out


def vector_evidence(lm: LM, concept: Concept, controls: Sequence[Probe],
                    layers: Sequence[int] | None = None, *,
                    neutral: Sequence[str] = (), max_controls: int = 32) -> VectorEvidence:
    """All four signals. Activation compares every token of the concept's prompts and text
    with every token of the control prompts and ``neutral`` text; near activation compares
    the concept's probe prompts with its tuning-half near controls (never the evaluation
    half); the attribution of the controls uses an evenly spread sample of at most
    ``max_controls``."""
    layers = [lm.layout.check_layer(i) for i in (layers or range(lm.layout.n_layers))]
    vocab = vocab_scores(lm, layers, keyword_tokens(lm, [*concept.keywords, concept.name]))
    # the probe prompts once: their moments serve the concept's activation and the near one
    probes = coefficient_moments(lm, [p.prompt for p in concept.probes], layers)
    mean_c, _ = (probes + coefficient_moments(lm, concept.forget_text, layers)).mean_std()
    mean_o, std_o = mean_coefficients(lm, [p.prompt for p in controls] + list(neutral), layers)
    activation = (mean_c - mean_o) / (std_o + 1e-6)
    near = concept.near("tune")
    near_activation = None
    if near:  # like with like: probe prompts against prompts of the same kind and length
        mean_p, _ = probes.mean_std()
        mean_n, _ = mean_coefficients(lm, [p.prompt for p in near], layers)
        near_activation = (mean_p - mean_n) / (std_o + 1e-6)
    sample = list(controls)[:: max(1, len(controls) // max_controls)][:max_controls]
    coeff_c, effect_c = _coefficients_and_effects(lm, concept.probes, layers)
    _, effect_o = _coefficients_and_effects(lm, sample, layers)
    direct = direct_attribution(lm, coeff_c, concept.probes, layers)
    # effects per probe, so concepts and controls of different sizes compare
    return VectorEvidence(layers, vocab, activation, effect_c / len(concept.probes),
                          effect_o / max(len(sample), 1), direct, near_activation)


@torch.no_grad()
def answer_logprob(lm: LM, probes: Sequence[Probe], batch_size: int = 64) -> float:
    """Mean log-probability of each probe's first answer token (prompts batched by length)."""
    rows = [lm.tokenizer(p.prompt)["input_ids"] for p in probes]
    total = 0.0
    for batch in by_length([len(r) for r in rows], batch_size):
        ids, lengths = pad_rows(lm, [rows[i] for i in batch])
        at = torch.arange(len(batch), device=ids.device)
        answers = torch.tensor([target_ids(lm, probes[i].prompt, probes[i].answer)[0]
                                for i in batch], device=ids.device)
        logits = last_logits(lm, ids, lengths)
        total += float(torch.log_softmax(logits.float(), -1)[at, answers].sum())
    return total / len(probes)


@torch.no_grad()
def ablation_drops(lm: LM, vectors: Sequence[tuple[int, int]], probes: Sequence[Probe],
                   controls: Sequence[Probe]) -> list[tuple[float, float]]:
    """Exact drop of the mean answer log-prob (concept, controls) when each vector is zeroed."""
    base = answer_logprob(lm, probes), answer_logprob(lm, controls)
    out = []
    for layer, j in vectors:
        w = lm.layout.value_weight(layer)
        saved = w[:, j].clone()
        w[:, j] = 0
        try:
            out.append((base[0] - answer_logprob(lm, probes),
                        base[1] - answer_logprob(lm, controls)))
        finally:
            w[:, j] = saved
    lm.invalidate_fingerprint()
    return out
