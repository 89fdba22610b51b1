"""PISCES-style feature erasure: the dictionary, its cache, and the feature-removal algebra."""

from __future__ import annotations

import pytest
import torch

from engramlab.data import Concept
from engramlab.erase.dictionary import (
    ValueDictionary,
    explained_variance,
    fit_dictionary,
    train_dictionary,
)
from engramlab.erase.features import FeatureEraser, features_delta
from engramlab.errors import CacheError, ConceptError
from tests.conftest import make_tiny


def test_dictionary_recovers_sparse_structure():
    """Vectors built from 4 of 64 hidden directions are reconstructed almost exactly by a
    TopK-4 dictionary, and far better than by 4 random directions of the data."""
    g = torch.Generator().manual_seed(1)
    atoms = torch.nn.functional.normalize(torch.randn(64, 48, generator=g), dim=-1)
    codes = torch.zeros(4000, 64).scatter_(
        1, torch.randint(0, 64, (4000, 4), generator=g), torch.rand(4000, 4, generator=g) + 0.5)
    x = codes @ atoms
    d = fit_dictionary(x, n_features=128, k=4, steps=400, batch_size=256, lr=3e-3,
                       progress=False)
    assert d.decoder.shape == (128, 48)
    assert torch.allclose(d.decoder.norm(dim=-1), torch.ones(128), atol=1e-5)
    assert explained_variance(d, x) > 0.9
    untrained = fit_dictionary(x, n_features=128, k=4, steps=0, progress=False)
    assert explained_variance(untrained, x) < explained_variance(d, x) - 0.1


def test_dictionary_cache_round_trip_and_refusals(isolated_cache):
    lm = make_tiny("llama")
    d = train_dictionary(lm, n_features=32, k=2, steps=20, progress=False)
    assert d.layers == list(range(lm.layout.n_layers))
    files = list((isolated_cache / "dictionaries").iterdir())
    assert len(files) == 1
    again = train_dictionary(lm, n_features=32, k=2, steps=20, progress=False)
    assert torch.equal(again.decoder, d.decoder)
    files[0].write_bytes(b"not a safetensors file")  # corrupt: detected, retrained, rewritten
    with pytest.raises(CacheError, match="unreadable"):
        ValueDictionary.load(files[0])
    retrained = train_dictionary(lm, n_features=32, k=2, steps=20, progress=False)
    assert torch.allclose(retrained.decoder, d.decoder, atol=1e-5)
    assert ValueDictionary.load(files[0]).key == d.key
    with pytest.raises(CacheError, match="another key"):
        ValueDictionary.load(files[0], expect={**d.key, "k": 3})
    other = make_tiny("llama", seed=1)
    with pytest.raises(ConceptError, match="trained for model"):
        d.check_model(other)
    with pytest.raises(ConceptError, match="trained for model"):
        FeatureEraser(dictionary=d).erase(other, _a_concept())


def _a_concept() -> Concept:
    from engramlab.data import Probe

    return Concept("tiny", probes=[Probe("w1 w2 w3", "w4")], keywords=["w5"])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_removing_features_leaves_affected_vectors_orthogonal(family):
    """With τ = 0 every vector loses the span of the chosen directions exactly; with τ > 0
    only the strongly projecting ones do and the others are untouched; reverting is exact."""
    lm = make_tiny(family)
    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(3, lm.layout.d_model, generator=g)
    layers = [0, 1]
    before = {i: lm.layout.value_weight(i).detach().clone() for i in layers}
    delta = features_delta(lm, dirs, layers, tau=0.0)
    assert all(e.is_low_rank for e in delta.entries.values())
    with delta.applied(lm):
        for i in layers:
            w = lm.layout.value_weight(i).double()
            assert (dirs.double() @ w).abs().max() < 1e-5
    for i in layers:
        assert torch.equal(lm.layout.value_weight(i), before[i])

    tau = 0.5
    unit = torch.nn.functional.normalize(dirs, dim=-1)
    delta = features_delta(lm, dirs, [1], tau=tau)
    proj = (unit @ before[1].float()).abs()
    hit = (proj > tau * proj.amax(-1, keepdim=True)).any(0)
    assert 0 < int(hit.sum()) < lm.layout.d_mlp
    with delta.applied(lm):
        w = lm.layout.value_weight(1)
        assert (dirs @ w[:, hit]).abs().max() < 1e-4
        assert torch.allclose(w[:, ~hit], before[1][:, ~hit])
        assert torch.equal(lm.layout.value_weight(0), before[0])


def test_features_bad_input():
    lm = make_tiny("gpt2")
    with pytest.raises(ConceptError, match="tau"):
        features_delta(lm, torch.randn(2, lm.layout.d_model), [0], tau=1.5)
    with pytest.raises(ConceptError, match="directions must be"):
        features_delta(lm, torch.randn(2, lm.layout.d_model + 1), [0])
    with pytest.raises(Exception, match=r"out of range|layer"):
        features_delta(lm, torch.randn(2, lm.layout.d_model), [lm.layout.n_layers + 2])
    with pytest.raises(ConceptError, match="k="):
        fit_dictionary(torch.randn(10, 4), n_features=4, k=8, progress=False)


def test_codes_decide_which_vectors_lose_a_feature():
    """With the dictionary's codes, only vectors whose code for a chosen feature passes
    τ × its largest code change; they end orthogonal to it, and the rest stay bit-identical."""
    from engramlab.erase.features import feature_codes

    lm = make_tiny("llama")
    layers = [0, 1]
    d = train_dictionary(lm, layers, n_features=32, k=2, steps=30, use_cache=False,
                         progress=False)
    feats = [0, 5]
    codes = feature_codes(lm, d, feats, layers)
    top = torch.stack([codes[i].amax(0) for i in layers]).amax(0)
    before = {i: lm.layout.value_weight(i).detach().clone() for i in layers}
    delta = features_delta(lm, d.decoder[feats], layers, tau=0.3, codes=codes)
    with delta.applied(lm):
        n_hit = 0
        for i in layers:
            hit = ((codes[i] > 0.3 * top) & (codes[i] > 0)).any(1)
            n_hit += int(hit.sum())
            w = lm.layout.value_weight(i)
            assert (d.decoder[feats] @ w[:, hit].float()).abs().max() < 1e-4
            assert torch.equal(w[:, ~hit], before[i][:, ~hit])
        assert 0 < n_hit < len(layers) * lm.layout.d_mlp
    with pytest.raises(ConceptError, match="codes lack layers"):
        features_delta(lm, d.decoder[feats], [0, 1], codes={0: codes[0]})
