"""Editing algebra and mechanics on tiny random models (exact checks, no behaviour claims)."""

from __future__ import annotations

import pytest
import torch

from engramlab import EditRequest, Trace
from engramlab.edit import MEMIT, ROME, AlphaEdit, EditState, get_editor
from engramlab.edit.keys import at_subject
from engramlab.edit.prefix import length_groups
from engramlab.edit.prompts import encode_with_subject, pick_positions
from engramlab.edit.solve import (
    alphaedit_update,
    cov_factor,
    memit_update,
    null_space_basis,
    null_space_projector,
    rome_update,
    solve_cov,
)
from engramlab.edit.targets import TargetConfig, optimise_targets
from engramlab.errors import PointError, RequestError
from engramlab.presets import load_preset, match_preset
from engramlab.stats import KeyStats
from tests.conftest import FAMILIES, make_tiny


def _psd(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
    return a @ a.T / (3 * d)


def _steps(n: int) -> dict[str, dict[str, int]]:
    """Editor settings for a target optimisation of ``n`` steps."""
    return {"target": {"steps": n}}


def _req(subject: str = "w5 w6", target: str = "w40", prompt: str = "w1 {} w2 w3") -> EditRequest:
    return EditRequest(prompt=prompt, subject=subject, target_new=target, target_true="w41")


def _stats(lm, layers, seed=0):
    return {layer: KeyStats(layer, _psd(lm.d_mlp, seed + layer) * 100, 100) for layer in layers}


# algebra ------------------------------------------------------------------------------------
def test_rank_one_update_maps_key_to_target_value():
    c = _psd(16)
    g = torch.Generator().manual_seed(1)
    k, r = torch.randn(16, generator=g), torch.randn(8, generator=g)
    u, v = rome_update(k, r, c)
    assert torch.allclose((u @ v.T) @ k.double(), r.double(), atol=1e-10)
    # minimal change under C: ΔW is proportional to (C⁻¹k)ᵀ
    ck = torch.linalg.solve(c, k.double())
    assert torch.allclose(v[:, 0] / v[0, 0], ck / ck[0], atol=1e-8)


def test_a_kept_cholesky_factor_solves_c_like_a_fresh_solve():
    c = _psd(16)
    keys = torch.randn(16, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    factor = cov_factor(c)
    assert torch.allclose(factor @ factor.T, c.double(), atol=1e-10)
    assert torch.allclose(c.double() @ solve_cov(factor, keys), keys, atol=1e-8)
    # a singular C (rank 4 of 16) still factorises, with the smallest working ridge
    low = torch.randn(16, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    singular = low @ low.T
    f = cov_factor(singular)
    assert torch.isfinite(f).all()
    assert torch.allclose(f @ f.T, singular, atol=1e-5 * float(singular.diagonal().mean()))


def test_rome_edits_with_its_kept_factor_as_with_a_fresh_solve():
    lm = make_tiny("llama")
    stats = _stats(lm, [1])
    rome = ROME(layers=[1], key_stats=stats, templates=[], **{"target.steps": 3})
    d = rome.edit(lm, _req())
    v = next(iter(d.entries.values())).v[:, 0]
    keys = at_subject(lm, [_req()], ["mlp_key.1"], ["{}"], "last")["mlp_key.1"]
    fresh = torch.linalg.solve(stats[1].moment().double(), keys[0].double())
    assert torch.allclose(v.double() / v[0].double(), fresh / fresh[0], rtol=1e-4)


def test_memit_update_solves_regularised_least_squares():
    c = _psd(12)
    g = torch.Generator().manual_seed(2)
    keys, resid = torch.randn(12, 5, generator=g), torch.randn(7, 5, generator=g)
    u, v = memit_update(keys, resid, c, lam=3.0)
    dw = u @ v.T
    k = keys.double()
    # normal equations of min ‖ΔW K − R‖² + λ tr(ΔW C ΔWᵀ): ΔW (λC + KKᵀ) = R Kᵀ
    assert torch.allclose(dw @ (3.0 * c + k @ k.T), resid.double() @ k.T, atol=1e-9)


def test_null_space_projection_leaves_preserved_keys_unchanged():
    g = torch.Generator().manual_seed(3)
    preserved = torch.randn(20, 8, generator=g, dtype=torch.float64)  # spans 8 of 20 dims
    cov = preserved @ preserved.T / 8
    basis = null_space_basis(cov, threshold=1e-6)
    assert basis.shape == (20, 12)
    keys, resid = torch.randn(20, 3, generator=g), torch.randn(6, 3, generator=g)
    u, v = alphaedit_update(keys, resid, basis, None, alpha=1.0)
    dw = u @ v.T
    assert dw.abs().max() > 1e-3  # a real update ...
    assert (dw @ preserved).abs().max() < 1e-5  # ... invisible to the preserved keys


def test_alphaedit_update_matches_the_papers_closed_form():
    g = torch.Generator().manual_seed(4)
    keys, resid = torch.randn(10, 2, generator=g), torch.randn(5, 2, generator=g)
    basis = null_space_basis(_psd(10), threshold=0.5)
    p = null_space_projector(_psd(10), threshold=0.5)
    assert 0 < basis.shape[1] < 10 and torch.allclose(p, basis @ basis.T)
    prev = _psd(10, seed=9)
    u, v = alphaedit_update(keys, resid, basis, basis.T @ prev @ basis, alpha=2.0)
    k = keys.double()
    # the paper's d × d system, solved as written
    x = torch.linalg.solve(p @ (k @ k.T + prev) + 2.0 * torch.eye(10, dtype=torch.float64),
                           p @ k @ resid.double().T)
    assert torch.allclose(u @ v.T, x.T, atol=1e-10)


def test_updates_keep_their_algebra_and_scratch_when_c_is_float32():
    """The editors hold C₀ in float32: the float64 solves must upcast it, not trust it, and
    the in-place scratch must never write into the caller's matrix."""
    c = _psd(12)
    c32 = c.float()
    keep = c32.clone()
    g = torch.Generator().manual_seed(3)
    keys, resid = torch.randn(12, 4, generator=g), torch.randn(6, 4, generator=g)
    _, v64 = memit_update(keys, resid, c, lam=2.0)
    _, v32 = memit_update(keys, resid, c32, lam=2.0)
    assert torch.equal(c32, keep) and v32.dtype == torch.float64
    assert torch.allclose(v32, v64, rtol=1e-5, atol=1e-7)
    _, again = memit_update(keys, resid, c, lam=2.0)  # float64 C: .to() must still copy
    assert torch.equal(again, v64)
    basis = null_space_basis(c, threshold=float(torch.linalg.eigvalsh(c)[4]))
    p = basis @ basis.T
    prev = torch.randn(12, 3, generator=g)
    kp = (prev @ prev.T).float()
    kp_basis = (basis.T @ kp.double() @ basis).float()
    kp_keep = kp_basis.clone()
    _, va = alphaedit_update(keys, resid, basis.float(), kp_basis, alpha=1.0)
    assert torch.equal(kp_basis, kp_keep)
    k = keys.double()
    m = p @ (k @ k.T + kp.double()) + torch.eye(12, dtype=torch.float64)
    assert torch.allclose(m @ va, p @ k, atol=1e-5)


def test_editor_holds_c0_in_float32():
    lm = make_tiny("gpt2")
    editor = MEMIT(layers=[0, 1], key_stats=_stats(lm, [0, 1]))
    held = editor.moments(lm, [0, 1], editor.hparams_for(lm))
    assert all(m.dtype == torch.float32 for m in held.values())
    assert torch.allclose(held[1].double(), _stats(lm, [1])[1].moment(), rtol=1e-6)


def test_edit_state_accumulates_keys_and_round_trips(tmp_path):
    lm = make_tiny("llama")
    state = EditState.from_moments({k: s.moment() for k, s in _stats(lm, [1, 2]).items()},
                                   threshold=0.5)
    keys = {1: torch.randn(lm.d_mlp, 3), 2: torch.randn(lm.d_mlp, 3)}
    new = state.updated(keys, 3)
    assert state.n_edits == 0 and new.n_edits == 3  # the old state is untouched
    u = state.bases[1]
    assert torch.allclose(new.keys_cov[1], u.T @ keys[1] @ keys[1].T @ u, atol=1e-4)
    new.save(tmp_path / "state")
    back = EditState.load(tmp_path / "state")
    assert back.n_edits == 3
    assert torch.equal(back.bases[2], new.bases[2])
    assert torch.equal(back.keys_cov[1], new.keys_cov[1])


def test_an_edit_state_saved_in_the_first_format_still_loads(tmp_path):
    """Format 1 kept P and K_pK_pᵀ at full size: they load as the same null space."""
    import json

    from safetensors.torch import save_file

    c = _psd(12)
    basis = null_space_basis(c, threshold=float(torch.linalg.eigvalsh(c)[5]))
    kp = torch.randn(12, 2, dtype=torch.float64)
    folder = tmp_path / "old"
    folder.mkdir()
    save_file({"P.3": (basis @ basis.T).float(), "KpKp.3": (kp @ kp.T).float()},
              str(folder / "state.safetensors"))
    (folder / "state.json").write_text(json.dumps({"format": 1, "n_edits": 2, "meta": {}}))
    back = EditState.load(folder)
    u = back.bases[3].double()
    assert u.shape == basis.shape and back.n_edits == 2
    assert torch.allclose(u @ u.T, basis @ basis.T, atol=1e-5)
    assert torch.allclose(back.keys_cov[3].double(), u.T @ kp @ kp.T @ u, atol=1e-4)


# prompts and positions ------------------------------------------------------------------------
def test_subject_positions_follow_the_placeholder_when_subject_occurs_twice():
    lm = make_tiny("gpt2")
    enc = encode_with_subject(lm, "w9 {}", "w5 w6 w7 {} w8", "w5 w6")
    # text: "w9 w5 w6 w7 w5 w6 w8" -> the placeholder's copy is tokens 4..5, not 1..2
    assert enc.subject == [4, 5]
    assert pick_positions(enc, "last") == [5]
    assert pick_positions(enc, "first") == [4]
    assert pick_positions(enc, "all") == [4, 5]
    assert pick_positions(enc, "prompt_last") == [6]
    with pytest.raises(RequestError, match="unknown subject position"):
        pick_positions(enc, "middle")


def test_bad_requests_give_clear_errors():
    with pytest.raises(RequestError, match="empty target_new"):
        EditRequest(prompt="{} is in", subject="w1", target_new=" ")
    with pytest.raises(RequestError, match="not found in prompt"):
        EditRequest.from_text("w1 w2 w3", subject="w9", target_new="w4")
    lm = make_tiny("gpt2")
    with pytest.raises(PointError, match="out of range"):
        ROME(layers=[7], key_stats={}).edit(lm, [_req()])
    with pytest.raises(RequestError, match="unknown hyper-parameter"):
        ROME(layerz=[1]).edit(lm, [_req()])
    with pytest.raises(RequestError, match="unknown editing method"):
        get_editor("grace")


def test_length_groups_cover_every_row_once_and_cut_padding():
    lengths = [1, 1, 7, 2, 6, 1, 7, 2]
    groups = length_groups(lengths, 3)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    padded = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    assert padded < len(lengths) * max(lengths)


# targets ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_cache_gives_the_same_targets_as_plain_forwards(family):
    lm = make_tiny(family)
    reqs = [_req(), _req("w7", "w42 w43", "{} w2 w3 w4"), _req("w8 w9 w10", "w44", "w1 w2 {}")]
    templates = ["{}", "w11 w12 w13 . {}", "w14 . {}"]
    kw = {"steps": 4, "lr": 0.1, "early_stop": 0.0}
    a = optimise_targets(lm, reqs, "mlp_out.1", templates, TargetConfig(prefix_cache=False, **kw))
    b = optimise_targets(lm, reqs, "mlp_out.1", templates,
                         TargetConfig(prefix_cache=True, length_groups=2, **kw))
    assert torch.allclose(a.init, b.init, atol=1e-5)
    assert torch.allclose(a.nll, b.nll, atol=1e-4)
    assert torch.allclose(a.delta, b.delta, atol=1e-4)


def test_target_steps_after_the_first_skip_the_blocks_before_the_edited_one():
    """δ enters at block 1, so block 0 computes the same suffix states on every step: it runs
    on the first step only, while the last block runs on every step."""
    lm = make_tiny("llama")
    calls = {0: 0, 2: 0}
    handles = [lm.layout.block(i).register_forward_hook(
        lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1)) for i in calls]
    steps = 4
    optimise_targets(lm, [_req()], "mlp_out.1", ["{}", "w11 w12 . {}"],
                     TargetConfig(steps=steps, lr=0.1, early_stop=0.0))
    for h in handles:
        h.remove()
    assert calls[2] - calls[0] == steps - 1


@pytest.mark.parametrize("group_rows", [None, 1, 2])
def test_batched_targets_equal_one_request_at_a_time(group_rows):
    """Rows never mix: batching requests, and splitting the batch into forwards of at most
    ``group_rows`` rows (each backpropagated alone), leave every request's δ as if alone."""
    lm = make_tiny("llama")
    reqs = [_req(), _req("w7", "w42", "{} w2 w3 w4")]
    cfg = TargetConfig(steps=5, lr=0.1, early_stop=0.0, group_rows=group_rows)
    both = optimise_targets(lm, reqs, "resid.1", ["{}", "w11 . {}"], cfg)
    for i, req in enumerate(reqs):
        alone = optimise_targets(lm, [req], "resid.1", ["{}", "w11 . {}"],
                                 TargetConfig(steps=5, lr=0.1, early_stop=0.0))
        assert torch.allclose(both.delta[i], alone.delta[0], atol=1e-5)
    if group_rows is not None:  # a cap below one row is named, not read as "no cap"
        with pytest.raises(ValueError, match="group_rows"):
            optimise_targets(lm, reqs, "resid.1", ["{}"],
                             TargetConfig(steps=1, group_rows=0))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_memory_budget_splits_the_work_without_changing_the_targets(monkeypatch, family):
    """A budget too small for more than a row per forward and a request per chunk: the plan
    splits everything, and every δ is what one unbudgeted batch gives."""
    import engramlab.edit.targets as targets_mod
    from engramlab.edit import memory

    lm = make_tiny(family)
    reqs = [_req(), _req("w7", "w42", "{} w2 w3 w4"), _req("w8 w9", "w43", "w1 {} w5")]
    templates = ["{}", "w11 . {}", "w12 w13 . {}"]
    kw = {"steps": 4, "lr": 0.1, "early_stop": 0.0}
    free = optimise_targets(lm, reqs, "resid.1", templates, TargetConfig(**kw))
    cost = memory.costs(lm, "resid.1")
    assert cost.kv_per_token > 0 and cost.act_per_token > 0
    one_row = cost.act_per_token * 4 * memory.SAFETY / memory.budget_bytes(lm, 1.0)
    calls: list[list[list[int]]] = []

    def spy(*args):
        calls.append(memory.split_rows(*args))
        return calls[-1]

    monkeypatch.setattr(targets_mod, "split_rows", spy)
    tight = optimise_targets(lm, reqs, "resid.1", templates,
                             TargetConfig(memory_budget=one_row, **kw))
    assert len(calls) == len(reqs)  # one chunk per request
    assert all(len(piece) == 1 for pieces in calls for piece in pieces)
    assert torch.allclose(free.delta, tight.delta, atol=1e-5)
    assert torch.allclose(free.nll, tight.nll, atol=1e-5)
    with pytest.raises(ValueError, match="memory_budget"):
        optimise_targets(lm, reqs, "resid.1", templates, TargetConfig(memory_budget=0.0, **kw))


def test_targets_lower_the_target_loss_and_respect_the_clamp():
    lm = make_tiny("gpt2")
    cfg = TargetConfig(steps=15, lr=0.5, clamp=0.5, early_stop=0.0, kl_factor=0.0,
                       weight_decay=0.0)
    before = optimise_targets(lm, [_req()], "mlp_out.1", ["{}"], TargetConfig(steps=1))
    after = optimise_targets(lm, [_req()], "mlp_out.1", ["{}"], cfg)
    assert float(after.nll[0]) < float(before.nll[0])
    assert float(after.delta.norm()) <= 0.5 * float(after.init.norm()) * (1 + 1e-5)


# editors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama", "gptj"])
def test_rome_writes_the_target_value_at_the_subject(family, isolated_cache):
    lm = make_tiny(family)
    req = _req()
    editor = ROME(layers=[1], key_stats=_stats(lm, [1]), templates=[[3, 2]], **_steps(5))
    delta = editor.edit(lm, req)
    assert delta.ranks() == {lm.layout.value_param_name(1): 1}
    templates = editor.templates(lm, editor.hparams_for(lm))
    key = at_subject(lm, [req], ["mlp_key.1"], templates)["mlp_key.1"][0]
    w = lm.layout.value_weight(1).detach().clone()
    before = w @ key
    original = {n: p.clone() for n, p in lm.model.named_parameters()}
    with delta.applied(lm):
        after = lm.layout.value_weight(1) @ key
        # the layer now maps k* to W k* + δ (δ read back from the optimiser via the delta)
        change = delta.entries[lm.layout.value_param_name(1)].to_dense()
        change = change.T if lm.layout.value_is_transposed(1) else change
        assert torch.allclose(after - before, change @ key, atol=1e-4)
    assert all(torch.equal(p, original[n]) for n, p in lm.model.named_parameters())


def test_rome_key_maps_exactly_to_the_optimised_value(isolated_cache):
    lm = make_tiny("llama")
    req = _req()
    stats = _stats(lm, [1])
    editor = ROME(layers=[1], key_stats=stats, templates=[[3, 2]], **_steps(4),
                  consistent_targets=False)
    templates = editor.templates(lm, editor.hparams_for(lm))
    hp = editor.hparams_for(lm)
    targets = optimise_targets(lm, [req], "mlp_out.1", templates, hp.target,
                               subject_pos=hp.subject_pos)
    delta = editor.edit(lm, req)
    key = at_subject(lm, [req], ["mlp_key.1"], templates)["mlp_key.1"][0]
    w_delta = delta.entries[lm.layout.value_param_name(1)].to_dense()
    assert torch.allclose(w_delta @ key, targets.delta[0], atol=1e-4)


def test_memit_and_alphaedit_edit_every_layer_with_rank_n(isolated_cache):
    lm = make_tiny("gpt_neox")
    reqs = [_req(), _req("w7", "w42", "{} w2 w3 w4"), _req("w8", "w43", "w1 {} w2")]
    for cls in (MEMIT, AlphaEdit):
        editor = cls(layers=[0, 1], key_stats=_stats(lm, [0, 1]), templates=[[3, 2]], **_steps(3),
                     **({"mom2_weight": 10.0} if cls is MEMIT else {"nullspace_threshold": 1.0}))
        delta = editor.edit(lm, reqs)
        assert set(delta.ranks().values()) == {3}
        assert len(delta.entries) == 2
        with delta.applied(lm):
            pass
        delta.check(lm)  # stamped with the unedited weights


def test_alphaedit_step_threads_state_and_spares_preserved_keys(isolated_cache):
    lm = make_tiny("llama")
    # statistics of rank 24 < d_mlp: an exact null space exists
    g = torch.Generator().manual_seed(0)
    stats = {}
    basis = {}
    for layer in (0, 1):
        basis[layer] = torch.randn(lm.d_mlp, 24, generator=g, dtype=torch.float64)
        stats[layer] = KeyStats(layer, basis[layer] @ basis[layer].T, 24)
    editor = AlphaEdit(layers=[0, 1], key_stats=stats, templates=[[3, 1]], **_steps(3),
                       nullspace_threshold=1e-8)
    d1, s1 = editor.step(lm, [_req()], None)
    d2, s2 = editor.step(lm, [_req("w7", "w42", "{} w2 w3 w4")], s1)
    assert (s1.n_edits, s2.n_edits) == (1, 2)
    assert float(s2.keys_cov[0].abs().sum()) > float(s1.keys_cov[0].abs().sum())
    for d in (d1, d2):
        for layer in (0, 1):
            dw = d.entries[lm.layout.value_param_name(layer)].to_dense().double()
            assert (dw @ basis[layer]).abs().max() < 1e-5 * max(1.0, float(dw.abs().max()))
    with pytest.raises(RequestError, match="EditState"):
        editor.step(lm, [_req()], {"not": "a state"})


def test_edit_in_place_trace_sees_the_new_value(isolated_cache):
    lm = make_tiny("gpt2")
    req = _req()
    rome = ROME(layers=[1], key_stats=_stats(lm, [1]), templates=[[3, 1]], **_steps(3))
    delta = rome.edit(lm, req)
    enc = lm.tokenize(req.text)
    with Trace(lm).capture("mlp_out.1") as tr:
        lm.model(**enc)
    before = tr["mlp_out.1"].clone()
    with delta.applied(lm), Trace(lm).capture("mlp_out.1") as tr:
        lm.model(**enc)
    assert not torch.allclose(before, tr["mlp_out.1"])


def test_hparams_from_strings_keep_their_types_and_name_bad_values():
    from engramlab.edit.base import EditHParams

    hp = EditHParams().replace(**{"target.memory_budget": "0.35", "target.group_rows": "16",
                                  "target.clamp": "2"}, layers="3,4")
    assert (hp.target.memory_budget, hp.target.group_rows, hp.target.clamp, hp.layers) == \
        (0.35, 16, 2.0, [3, 4])
    assert hp.replace(**{"target.memory_budget": "none"}).target.memory_budget is None
    with pytest.raises(RequestError, match=r"target\.clamp='none': expected float"):
        hp.replace(**{"target.clamp": "none"})
    with pytest.raises(RequestError, match=r"target\.group_rows='many'"):
        hp.replace(**{"target.group_rows": "many"})
    # a group takes some of its fields as a dict; the rest keep their values
    both = hp.replace(target={"lr": 2.0}, stats={"tokens": "1000"})
    assert (both.target.lr, both.target.clamp, both.stats.tokens) == (2.0, 2.0, 1000)
    with pytest.raises(RequestError, match=r"'v_lr' is now 'target\.lr'"):
        hp.replace(v_lr=1.0)
    with pytest.raises(RequestError, match=r"unknown hyper-parameter\(s\) \['target.lrr'\]"):
        hp.replace(**{"target.lrr": 1.0})
    with pytest.raises(RequestError, match="is a group"):
        hp.replace(target="fast")
    # the subject position places the keys and the targets alike: it is set once, at the top
    for placed in ({"target.subject_pos": "first"}, {"target": {"subject_pos": "first"}}):
        with pytest.raises(RequestError, match=r"unknown hyper-parameter.*target\.subject_pos"):
            hp.replace(**placed)
    # each method takes only its own settings beside the shared ones
    with pytest.raises(RequestError, match=r"\['alpha'\] is not setting of rome"):
        ROME(alpha=3.0)
    with pytest.raises(RequestError, match="mom2_weight"):
        AlphaEdit(mom2_weight=3.0)
    assert MEMIT(mom2_weight=3.0, **{"target.lr": 0.1}).overrides["mom2_weight"] == 3.0


def test_presets_match_by_config_and_fall_back_to_relative_depth():
    lm = make_tiny("gpt2")
    assert match_preset(lm) == "default"
    hp = load_preset(lm, "memit")
    assert all(0 <= layer < lm.n_layers for layer in hp.layers)
    assert hp.target.clamp == 0.75 and hp.mom2_weight == 20000
    with pytest.raises(RequestError, match="unknown preset"):
        load_preset(lm, "rome", "gpt5")


def test_batch_protocols_do_not_score_neighbours_that_are_edited_subjects():
    from engramlab.data import EditCase
    from engramlab.edit.protocols import without_edited_neighbours

    a = EditCase(_req("w5", "w40", "{} w2"), neighborhood_prompts=("w6 w2", "w7 w2"))
    b = EditCase(_req("w6", "w42", "{} w2"), neighborhood_prompts=("w8 w2",))
    kept = without_edited_neighbours([a, b])
    assert kept[0].neighborhood_prompts == ("w7 w2",)
    assert kept[0].neighborhood_answers == ("w41",)
    assert kept[1] == b


def test_memory_plans_respect_budget_cap_and_order():
    from engramlab.edit.memory import SAFETY, Costs, plan_chunks, split_rows

    c = Costs(kv_per_token=10.0, act_per_token=100.0, per_label=50.0)
    # three requests of two rows; a chunk's cache is rows × longest prefix × 10 × SAFETY
    prefix = [[3, 4], [5, 5], [2, 2]]
    assert plan_chunks(prefix, 8, None, None) == [3]
    assert plan_chunks(prefix, 2, c, None) == [2, 1]
    budget = 2 * SAFETY * 4 * 5 * 10  # half of it holds two requests padded to 5 tokens
    assert plan_chunks(prefix, 8, c, budget) == [2, 1]
    assert plan_chunks(prefix, 8, c, 1.0) == [1, 1, 1]  # never an empty chunk
    suffix, scored = [2, 3, 3, 6, 1], [1, 1, 0, 2, 1]
    idx = [4, 0, 1, 2, 3]
    pieces = split_rows(idx, suffix, scored, 10, c, SAFETY * (3 * 3 * 100 + 2 * 50))
    assert [i for p in pieces for i in p] == idx
    for p in pieces:
        cost = SAFETY * (len(p) * max(suffix[i] for i in p) * 100
                         + sum(scored[i] for i in p) * 50)
        assert len(p) == 1 or cost <= SAFETY * (3 * 3 * 100 + 2 * 50)
    assert split_rows(idx, suffix, scored, 2, None, None) == [[4, 0], [1, 2], [3]]


def test_bootstrap_interval_has_the_binomial_width_and_is_seeded():
    from engramlab.evaluate.bootstrap import bootstrap_interval, case_intervals

    for n in (100, 400):
        values = [1.0] * (n // 2) + [0.0] * (n // 2)
        lo, hi = bootstrap_interval(values)
        expected = 2 * 1.96 * (0.25 / n) ** 0.5  # the normal approximation of a proportion
        assert lo < 0.5 < hi
        assert abs((hi - lo) - expected) < 0.2 * expected, (n, hi - lo, expected)
    assert bootstrap_interval([1.0, 0.0, 1.0]) == bootstrap_interval([1.0, 0.0, 1.0])
    assert bootstrap_interval([0.7] * 5) == pytest.approx((0.7, 0.7))
    rows = [{"a": 1.0, "b": None}, {"a": 0.0, "b": None}]
    assert case_intervals(rows, {"x": "a", "y": "b"})["y"] is None


def test_memit_spreads_the_residual_so_the_last_layer_reaches_its_target(isolated_cache,
                                                                         monkeypatch):
    import engramlab.edit.relation as relation_module  # where every editor gets its targets

    lm = make_tiny("llama")
    reqs = [_req(), _req("w7", "w42", "{} w2 w3 w4"), _req("w8", "w43", "w1 {} w2")]
    seen = {}
    original = relation_module.optimise_targets

    def keep(*args, **kwargs):
        seen["targets"] = original(*args, **kwargs)
        return seen["targets"]

    monkeypatch.setattr(relation_module, "optimise_targets", keep)
    # no context templates and a negligible λ: every layer's share is written exactly
    editor = MEMIT(layers=[0, 1], key_stats=_stats(lm, [0, 1]), templates=[], **_steps(3),
                   mom2_weight=1e-6)
    delta = editor.edit(lm, reqs)
    z = seen["targets"].value
    before = at_subject(lm, reqs, ["resid.1"], ["{}"])["resid.1"]
    with delta.applied(lm):
        after = at_subject(lm, reqs, ["resid.1"], ["{}"])["resid.1"]
    assert (before - z).norm() > 0.1
    assert torch.allclose(after, z, atol=1e-3), (after - z).norm()


def test_a_target_memo_reuses_targets_across_lambda_but_not_across_weights(isolated_cache,
                                                                           monkeypatch):
    import engramlab.edit.relation as relation_module  # where every editor gets its targets
    from engramlab.edit.targets import TargetMemo

    lm = make_tiny("llama")
    reqs = [_req(), _req("w7", "w42", "{} w2 w3 w4")]
    calls = []
    original = relation_module.optimise_targets

    def count(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(relation_module, "optimise_targets", count)
    memo = TargetMemo()
    stats = _stats(lm, [0, 1])
    deltas = []
    for lam in (1e-3, 10.0):
        editor = MEMIT(layers=[0, 1], key_stats=stats, templates=[], **_steps(3), mom2_weight=lam)
        editor.target_memo = memo
        deltas.append(editor.edit(lm, reqs))
    fresh = MEMIT(layers=[0, 1], key_stats=stats, templates=[], **_steps(3), mom2_weight=10.0)
    assert len(calls) == 1 and memo.hits == 1
    # the memoised targets give the delta a fresh optimisation gives
    for name, entry in fresh.edit(lm, reqs).entries.items():
        assert torch.allclose(entry.to_dense(), deltas[1].entries[name].to_dense(), atol=1e-5)
    first = next(iter(deltas[0].entries))
    assert not torch.allclose(deltas[0].entries[first].to_dense(),
                              deltas[1].entries[first].to_dense(), atol=1e-5)
    # other settings of the optimisation, or other weights, are optimised again
    other = MEMIT(layers=[0, 1], key_stats=stats, templates=[], **_steps(2), mom2_weight=10.0)
    other.target_memo = memo
    other.edit(lm, reqs)
    with deltas[0].applied(lm):
        again = MEMIT(layers=[0, 1], key_stats=stats, templates=[], **_steps(3), mom2_weight=10.0)
        again.target_memo = memo
        again.edit(lm, reqs)
    assert len(calls) == 4 and memo.hits == 1  # the fresh editor, other settings, weights


def test_scores_read_off_a_shared_row_equal_scores_of_each_row_alone():
    from engramlab.evaluate.scoring import score_targets

    lm = make_tiny("llama")
    # one prompt with two one-token targets (one row), a two-token target, a second prompt
    prompts = ["w1 w2 w3", "w1 w2 w3", "w1 w2 w3", "w4 w5"]
    targets = [" w7", " w9", " w8 w10", " w7"]
    together = score_targets(lm, prompts, targets, batch_size=3)
    for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        alone = score_targets(lm, [p], [t])[0]
        assert alone.correct == together[i].correct
        assert alone.logprob == pytest.approx(together[i].logprob, abs=1e-5)
    assert together[0].logprob != pytest.approx(together[1].logprob, abs=1e-4)


def test_batch_protocol_in_batches_scores_each_case_under_its_own_batch(isolated_cache):
    from engramlab.data.records import EditCase
    from engramlab.edit.protocols import run_protocol, without_edited_neighbours
    from engramlab.evaluate.counterfact import case_scores

    lm = make_tiny("llama")
    # each case's neighbour is the next case's subject: inside its batch for cases 0 and 2,
    # in the other batch (so not edited when the case is scored) for cases 1 and 3
    cases = [EditCase(_req(f"w{5 + i}", f"w{40 + i}", "{} w2 w3"),
                      paraphrase_prompts=(f"w1 w{5 + i} w2",),
                      neighborhood_prompts=(f"w{5 + (i + 1) % 4} w2",)) for i in range(4)]
    editor = MEMIT(layers=[0, 1], key_stats=_stats(lm, [0, 1]), templates=[], **_steps(3),
                   mom2_weight=1e-2)
    result = run_protocol(lm, editor, cases, protocol="batch", batch_size=2)
    assert result.delta is None and len(result.deltas) == 2
    for k, delta in enumerate(result.deltas):  # each pair was scored under its own delta only
        part = cases[2 * k:2 * k + 2]
        with delta.applied(lm):
            expected = [s.to_dict() for s in case_scores(lm, without_edited_neighbours(part))]
        assert result.per_case[2 * k:2 * k + 2] == expected
        assert expected[0]["neighborhood"] is None and expected[1]["neighborhood"] is not None
    whole = run_protocol(lm, editor, cases, protocol="batch")
    assert whole.delta is not None and not whole.deltas
    assert whole.per_case != result.per_case  # one batch of four is another edit
    report = whole.report_markdown()
    assert f"| efficacy | {whole.pre['efficacy']} | {whole.post['efficacy']} |" in report


def test_paired_intervals_cancel_the_spread_both_methods_share():
    """Two methods scored on the same cases: when b is a plus a constant, the paired interval
    collapses onto that constant, however much the cases themselves vary; an unpaired
    interval of the same means would be as wide as the cases' spread. Cases either method left
    out are left out, and unequal case lists are refused."""
    from engramlab.evaluate.bootstrap import bootstrap_interval, paired_intervals

    gen = torch.Generator().manual_seed(0)
    a = [{"e": float(v)} for v in torch.rand(200, generator=gen)]
    b = [{"e": r["e"] + 0.25} for r in a]
    out = paired_intervals(a, b, {"efficacy": "e"})["efficacy"]
    assert out["mean"] == pytest.approx(0.25) and out["n"] == 200
    assert out["ci95"] == pytest.approx([0.25, 0.25])
    lo, hi = bootstrap_interval([r["e"] for r in b])
    assert hi - lo > 0.05  # what the cases' spread alone would give
    flipped = paired_intervals(b, a, {"efficacy": "e"})["efficacy"]
    assert flipped["mean"] == pytest.approx(-0.25)  # b − a, not |a − b|
    a[0]["e"] = None
    assert paired_intervals(a, b, {"efficacy": "e"})["efficacy"]["n"] == 199
    with pytest.raises(ValueError, match="same cases"):
        paired_intervals(a, b[:-1], {"efficacy": "e"})
