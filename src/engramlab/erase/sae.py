"""Sparse autoencoders of the MLP outputs, one per layer: the disentangler PISCES uses.

PISCES (Gur-Arieh et al. 2025) decomposes MLP vectors with pretrained per-layer SAEs of the MLP
*outputs* (GemmaScope ``mlp`` 16k/65k, LlamaScope ``m``), encodes each value vector with the
SAE's encoder, and edits the concept's features. None exists for most models and none can be
downloaded here, so we train them: a TopK autoencoder (:class:`.dictionary.TopKDictionary`,
as for the value vectors) per layer, on the MLP output at every token of a corpus.

The corpus matters more than the size. An SAE only learns features for what is frequent in its
data, and the paper's SAEs saw billions of tokens of web text, in which Harry Potter is common.
With 13k tokens of generic sampled text (session 7) no feature fired specifically on any bundled
concept. :func:`feature_corpus` therefore adds text the model itself writes when started on each
concept's name ("Harry Potter is", "Facts about Harry Potter:", ...) to the general text
(Wikipedia leads), so each concept is a few percent of the data. This is a deviation: the SAEs
are trained knowing which concepts will be asked about, though not which tokens or probes (the
probes and near controls are never in the corpus). A concept outside the corpus can still be
erased, but needs the corpus rebuilt with its name (the cache key includes the corpus).

Everything is cached per model fingerprint, corpus fingerprint, layer and setting, and the SAE
carries that key, so an SAE trained for other weights is refused (as a value dictionary is).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .._io import keyed_path, read_cached
from ..data.corpus import TextCorpus, sample_corpus, wiki_corpus
from ..errors import ConceptError
from ..models.lm import LM
from ..trace import Trace, run_model
from .dictionary import TopKDictionary, explained_variance, fit_dictionary

log = logging.getLogger(__name__)

TOPIC_STARTERS = ("{} is", "{} was", "The story of {}", "Facts about {}:", "{} is known for",
                  "Everyone knows {}", "In {},", "{} became")


def feature_corpus(lm: LM, names: Sequence[str], *, general_tokens: int = 40_000,
                   topic_tokens_per_name: int = 3_000, seed: int = 0,
                   progress: bool = True) -> TextCorpus:
    """Real text (the first ``general_tokens`` of the Wikipedia corpus) plus text the model
    writes when started on each of ``names``."""
    if not names:
        raise ConceptError("feature_corpus needs at least one concept name to write about")
    general = wiki_corpus().head(lm, general_tokens)  # the fitting part: it starts the corpus
    starters = [s.format(n) for n in sorted(set(names)) for s in TOPIC_STARTERS]
    topical = sample_corpus(lm, n_tokens=topic_tokens_per_name * len(set(names)),
                            seed=seed + 2, doc_tokens=96, starters=starters, progress=progress)
    corpus = TextCorpus(general.documents + topical.documents)
    corpus.name = f"features-{corpus.fingerprint()}"
    return corpus


@torch.no_grad()
def mlp_outputs(lm: LM, corpus: TextCorpus, layers: Sequence[int], *, n_tokens: int,
                seq_len: int = 128, batch_size: int = 16,
                progress: bool = True) -> dict[int, torch.Tensor]:
    """Every token's MLP output at ``layers``, ``{layer: [tokens, d_model]}`` float32 on CPU.

    Documents are packed (EOS between them), so no forward is spent on padding."""
    rows = corpus.token_rows(lm, seq_len=seq_len, max_tokens=n_tokens)
    points = [f"mlp_out.{layer}" for layer in layers]
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for s in tqdm(range(0, len(rows), batch_size), desc="MLP outputs", disable=not progress,
                  leave=False):
        ids = rows[s:s + batch_size].to(lm.device)
        with Trace(lm).capture(*points) as tr:
            run_model(lm, ids, stop_after=max(layers))
        for layer, point in zip(layers, points, strict=True):
            out[layer].append(tr[point].reshape(-1, lm.layout.d_model).float().cpu())
    return {layer: torch.cat(v) for layer, v in out.items()}


def default_layers(lm: LM) -> list[int]:
    """The upper-middle layers, from two thirds of the depth to three before the last: on
    SmolLM2 (30 layers) 20-26, around the layers where its concept vectors sit (23-24 for
    most bundled concepts)."""
    n = lm.layout.n_layers
    first = (2 * n) // 3
    return list(range(first, max(first + 1, n - 3)))


def train_output_saes(lm: LM, corpus: TextCorpus, layers: Sequence[int] | None = None, *,
                      n_features: int = 2048, k: int = 16, steps: int = 1500,
                      batch_size: int = 1024, lr: float = 1e-3, n_tokens: int = 100_000,
                      seed: int = 0, use_cache: bool = True,
                      progress: bool = True) -> dict[int, TopKDictionary]:
    """One TopK SAE of the MLP output per layer (each cached on its own)."""
    layers = [lm.layout.check_layer(i) for i in (layers if layers is not None
                                                  else default_layers(lm))]
    keys = {layer: {"model": lm.fingerprint(), "kind": "mlp_out", "layers": [layer],
                    "corpus": corpus.fingerprint(), "n_tokens": n_tokens,
                    "n_features": n_features, "k": k, "steps": steps,
                    "batch_size": batch_size, "lr": lr, "seed": seed} for layer in layers}
    saes: dict[int, TopKDictionary] = {}
    paths = {}
    for layer, key in keys.items():
        paths[layer] = keyed_path("dictionaries", "mlp-out", key, ".safetensors")
        found = read_cached(paths[layer], lambda p, k=key: TopKDictionary.load(p, expect=k)) \
            if use_cache else None
        if found is not None:
            saes[layer] = found
    todo = [layer for layer in layers if layer not in saes]
    if todo:
        acts = mlp_outputs(lm, corpus, todo, n_tokens=n_tokens, progress=progress)
        for layer in todo:
            x = acts.pop(layer)
            sae = fit_dictionary(x, n_features=n_features, k=k, steps=steps,
                                 batch_size=batch_size, lr=lr, seed=seed, progress=progress)
            sae.key = keys[layer]
            log.info("MLP-output SAE of layer %d: explained variance %.3f", layer,
                     explained_variance(sae, x[:20_000]))
            if use_cache:
                sae.save(paths[layer])
            saes[layer] = sae
    return {layer: saes[layer] for layer in layers}
