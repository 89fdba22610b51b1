from __future__ import annotations

import json

import pytest
import torch

from engramlab import ParamDelta, WeightDelta
from engramlab.errors import DeltaMismatchError
from tests.conftest import make_tiny, tiny_text


def _rank_one(lm, layer=1, scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(lm.d_model, generator=g) * scale
    v = torch.randn(lm.d_mlp, generator=g)
    su, sv = lm.layout.to_storage(layer, u, v)
    return WeightDelta.for_model(lm, {lm.layout.value_param_name(layer): ParamDelta(u=su, v=sv)},
                                 method="test"), u, v


def _state(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def test_rank_one_delta_changes_the_value_view_by_u_vT_in_every_family(tiny):
    delta, u, v = _rank_one(tiny)
    before = tiny.layout.value_weight(1).clone()
    with delta.applied(tiny):
        after = tiny.layout.value_weight(1).clone()
    assert torch.allclose(after - before, torch.outer(u, v), atol=1e-5)


def test_apply_then_revert_is_bit_identical_and_restores_fingerprint(tiny):
    before, fp = _state(tiny), tiny.fingerprint()
    delta, _, _ = _rank_one(tiny)
    delta.apply(tiny)
    assert tiny.fingerprint() != fp
    delta.revert(tiny)
    after = _state(tiny)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert tiny.fingerprint() == fp


def test_an_exact_revert_keeps_the_fingerprint_known_but_not_after_other_changes():
    lm = make_tiny("llama")
    fp = lm.fingerprint()
    delta, _, _ = _rank_one(lm)
    with delta.applied(lm):
        assert lm.known_fingerprint() is None  # the edited weights are not hashed yet
    assert lm.known_fingerprint() == fp  # not hashed again: the weights are the same bits
    # a weight changed while the delta was applied: the revert cannot vouch for the weights
    other = lm.layout.value_weight(2)
    with delta.applied(lm), torch.no_grad():
        other[3, 7] += 1e-3
    assert lm.known_fingerprint() is None
    assert lm.fingerprint() != fp
    # a second delta applied in between (and left applied) is not forgotten either
    fp2 = lm.fingerprint()
    second, _, _ = _rank_one(lm, layer=0, seed=1)
    delta.apply(lm, force=True)
    second.apply(lm, force=True)
    delta.revert(lm)
    assert lm.known_fingerprint() is None
    second.revert(lm)
    assert lm.known_fingerprint() is None and lm.fingerprint() == fp2


def test_fingerprint_sees_a_single_small_weight_change():
    lm = make_tiny("llama")
    fp = lm.fingerprint()
    assert lm.fingerprint() == fp  # memoised and stable
    with torch.no_grad():
        lm.layout.value_weight(2)[3, 7] += 1e-3
    assert lm.fingerprint() != fp


def test_low_rank_and_dense_deltas_apply_the_same_change():
    lm = make_tiny("gpt2")
    delta, _, _ = _rank_one(lm)
    dense = WeightDelta({n: ParamDelta(dense=d.to_dense()) for n, d in delta.entries.items()},
                        delta.meta)
    text = tiny_text()
    with torch.no_grad(), delta.applied(lm):
        a = lm.model(**lm.tokenize(text)).logits
    with torch.no_grad(), dense.applied(lm):
        b = lm.model(**lm.tokenize(text)).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_norm_overlap_and_compose_match_dense_algebra():
    lm = make_tiny("llama")
    a, _, _ = _rank_one(lm, seed=1)
    b, _, _ = _rank_one(lm, seed=2)
    name = next(iter(a.entries))
    da, db = a.entries[name].to_dense().double(), b.entries[name].to_dense().double()
    assert a.norm() == pytest.approx(float(da.norm()), rel=1e-6)
    assert a.overlap(b) == pytest.approx(float((da * db).sum() / da.norm() / db.norm()), abs=1e-6)
    assert a.overlap(a) == pytest.approx(1.0)
    both = a + b
    assert both.ranks()[name] == 2
    assert torch.allclose(both.entries[name].to_dense().double(), da + db, atol=1e-5)
    dense_b = WeightDelta({name: ParamDelta(dense=db.float())})
    assert a.inner(dense_b) == pytest.approx(float((da * db).sum()), rel=1e-5)


def test_a_long_sequence_of_composed_deltas_saves_with_every_part_in_order(tmp_path):
    """A sequential run adds one delta per edit: 1,500 of them must still save and load, each
    edit's metadata kept, in order, whichever way the sums were grouped."""
    lm = make_tiny("llama")
    one, _, _ = _rank_one(lm, scale=1e-3)
    total = None
    for i in range(1500):
        step = WeightDelta(one.entries, {**one.meta, "step": i})
        total = step if total is None else total + step
    paired = (total + WeightDelta(one.entries, {**one.meta, "step": 1500})) + (
        WeightDelta(one.entries, {**one.meta, "step": 1501})
        + WeightDelta(one.entries, {**one.meta, "step": 1502}))
    loaded = WeightDelta.load(paired.save(tmp_path / "long"), lm)
    assert [p["step"] for p in loaded.meta["parts"]] == list(range(1503))
    assert loaded.meta["method"] == "compose"
    assert loaded.ranks()[next(iter(one.entries))] == 1503


def test_save_load_round_trip_keeps_tensors_and_metadata(tmp_path):
    lm = make_tiny("gpt_neox")
    delta, _, _ = _rank_one(lm)
    delta.meta["requests"] = [{"subject": "x"}]
    path = delta.save(tmp_path / "edit.delta")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edit.delta"]  # no temp leftovers
    loaded = WeightDelta.load(path, lm)
    name = next(iter(delta.entries))
    assert torch.equal(loaded.entries[name].u, delta.entries[name].u)
    assert loaded.meta["requests"] == [{"subject": "x"}]
    assert loaded.meta["model_fingerprint"] == lm.fingerprint()
    assert json.loads((path / "delta.json").read_text())["meta"]["method"] == "test"


def test_delta_for_other_weights_is_refused_unless_forced(tmp_path):
    lm_a, lm_b = make_tiny("llama", seed=0), make_tiny("llama", seed=1)
    delta, _, _ = _rank_one(lm_a)
    path = delta.save(tmp_path / "d")
    with pytest.raises(DeltaMismatchError, match="fingerprint"):
        WeightDelta.load(path, lm_b)
    with pytest.raises(DeltaMismatchError, match="force"):
        delta.apply(lm_b)
    WeightDelta.load(path, lm_b, force=True).apply(lm_b, force=True)


def test_delta_for_another_architecture_is_refused_even_when_forced():
    delta, _, _ = _rank_one(make_tiny("llama"))
    other = make_tiny("gpt2")
    with pytest.raises(DeltaMismatchError, match="does not have"):
        delta.apply(other, force=True)


def test_applying_twice_is_refused_and_sequential_stack_reverts_in_reverse():
    lm = make_tiny("qwen2")
    before = _state(lm)
    d1, _, _ = _rank_one(lm, seed=1)
    d1.apply(lm)
    with pytest.raises(DeltaMismatchError, match="already applied"):
        d1.apply(lm)
    d2, _, _ = _rank_one(lm, seed=2)  # made on the edited weights: a stack
    d2.apply(lm)
    d2.revert(lm)
    d1.revert(lm)
    assert all(torch.equal(before[n], p) for n, p in lm.model.named_parameters())


def test_corrupt_delta_file_is_a_clear_error(tmp_path):
    lm = make_tiny("llama")
    delta, _, _ = _rank_one(lm)
    path = delta.save(tmp_path / "d")
    data = (path / "delta.safetensors").read_bytes()
    (path / "delta.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(DeltaMismatchError, match="corrupt"):
        WeightDelta.load(path)
    with pytest.raises(FileNotFoundError, match="not a saved delta"):
        WeightDelta.load(tmp_path / "missing")


@pytest.mark.embedded
def test_embedded_delta_apply_revert_is_bit_identical(smol):
    name = smol.layout.value_param_name(8)
    before = dict(smol.model.named_parameters())[name].detach().clone()
    fp = smol.fingerprint()
    delta, _, _ = _rank_one(smol, layer=8, scale=0.01)
    with delta.applied(smol):
        assert smol.fingerprint() != fp
    assert torch.equal(dict(smol.model.named_parameters())[name], before)
    assert smol.fingerprint() == fp
