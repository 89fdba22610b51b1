"""DeltaEdit: the noise band, the avoided directions, and AlphaEdit as its limit."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from engramlab import EditRequest
from engramlab.edit import AlphaEdit, DeltaEdit, EditState, get_editor
from engramlab.edit.base import BandConfig
from engramlab.edit.deltaedit import band_decisions, dominant_directions
from engramlab.edit.keys import at_subject
from engramlab.edit.targets import TargetConfig, optimise_targets
from engramlab.errors import RequestError
from engramlab.stats import KeyStats
from tests.conftest import make_tiny


def _req(subject: str, target: str, prompt: str = "w1 {} w2 w3") -> EditRequest:
    return EditRequest(prompt=prompt, subject=subject, target_new=target, target_true="w41")


REQUESTS = [_req("w5 w6", "w40"), _req("w7", "w42", "{} w2 w3 w4"), _req("w8", "w43", "w1 {} w2"),
            _req("w9 w10", "w44"), _req("w11", "w45", "{} w3"), _req("w12", "w46", "w2 {} w1")]


def _stats(lm, layers):
    """C₀ of rank d_mlp / 2 per layer: AlphaEdit's null space is the other half."""
    out = {}
    for layer in layers:
        g = torch.Generator().manual_seed(layer)
        a = torch.randn(lm.d_mlp, lm.d_mlp // 2, generator=g, dtype=torch.float64)
        out[layer] = KeyStats(layer, a @ a.T * 100, 100)
    return out


def _editor(cls, lm, **band):
    return cls(layers=[0, 1], key_stats=_stats(lm, [0, 1]), templates=[[3, 1]],
               target={"steps": 4}, nullspace_threshold=1e-8,
               **({"band": band} if band else {}))


def _sequential(editor, lm, batches):
    state, deltas = None, []
    for batch in batches:
        delta, state = editor.step(lm, batch, state)
        deltas.append(delta)
        delta.apply(lm, force=True)
    for d in reversed(deltas):
        d.revert(lm)
    return deltas, state


def test_band_triggers_only_on_a_norm_far_outside_it_and_is_not_moved_by_it():
    config = BandConfig(width=3.0, warmup=3, momentum=0.5)
    norms = [None, 1.0, 1.2, 0.9, 1.1, 5.0, 1.0]
    leaves, band = band_decisions({}, norms, config)
    # the running mean and variance, recomputed by hand over the requests inside the band
    mean, var = 1.0, 0.0
    for n in (1.2, 0.9, 1.1, 1.0):
        mean = 0.5 * mean + 0.5 * n
        var = 0.5 * var + 0.5 * (n - mean) ** 2
    assert leaves == [False, False, False, False, False, True, False]
    assert band["mean"] == pytest.approx(mean) and band["var"] == pytest.approx(var)
    assert band["seen"] == len(norms) and band["projected"] == 1
    # within the warm-up nothing leaves, however far
    assert not any(band_decisions({}, [1.0, 1.1, 50.0], config)[0])
    # an infinitely wide band never triggers
    assert not any(band_decisions({}, norms, BandConfig(width=math.inf, warmup=0))[0])


def test_dominant_directions_are_the_top_eigenvectors_above_the_floor():
    g = torch.Generator().manual_seed(0)
    past = torch.randn(12, 30, generator=g)
    noise = torch.randn(12, generator=g)
    gram = (past.double() @ past.double().T) + torch.outer(noise.double(), noise.double())
    values = torch.linalg.eigvalsh(gram)
    floor = float(values[6])  # five eigenvalues lie above it
    u = dominant_directions(past, noise, BandConfig(floor=floor, space=1.0))
    assert u.shape == (12, 5)
    assert torch.allclose(u.T @ u, torch.eye(5), atol=1e-5)
    rayleigh = torch.diagonal(u.double().T @ gram @ u.double())
    assert torch.allclose(rayleigh, values[-5:].flip(0), rtol=1e-4)
    # space caps how many are avoided: a quarter of 12 is 3
    assert dominant_directions(past, noise, BandConfig(floor=floor, space=0.25)).shape[1] == 3


def test_targets_avoiding_a_span_end_orthogonal_to_it():
    lm = make_tiny("llama")
    basis, _ = torch.linalg.qr(torch.randn(lm.d_model, 4, generator=torch.Generator()
                                           .manual_seed(1)))
    cfg = TargetConfig(steps=5, lr=0.1, early_stop=0.0)
    reqs = REQUESTS[:2]
    free = optimise_targets(lm, reqs, "resid.1", ["{}"], cfg)
    kept = optimise_targets(lm, reqs, "resid.1", ["{}"], cfg, avoid=[basis, None])
    assert float((basis.T @ free.delta[0]).norm()) > 1e-3 * float(free.delta[0].norm())
    assert float((basis.T @ kept.delta[0]).norm()) < 1e-5 * float(kept.delta[0].norm())
    # a request with nothing to avoid follows its own path, as if alone
    assert torch.allclose(kept.delta[1], free.delta[1], atol=1e-6)


def test_deltaedit_with_an_infinitely_wide_band_is_alphaedit_bit_for_bit(isolated_cache):
    lm = make_tiny("llama")
    batches = [REQUESTS[:2], REQUESTS[2:4], REQUESTS[4:]]
    alpha, _ = _sequential(_editor(AlphaEdit, lm), lm, batches)
    delta, state = _sequential(_editor(DeltaEdit, lm, width=math.inf, warmup=0), lm, batches)
    for a, d in zip(alpha, delta, strict=True):
        for name, entry in a.entries.items():
            assert float(entry.to_dense().abs().max()) > 0  # real updates, not zeros
            assert torch.equal(entry.to_dense(), d.entries[name].to_dense())
    assert state.band.get("projected", 0) == 0


def test_deltaedit_keeps_the_past_update_and_projects_requests_outside_the_band(
        isolated_cache, tmp_path):
    lm = make_tiny("llama")
    batches = [[r] for r in REQUESTS]
    editor = _editor(DeltaEdit, lm, width=0.0, warmup=0, floor=0.0, space=0.5)
    deltas, state = _sequential(editor, lm, batches)
    # the past update at the target layer is the sum of every batch's update there
    name = lm.layout.value_param_name(1)
    total = sum(d.entries[name].to_dense().double() for d in deltas)
    past = state.past[1].double()
    assert torch.allclose(lm.layout.dense_to_storage(1, past).double(), total, atol=1e-5)
    assert state.band["projected"] >= 1  # a zero-width band lets nothing through
    alpha, _ = _sequential(_editor(AlphaEdit, lm), lm, batches)
    assert any(not torch.allclose(a.entries[name].to_dense(), d.entries[name].to_dense())
               for a, d in zip(alpha, deltas, strict=True))
    # the state saves and loads with its past update and band
    state.save(tmp_path / "state")
    back = EditState.load(tmp_path / "state")
    assert torch.equal(back.past[1], state.past[1]) and back.band == state.band


def test_deltaedit_refuses_a_state_from_another_model(isolated_cache):
    lm = make_tiny("llama")
    editor = _editor(DeltaEdit, lm)
    _, state = editor.step(lm, REQUESTS[:1], None)
    state.past[1] = torch.zeros(lm.d_model + 1, lm.d_mlp)
    with pytest.raises(RequestError, match="another model"):
        editor.step(lm, REQUESTS[1:2], state)


def test_deltaedit_settings_are_its_own():
    lm = make_tiny("llama")
    with pytest.raises(RequestError, match="not setting"):
        get_editor("memit", **{"band.width": 2.0})
    editor = get_editor("deltaedit", **{"band.width": "2.5"})
    hp = editor.hparams_for(lm)
    assert hp.band.width == 2.5
    # the preset writes DeltaEdit as AlphaEdit plus its band
    alpha = get_editor("alphaedit").hparams_for(lm)
    assert (hp.layers, hp.target, hp.alpha) == (alpha.layers, alpha.target, alpha.alpha)
    # a nested group it changes merges field by field (Llama-3: only the weight decay)
    from engramlab.presets import load_preset

    llama_d, llama_a = (load_preset(lm, m, "llama3-8b") for m in ("deltaedit", "alphaedit"))
    assert llama_d.target.weight_decay == 0.5 != llama_a.target.weight_decay
    assert dataclasses.replace(llama_d.target, weight_decay=llama_a.target.weight_decay) == \
        llama_a.target
    assert llama_d.stats == llama_a.stats and llama_d.band.width == 1.5
    # and a group it leaves alone comes whole from AlphaEdit's section (SmolLM2's relation)
    from engramlab.edit.relation import RelationConfig

    smol_d, smol_a = (load_preset(lm, m, "smollm2-135m") for m in ("deltaedit", "alphaedit"))
    assert smol_a.relation != RelationConfig() and smol_d.relation == smol_a.relation


# superimposed noise --------------------------------------------------------------------------
def _cases(requests):
    from engramlab.data.records import EditCase

    return [EditCase(r, paraphrase_prompts=("w3 " + r.prompt.format(r.subject),)) for r in requests]


def test_noise_recorder_measures_the_past_updates_response_and_the_drift(isolated_cache):
    from engramlab.edit import run_protocol

    lm = make_tiny("llama")
    batches = [REQUESTS[:2], REQUESTS[2:4], REQUESTS[4:]]
    result = run_protocol(lm, _editor(AlphaEdit, lm), _cases(REQUESTS), protocol="sequential",
                          batch_size=2, eval_every=1, noise=True)
    noise = result.noise
    assert [s["edits"] for s in noise["steps"]] == [2, 4, 6]
    assert "noise" not in noise["steps"][0]["per_request"]  # nothing was edited before
    # recomputed by hand: the same steps, the past update's response at each new key
    editor = _editor(AlphaEdit, lm)
    name = lm.layout.value_param_name(1)
    state, deltas, targets = None, [], []
    for batch in batches:
        d, state = editor.step(lm, batch, state)
        targets.append(editor.last_targets.value)
        if deltas:
            past = sum(x.entries[name].to_dense().double() for x in deltas)
            keys = at_subject(lm, batch, ["mlp_key.1"], ["{}"], "last")["mlp_key.1"].double()
            want = (keys @ lm.layout.dense_to_storage(1, past).T).norm(dim=1)
            got = torch.tensor(noise["steps"][len(deltas)]["per_request"]["noise"])
            assert torch.allclose(got.double(), want, rtol=1e-4)
        d.apply(lm, force=True)
        deltas.append(d)
    # the drift at the end: every edit's state at layer 1 against its target
    states = at_subject(lm, REQUESTS, ["resid.1"], ["{}"], "last")["resid.1"]
    drift = (states - torch.cat(targets)).norm(dim=1)
    keys = at_subject(lm, REQUESTS, ["mlp_key.1"], ["{}"], "last")["mlp_key.1"].double()
    dense = [lm.layout.dense_to_storage(1, x.entries[name].to_dense().double()) for x in deltas]
    later = torch.stack([sum((dense[j] @ keys[i] for j in range(i // 2 + 1, 3)),
                             torch.zeros(lm.d_model, dtype=torch.float64)) for i in range(6)])
    for d in reversed(deltas):
        d.revert(lm)
    last = noise["points"][-1]
    assert last["edits"] == 6
    assert last["mean_drift"] == pytest.approx(float(drift.mean()), rel=1e-4)
    assert last["mean_later_noise"] == pytest.approx(float(later.norm(dim=1).mean()), rel=1e-4)
    assert float(later.norm(dim=1)[:4].min()) > 0  # the check above is not of zeros
    assert [p["edits"] for p in noise["points"]] == [2, 4, 6]
    assert result.curve[-1]["mean_drift"] == last["mean_drift"]


def test_noise_is_refused_outside_a_sequential_memit_family_run(capsys):
    from engramlab.cli import main

    assert main(["edit", "--method", "alphaedit", "--noise", "--model", "none"]) == 2
    assert "--protocol sequential" in capsys.readouterr().err
    assert main(["edit", "--method", "rome", "--protocol", "sequential", "--noise",
                 "--model", "none"]) == 2
    assert "target layer" in capsys.readouterr().err


def test_noise_steps_count_deltaedits_projected_requests(isolated_cache):
    from engramlab.edit import run_protocol

    lm = make_tiny("llama")
    editor = _editor(DeltaEdit, lm, width=0.0, warmup=0, floor=0.0, space=0.5)
    result = run_protocol(lm, editor, _cases(REQUESTS), protocol="sequential", batch_size=1,
                          noise=True)
    counts = [s["projected"] for s in result.noise["steps"]]
    _, state = _sequential(_editor(DeltaEdit, lm, width=0.0, warmup=0, floor=0.0, space=0.5),
                           lm, [[r] for r in REQUESTS])
    assert counts == sorted(counts) and counts[-1] == state.band["projected"] >= 1
