"""Concept erasure: the algebra on tiny models, the bundled concepts on the embedded model."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from engramlab.data import Concept, Probe, bundled_concepts, get_concept, load_concept
from engramlab.delta import ParamDelta, WeightDelta
from engramlab.erase import ConceptVectors, find_concept_vectors, vectors_delta
from engramlab.erase.budget import Budget, BudgetSearch
from engramlab.erase.finetune import (
    FineTuneUnlearner,
    _nll,
    _rows,
    _train,
    mlp_params,
    sentences,
)
from engramlab.erase.run import make_eraser, report_lines, run_erasure
from engramlab.erase.vectors import answer_logprob, vocab_scores
from engramlab.errors import ConceptError, EngramError
from engramlab.evaluate.erasure import (
    accuracy,
    coefficient_patch_accuracy,
    first_block,
    probe_hits,
)
from tests.conftest import assert_halves, make_tiny, tiny_text


def _known_probes(lm, n: int = 6, seed: int = 0) -> list[Probe]:
    """Prompts with the tiny model's own greedy answer, so the unedited model gets them all."""
    probes = []
    for i in range(n):
        prompt = tiny_text(5, seed=seed + i)
        ids = torch.tensor([lm.tokenizer(prompt)["input_ids"]])
        guess = int(lm.model(input_ids=ids).logits[0, -1].argmax())
        answer = lm.decode(guess).strip()
        if answer:
            probes.append(Probe(prompt, answer))
    return probes


def test_probes_batched_by_length_score_as_each_alone():
    """Batching prompts by length must hand every answer back to its own probe."""
    lm = make_tiny("llama")
    lengths = [7, 2, 5, 3, 8, 2, 6, 4, 3]
    prompts = [tiny_text(n, seed=20 + i) for i, n in enumerate(lengths)]
    guesses = [_greedy_word(lm, p) for p in prompts]
    # every other probe gets its own greedy answer, the rest a wrong one
    mixed = [Probe(p, g if i % 2 == 0 else ("w1" if g != "w1" else "w2"))
             for i, (p, g) in enumerate(zip(prompts, guesses, strict=True))]
    assert probe_hits(lm, mixed, batch_size=2) == [i % 2 == 0 for i in range(len(mixed))]
    alone = sum(answer_logprob(lm, [p]) for p in mixed) / len(mixed)
    assert answer_logprob(lm, mixed, batch_size=2) == pytest.approx(alone, abs=1e-5)


def _greedy_word(lm, prompt: str) -> str:
    ids = torch.tensor([lm.tokenizer(prompt)["input_ids"]])
    word = lm.decode(int(lm.model(input_ids=ids).logits[0, -1].argmax())).strip()
    assert word, f"the tiny model's greedy token after {prompt!r} decodes to nothing"
    return word


def test_trials_scored_from_their_first_changed_block_equal_whole_passes():
    """The budget's scoring passes start at the first block a trial's delta changes, from
    states kept across trials: the figures are those of whole passes, and starting any later
    would show."""
    lm = make_tiny("llama")
    concept = Concept("tiny", probes=_known_probes(lm, 6),
                      near_controls=_known_probes(lm, 4, seed=100))
    controls = _known_probes(lm, 8, seed=30)
    search = BudgetSearch(Budget(), lm, concept, controls, [tiny_text(12, seed=s)
                                                             for s in range(3)])
    keys = ("target_accuracy", "control_accuracy", "near_control_accuracy", "perplexity")
    first = vectors_delta(lm, [(1, 2), (1, 9), (2, 5)], damping=-6.0)
    assert first_block(lm, first) == 1
    for vectors in ([(1, 2), (1, 9), (2, 5)], [(2, 3), (2, 7)], [(1, 2), (1, 9), (2, 5)]):
        delta = vectors_delta(lm, vectors, damping=-6.0)
        search.score_delta({}, delta)
        with delta.applied(lm):
            search.score({}, from_block=0)
        kept, whole = search.trials[-2:]
        assert [kept[k] for k in keys[:3]] == [whole[k] for k in keys[:3]]
        assert kept["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-6)
    assert search.entries._kept.keys() == {1, 2}  # states kept per starting block
    with first.applied(lm):
        search.score({}, from_block=2)  # a promise the delta breaks (it changes block 1)
    assert search.trials[-1]["perplexity"] != pytest.approx(search.trials[0]["perplexity"],
                                                           rel=1e-4)
    embed = lm.layout.module_name(lm.model.get_input_embeddings()) + ".weight"
    outside = WeightDelta.for_model(lm, {**first.entries, embed: ParamDelta(
        dense=torch.ones_like(lm.model.get_input_embeddings().weight))})
    assert first_block(lm, outside) == 0


def test_vectors_delta_zeroes_or_damps_columns_and_reverts_exactly(tiny):
    chosen = [(0, 1), (0, 3), (1, 2)]
    before = {i: tiny.layout.value_weight(i).detach().clone() for i in (0, 1)}
    delta = vectors_delta(tiny, chosen)
    assert all(e.is_low_rank for e in delta.entries.values())
    with delta.applied(tiny):
        for layer, j in chosen:
            assert torch.count_nonzero(tiny.layout.value_weight(layer)[:, j]) == 0
        w0 = tiny.layout.value_weight(0)
        assert torch.allclose(w0[:, 0], before[0][:, 0]) and torch.allclose(w0[:, 2],
                                                                              before[0][:, 2])
    for i in (0, 1):
        assert torch.equal(tiny.layout.value_weight(i), before[i])
    with vectors_delta(tiny, chosen, damping=0.25).applied(tiny):
        assert torch.allclose(tiny.layout.value_weight(1)[:, 2], 0.25 * before[1][:, 2],
                              atol=1e-6)


def test_vocab_scores_fast_path_equals_full_projection():
    lm = make_tiny("llama")
    tokens = [5, 9, 17]
    fast = vocab_scores(lm, [0, 1], tokens)
    lm.config.final_logit_softcapping = 1e9  # tanh(x/c)·c = x: forces the direct path
    direct = vocab_scores(lm, [0, 1], tokens)
    assert fast.shape == (2, lm.layout.d_mlp)
    assert torch.allclose(fast, direct, atol=1e-4)


def test_coefficient_patching_undoes_key_side_changes_only():
    """Patching the unedited keys cancels any change upstream of them (here: the up/gate
    weights of layers 0 and 1) but not a change of the value vectors — the distinction the
    inside-looking probe rests on."""
    lm = make_tiny("llama")
    probes = _known_probes(lm, 16)
    assert accuracy(lm, probes) == 1.0
    g = torch.Generator().manual_seed(0)
    values = {lm.layout.value_param_name(i) for i in (0, 1)}
    noise = {n: ParamDelta(dense=torch.randn(p.shape, generator=g) * 20.0)
             for n, p in mlp_params(lm, [0, 1]).items()}
    key_side = {n: d for n, d in noise.items() if n not in values}
    value_side = {n: d for n, d in noise.items() if n in values}
    for entries in (key_side, value_side):
        delta = WeightDelta.for_model(lm, entries)
        with delta.applied(lm):
            broken = accuracy(lm, probes)
        assert broken < 1.0  # both really change the answers
        patched = coefficient_patch_accuracy(lm, delta, probes, layers=[0, 1])
        if entries is key_side:
            assert patched == 1.0
        else:
            assert patched == broken


@pytest.mark.parametrize("method", ["ga", "npo", "rmu"])
def test_finetune_baselines_change_only_mlps_and_leave_the_model(method):
    lm = make_tiny("llama")
    concept = Concept("tiny", probes=_known_probes(lm, 3),
                      text=". ".join(tiny_text(8, seed=s) for s in range(4)) + ".")
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    eraser = FineTuneUnlearner(method=method, steps=5, lr=1e-3, rmu_layer=1, tune=False)
    delta = eraser.erase(lm, concept, retain=[tiny_text(10, seed=50), tiny_text(10, seed=51)])
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} left changed"
    allowed = set(mlp_params(lm, range(lm.layout.n_layers)))
    assert delta.entries and set(delta.entries) <= allowed
    assert delta.norm() > 0
    if method == "ga":  # ascent: the forget text became less likely
        ids, mask = _rows(lm, sentences(concept.forget_text))
        with torch.no_grad():
            base = float(_nll(lm, ids, mask))
            with delta.applied(lm):
                assert float(_nll(lm, ids, mask)) > base


def test_finetune_tuner_returns_the_best_checkpoint_inside_the_budget():
    lm = make_tiny("llama")
    concept = Concept("tiny", probes=_known_probes(lm, 6),
                      text=". ".join(tiny_text(8, seed=s) for s in range(4)) + ".")
    controls = _known_probes(lm, 8, seed=30)
    retain = [tiny_text(10, seed=50), tiny_text(10, seed=51)]
    eraser = FineTuneUnlearner(method="ga", lrs=(1e-3, 3e-3), steps=12, every=3,
                               budget=Budget(0.3, 10.0))
    delta = eraser.erase(lm, concept, retain=retain, controls=controls)
    for lr in (1e-3, 3e-3):  # each run is checked every 3 steps and stops at its first failure
        row = [t for t in eraser.trials if t["lr"] == lr]
        assert [t["steps"] for t in row] == [3, 6, 9, 12][:len(row)]
        assert all(t["ok"] for t in row[:-1])
        assert len(row) == 4 or not row[-1]["ok"]  # a row ends early only at a failure
    ok = [t for t in eraser.trials if t["ok"]]
    chosen = [t for t in ok if t["steps"] == delta.meta["steps"] and t["lr"] == delta.meta["lr"]]
    assert chosen and chosen[0]["target_accuracy"] == min(t["target_accuracy"] for t in ok)
    with delta.applied(lm):  # the delta is the checkpoint the tuner scored, not a later one
        assert accuracy(lm, concept.probes) == chosen[0]["target_accuracy"]
        assert accuracy(lm, controls) == chosen[0]["control_accuracy"]
    # trained exactly that long without tuning, the same run gives the same weights
    plain = FineTuneUnlearner(method="ga", lr=delta.meta["lr"], steps=delta.meta["steps"],
                              tune=False).erase(lm, concept, retain=retain)
    for name, entry in delta.entries.items():
        assert torch.allclose(entry.dense, plain.entries[name].dense, atol=1e-6)
    # every learning rate's run starts from the original weights, not where the last one ended
    params = mlp_params(lm, [0])
    backup = {n: q.detach().clone() for n, q in params.items()}
    for q in params.values():
        q.requires_grad_(True)
    runs = []
    for _ in range(2):
        _train(params, backup, lambda: sum((q ** 2).sum() for q in params.values()), 3, 1e-2, "t")
        runs.append({n: q.detach().clone() for n, q in params.items()})
    with torch.no_grad():
        for n, q in params.items():
            q.copy_(backup[n])
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in params)
    assert not torch.equal(runs[0][next(iter(params))], backup[next(iter(params))])
    with pytest.raises(ConceptError, match="no ga run"):
        never = FineTuneUnlearner(method="ga", lrs=(3e-3,), steps=3, every=3,
                                  budget=Budget(max_control_drop=-1.0))
        never.erase(lm, concept, retain=retain, controls=controls)


def test_finetune_tuner_never_checks_perplexity_on_its_retain_set():
    from engramlab.data.concepts import general_text

    tune = general_text(split="tune")
    retain, held = FineTuneUnlearner()._retain_and_check(None)
    assert retain and held and not set(retain) & set(held) and set(retain) | set(held) == set(tune)
    assert not set(held) & set(general_text(split="eval"))
    assert FineTuneUnlearner(tune=False)._retain_and_check(None)[0] == tune
    with pytest.raises(ConceptError, match="retain set covers"):
        FineTuneUnlearner()._retain_and_check(tune)


def test_bad_input_is_named(tmp_path):
    lm = make_tiny("gpt2")
    with pytest.raises(ConceptError, match="no probes"):
        Concept("empty", probes=[])
    with pytest.raises(ConceptError, match="no bundled concept named"):
        get_concept("Atlantis")
    bad = tmp_path / "c.json"
    bad.write_text("{not json")
    with pytest.raises(ConceptError, match="not valid JSON"):
        load_concept(bad)
    bad.write_text(json.dumps({"name": "x", "probes": [{"prompt": "a"}]}))
    with pytest.raises(ConceptError, match="answer"):
        load_concept(bad)
    with pytest.raises(ConceptError, match="unknown erasure method"):
        make_eraser("lobotomy")
    concept = Concept("tiny", probes=_known_probes(lm, 2), keywords=["w3"])
    with pytest.raises(EngramError, match=r"out of range|layer"):
        find_concept_vectors(lm, concept, layers=[lm.layout.n_layers + 3],
                             controls=_known_probes(lm, 2, seed=20))


def test_concept_file_round_trip(tmp_path):
    c = get_concept("harry potter")
    path = tmp_path / "hp.json"
    path.write_text(json.dumps(c.to_dict()))
    again = load_concept(path)
    assert again.probes == c.probes and again.keywords == c.keywords
    assert again.near_controls == c.near_controls and c.near_controls
    assert again.kind == c.kind and c.kind


def test_bundled_concepts_are_known_by_the_embedded_model(smol):
    concepts = bundled_concepts()
    assert len(concepts) >= 10
    names = {c.name for c in concepts}
    for c in concepts:
        assert len(c.probes) >= 16, c.name  # each half of a split keeps at least 8
        assert all(probe_hits(smol, c.probes)), c.name
        assert all(probe_hits(smol, c.paraphrases)), c.name
        # category answers ("wizard", "rock band") are reported apart, never erasure targets
        assert all(probe_hits(smol, c.kind)), c.name
        kinds = {p.answer for p in c.kind}
        assert not any(p.answer in kinds for p in [*c.probes, *c.paraphrases]), c.name
        # no probe of one concept is another's
        assert not any(p.answer in names - {c.name} for p in c.probes)
        # a paraphrase rewords a probe: the same prompt would not test generalisation
        assert not {p.prompt for p in c.paraphrases} & {p.prompt for p in c.probes}, c.name
        # near controls: neighbours' facts the model knows, never about the concept itself
        # (two halves of at least 8: one a tuner keeps inside its budget, one reported)
        assert len(c.near("tune")) >= 8 and len(c.near("eval")) >= 8, c.name
        assert len({p.prompt for p in c.near_controls}) == len(c.near_controls), c.name
        assert all(probe_hits(smol, c.near_controls)), c.name
        named = c.name.removeprefix("The ").lower()
        assert not any(named in p.prompt.lower() for p in c.near_controls), c.name


def test_general_text_is_about_none_of_the_concepts():
    import re

    from engramlab.data.concepts import general_text

    words = {k.lower() for c in bundled_concepts() for k in [*c.keywords, c.name]}
    for paragraph in general_text():
        found = [w for w in words if re.search(rf"\b{re.escape(w)}\b", paragraph.lower())]
        assert not found, (found, paragraph[:60])
    tune, held = general_text(split="tune"), general_text(split="eval")
    assert len(tune) >= 6 and len(held) >= 6 and not set(tune) & set(held)


def test_concept_vectors_tuning_respects_the_budget():
    lm = make_tiny("llama")
    probes = _known_probes(lm, 6)
    controls = _known_probes(lm, 8, seed=30)
    concept = Concept("tiny", probes=probes, keywords=["w3"], text=tiny_text(12, seed=7))
    eraser = ConceptVectors(top_ks=(1, 4), dampings=(0.0, -2.0, -6.0), n_candidates=8,
                            budget=Budget(0.5, 10.0))
    delta = eraser.erase(lm, concept, controls)
    assert set(eraser.candidates) == {"activation", "answer", "distinct"}
    # without near controls "distinct" is the activation ranking
    assert [(c.layer, c.index) for c in eraser.candidates["distinct"]] == \
        [(c.layer, c.index) for c in eraser.candidates["activation"]]
    # "answer" keeps activation's order, among the vectors that write the concept's answers
    answer = [(c.layer, c.index) for c in eraser.candidates["answer"]]
    assert all(c.direct > 0 for c in eraser.candidates["answer"])
    writers = [(c.layer, c.index) for c in eraser.candidates["activation"] if c.direct > 0]
    assert writers and answer[:len(writers)] == writers
    rows: dict[tuple[str, int], list[dict]] = {}
    for t in eraser.trials:
        rows.setdefault((t["selection"], t["top_k"]), []).append(t)
    for row in rows.values():  # mildest damping first; a row stops at its first failure
        assert [t["damping"] for t in row] == [0.0, -2.0, -6.0][:len(row)]
        assert all(t["ok"] for t in row[:-1])
        assert len(row) == 3 or not row[-1]["ok"]
    chosen = [t for t in eraser.trials if t["top_k"] == delta.meta["top_k"]
              and t["damping"] == delta.meta["factor"]
              and t["selection"] == delta.meta["selection"]]
    assert chosen and chosen[0]["ok"]
    ok = [t for t in eraser.trials if t["ok"]]
    assert chosen[0]["target_accuracy"] == min(t["target_accuracy"] for t in ok)
    assert eraser.found == eraser.candidates[delta.meta["selection"]]
    with delta.applied(lm):  # the budget is checked on every control, as reported
        assert accuracy(lm, controls) == chosen[0]["control_accuracy"]
    # "loses less than" is strict: a trial that loses exactly the budget is over it
    base = accuracy(lm, controls)
    lost = sorted({round(base - t["control_accuracy"], 12) for t in eraser.trials} - {0.0})
    if lost:
        again = ConceptVectors(top_ks=(1, 4), dampings=(0.0, -2.0, -6.0), n_candidates=8,
                               budget=Budget(lost[0], 10.0))
        with contextlib.suppress(ConceptError):  # nothing inside the budget is an answer too
            again.erase(lm, concept, controls)
        assert all(not t["ok"] for t in again.trials
                   if round(base - t["control_accuracy"], 12) >= lost[0])
    with pytest.raises(ConceptError, match="no setting"):
        ConceptVectors(top_ks=(1,), dampings=(-4.0,), n_candidates=4,
                       budget=Budget(max_control_drop=-1.0)).erase(lm, concept, controls)
    with pytest.raises(ConceptError, match="below 1"):
        ConceptVectors(damping=1.5, tune=False).erase(lm, concept, controls)


def test_near_controls_enter_the_budget_as_their_own_group():
    """The tuning half of the near controls is checked apart from the pooled controls: with
    the controls' budget wide open, every accepted setting still keeps the near half, and
    the same grid without the check accepts a setting that loses it."""
    lm = make_tiny("llama")
    near = _known_probes(lm, 8, seed=100)
    concept = Concept("tiny", probes=_known_probes(lm, 6), keywords=["w3"], near_controls=near,
                      text=tiny_text(12, seed=7))
    assert concept.near("tune") == near[0::2] and concept.near("eval") == near[1::2]
    with pytest.raises(ConceptError, match="unknown split"):
        concept.near("train")
    controls = _known_probes(lm, 8, seed=30)
    grid = dict(top_ks=(1, 4, 8), dampings=(0.0, -2.0, -6.0), n_candidates=8)
    loose = dict(max_control_drop=2.0, max_perplexity_rise=100.0)
    # records near accuracy, never binds
    seen = ConceptVectors(budget=Budget(**loose, max_near_drop=2.0), **grid)
    seen.erase(lm, concept, controls)
    base = accuracy(lm, concept.near("tune"))
    assert base == 1.0
    assert any(base - t["near_control_accuracy"] >= 0.25 for t in seen.trials)  # it can bind
    strict = ConceptVectors(budget=Budget(**loose, max_near_drop=0.25), **grid)
    with contextlib.suppress(ConceptError):
        strict.erase(lm, concept, controls)
    for t in strict.trials:
        assert t["ok"] == (base - t["near_control_accuracy"] < 0.25)
    off = ConceptVectors(budget=Budget(**loose, max_near_drop=None),
                         **{**grid, "top_ks": (8,), "dampings": (-6.0,)})
    off.erase(lm, concept, controls)
    assert all(t["near_control_accuracy"] is None and t["ok"] for t in off.trials)
    # the fine-tuning tuner checks the same group
    ga = FineTuneUnlearner(method="ga", lrs=(3e-3,), steps=6, every=3,
                           budget=Budget(**loose, max_near_drop=2.0))
    ga.erase(lm, concept, retain=[tiny_text(10, seed=50)], controls=controls)
    assert ga.trials and all(t["near_control_accuracy"] is not None for t in ga.trials)


def test_distinct_selection_discounts_what_fires_on_the_near_controls_too():
    """"distinct" ranks by the smaller of a vector's activation against the controls and
    against the near controls' tuning half: near controls that are the concept's own probes
    make every vector equally active on both (score 0), and the evaluation half is never read."""
    from engramlab.erase.concept_vectors import rank_vectors
    from engramlab.erase.vectors import vector_evidence

    lm = make_tiny("llama")
    probes = _known_probes(lm, 6)
    controls = _known_probes(lm, 8, seed=30)
    others = _known_probes(lm, 6, seed=60)
    twin = [x for pair in zip(probes, others, strict=False) for x in pair]  # tune half: probes
    concept = Concept("tiny", probes=probes, keywords=["w3"], near_controls=twin,
                      text=tiny_text(12, seed=7))
    ev = vector_evidence(lm, concept, controls, [0, 1])
    assert ev.near_activation is not None
    assert torch.allclose(ev.near_activation, torch.zeros_like(ev.near_activation), atol=1e-5)
    distinct = rank_vectors(ev, "distinct")
    assert torch.equal(distinct, torch.minimum(ev.activation, ev.near_activation))
    assert float(distinct.max()) <= 1e-5 < float(ev.activation.max())
    # swapping the evaluation half changes nothing; a different tuning half does
    swapped = Concept("tiny", probes=probes, keywords=["w3"], text=concept.text,
                      near_controls=[x for pair in zip(probes, controls, strict=False)
                                     for x in pair])
    assert torch.equal(vector_evidence(lm, swapped, controls, [0, 1]).near_activation,
                       ev.near_activation)
    kin = Concept("tiny", probes=probes, keywords=["w3"], near_controls=others,
                  text=concept.text)
    assert not torch.allclose(vector_evidence(lm, kin, controls, [0, 1]).near_activation,
                              ev.near_activation)


def test_budget_near_check_is_strict_and_optional():

    budget = Budget()  # on by default: one probe of a tuning half (8-11 probes), not two
    assert budget.keeps_near(1.0, 7 / 8) and not budget.keeps_near(1.0, 9 / 11)
    assert not Budget(max_near_drop=0.10).keeps_near(1.0, 0.9)  # strict, as the controls
    assert budget.keeps_near(None, None)  # a concept without near controls
    assert Budget(max_near_drop=None).keeps_near(1.0, 0.0)


def test_concept_vectors_halve_harry_potter_on_the_embedded_model(smol):
    """The issue's bar on one concept: reversing (×−3) the 8 value vectors that fire most on
    Harry Potter text and not on its near controls (``distinct``, the tuner's choice here) at
    least halves its accuracy while other concepts lose under 10 points and general perplexity
    rises under 10 %; the paraphrases (never used to choose) fall too; and patching the
    unedited MLP coefficients back brings less than half of it back. (Since the category probe
    "a young → wizard" moved to ``kind``, the activation ranking's 12 vectors at ×−2 leave 9 of
    16 probes.)"""
    from engramlab.data.concepts import controls_for

    concept = get_concept("Harry Potter")
    delta = ConceptVectors(tune=False, top_k=8, damping=-3.0, selection="distinct").erase(
        smol, concept, controls_for(concept))
    assert delta.meta["top_k"] == 8 and all(e.is_low_rank for e in delta.entries.values())
    fig = assert_halves(smol, concept, delta)
    pre, post = fig["pre"]["target_accuracy"], fig["post"]["target_accuracy"]
    patched = coefficient_patch_accuracy(smol, delta, concept.probes)
    assert patched - post < 0.5 * (pre - post)


def test_run_erasure_reports_every_measure_and_leaves_the_model(tiny_llama_concept, tmp_path):
    """End to end on a tiny model: the report has each measure the CLI prints, the held-out
    relearning scores exactly the half it did not train on, and the weights come back."""
    from engramlab.erase.run import run_erasure
    from engramlab.evaluate.erasure import heldout_split

    lm, concept = tiny_llama_concept
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    report = run_erasure(lm, concept, "ga", steps=3, lr=1e-3, relearn_steps=2,
                         trace_vectors=4, out=tmp_path / "run")
    page = (tmp_path / "run" / "report.html").read_text()
    assert "ga erasure of &#x27;tiny&#x27;" in page and "held-out probes" in page
    for n, p in lm.model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} left changed"
    json.dumps(report)  # what --json prints
    assert report["pre"]["target_accuracy"] == 1.0
    assert report["pre"]["near_control_accuracy"] == 1.0  # the model's own answers
    assert 0.0 <= report["post"]["near_control_accuracy"] <= 1.0
    # the worst paragraph bounds the pooled rise (a token-weighted mean of log ratios)
    pre_p, post_p = report["pre"]["paragraph_perplexity"], report["post"]["paragraph_perplexity"]
    rises = [b / a - 1 for a, b in zip(pre_p, post_p, strict=True)]
    assert report["perplexity_worst_rise"] == max(rises)
    pooled = report["post"]["perplexity"] / report["pre"]["perplexity"] - 1
    assert report["perplexity_worst_rise"] >= pooled - 1e-9
    train, held = heldout_split(concept.probes)
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    h = report["relearn"]["heldout"]
    assert (h["train_probes"], h["eval_probes"]) == (len(train), len(held))
    assert 0.0 <= h["target_accuracy"] <= 1.0 and 0.0 <= h["unedited"] <= 1.0
    delta = make_eraser("ga", steps=3, lr=1e-3).erase(lm, concept)  # deterministic: same delta
    with delta.applied(lm):
        assert h["before"] == accuracy(lm, held)
    assert len(report["trace"]["vectors"]) == 4
    assert report["delta"]["setting"] == {"steps": 3, "lr": 1e-3}  # what was run, no stamps


@pytest.fixture
def tiny_llama_concept():
    lm = make_tiny("llama")
    concept = Concept("tiny", probes=_known_probes(lm, 8),
                      near_controls=_known_probes(lm, 4, seed=100),
                      text=". ".join(tiny_text(8, seed=s) for s in range(4)) + ".")
    return lm, concept


def test_unseen_controls_are_the_other_concepts_paraphrases():
    from engramlab.data import bundled_concepts, controls_for, unseen_controls_for

    concept = get_concept("Harry Potter")
    unseen, controls = unseen_controls_for(concept), controls_for(concept)
    others = [c for c in bundled_concepts() if c.name != concept.name]
    assert unseen == [p for c in others for p in c.paraphrases]
    assert not {p.prompt for p in unseen} & {p.prompt for p in controls}
    assert not {p.prompt for p in unseen} & {p.prompt for p in concept.paraphrases}
    own = Concept("x", probes=concept.probes[:2], controls=controls[:3])
    assert unseen_controls_for(own) == []


def test_budget_check_is_strict_under_rounding():

    budget = Budget(max_control_drop=0.10, max_perplexity_rise=0.10)  # what every tuner checks
    assert 1.0 - 117 / 130 < 0.10  # the rounding a plain "<" falls for
    assert not budget.allows(1.0, 117 / 130, 20.0, 20.0)  # exactly 10 points lost
    assert budget.allows(1.0, 118 / 130, 20.0, 20.0)
    assert not budget.allows(1.0, 1.0, 20.0, 22.0)  # perplexity exactly +10 %
    assert budget.allows(1.0, 1.0, 20.0, 21.9)


def test_direct_attribution_is_each_vectors_share_of_the_answer_logit():
    """Re-derived from the forward pass with the final norm's scale frozen: removing one
    vector's contribution (coefficient × value vector) from the last residual lowers the
    answer's logit, relative to the vocabulary mean, by the attribution over that scale."""
    from engramlab.batching import target_ids
    from engramlab.erase.vectors import _coefficients_and_effects, direct_attribution
    from engramlab.trace import Trace

    lm = make_tiny("llama")
    norm = lm.layout.final_norm
    with torch.no_grad():  # a non-trivial gain, so leaving it out would show
        norm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(0))
    probe = _known_probes(lm, 1)[0]
    layers = [0, lm.n_layers - 1]
    coeffs, _ = _coefficients_and_effects(lm, [probe], layers)
    direct = direct_attribution(lm, coeffs, [probe], layers)

    ids = torch.tensor([lm.tokenizer(probe.prompt)["input_ids"]])
    points = [f"mlp_key.{i}" for i in layers]
    with torch.no_grad(), Trace(lm).capture(f"resid.{lm.n_layers - 1}", *points) as tr:
        lm.model(input_ids=ids)
    x = tr[f"resid.{lm.n_layers - 1}"][0, -1].double()
    scale = (x.pow(2).mean() + norm.variance_epsilon).sqrt()
    gain, unembed = norm.weight.double(), lm.layout.unembed.weight.double()
    answer = target_ids(lm, probe.prompt, probe.answer)[0]

    def centred_answer_logit(h: torch.Tensor) -> float:
        logits = unembed @ (gain * h / scale)
        return float(logits[answer] - logits.mean())

    for li, layer in enumerate(layers):
        a = tr[points[li]][0, -1].double()
        for j in (int(direct[li].abs().argmax()), 3):
            v = lm.layout.value_weight(layer)[:, j].double()
            drop = centred_answer_logit(x) - centred_answer_logit(x - a[j] * v)
            assert drop == pytest.approx(float(direct[li, j]) / float(scale), rel=1e-4, abs=1e-6)


def test_npo_loss_is_the_papers_log_sigmoid_of_the_ratio_to_the_reference():
    import math

    lm = make_tiny("llama")
    f_ids, f_mask = _rows(lm, [tiny_text(8, seed=s) for s in range(3)])
    r_ids, r_mask = _rows(lm, [tiny_text(8, seed=9)])
    beta = 0.5
    npo = FineTuneUnlearner(method="npo", beta=beta, retain_weight=0.0, tune=False)
    extra = npo._prepare(lm, f_ids, f_mask, r_ids, r_mask)
    with torch.no_grad():
        # at the reference (π = π_ref) every sequence scores −(2/β)·log σ(0) = (2/β)·log 2
        start = float(npo._loss(lm, f_ids, f_mask, r_ids, r_mask, extra))
        assert start == pytest.approx(2 / beta * math.log(2), rel=1e-5)
        # once the forget text is 10 nats less likely than under the reference, the loss has
        # nearly vanished (NPO's updates slow down; gradient ascent's never do)
        shifted = {"ref": extra["ref"] + 10.0}
        late = float(npo._loss(lm, f_ids, f_mask, r_ids, r_mask, shifted))
        assert late == pytest.approx(-2 / beta * math.log(1 / (1 + math.exp(-beta * 10))),
                                     rel=1e-5)


def test_rmu_pushes_the_forget_states_towards_its_random_direction():
    from engramlab.trace import Trace, run_model

    lm = make_tiny("llama")
    concept = Concept("tiny", probes=_known_probes(lm, 3),
                      text=". ".join(tiny_text(8, seed=s) for s in range(4)) + ".")
    retain = [tiny_text(10, seed=50), tiny_text(10, seed=51)]
    eraser = FineTuneUnlearner(method="rmu", steps=30, lr=1e-2, rmu_layer=1, tune=False)
    f_ids, f_mask = _rows(lm, sentences(concept.forget_text))
    r_ids, r_mask = _rows(lm, sentences(retain))
    target = eraser._prepare(lm, f_ids, f_mask, r_ids, r_mask)["target"]
    direction = target / target.norm()

    def forget_states() -> torch.Tensor:
        with torch.no_grad(), Trace(lm).capture("resid.1") as tr:
            run_model(lm, f_ids, f_mask, stop_after=1)
        return tr["resid.1"][f_mask.bool()]

    before = forget_states()
    delta = eraser.erase(lm, concept, retain=retain)
    with delta.applied(lm):
        after = forget_states()
    along_before = float((before @ direction).mean())
    along_after = float((after @ direction).mean())
    assert along_after - along_before > 0.5 * before.norm(dim=-1).mean()
    assert (after - target).norm(dim=-1).mean() < (before - target).norm(dim=-1).mean()


def test_rmu_on_down_projections_trains_only_them_and_still_steers():
    from engramlab.trace import Trace, run_model

    lm = make_tiny("llama")
    concept = Concept("tiny", probes=_known_probes(lm, 3),
                      text=". ".join(tiny_text(8, seed=s) for s in range(4)) + ".")
    retain = [tiny_text(10, seed=50), tiny_text(10, seed=51)]
    eraser = FineTuneUnlearner(method="rmu", steps=60, lr=3e-2, rmu_layer=1, tune=False,
                               weights="down")
    f_ids, f_mask = _rows(lm, sentences(concept.forget_text))
    r_ids, r_mask = _rows(lm, sentences(retain))
    target = eraser._prepare(lm, f_ids, f_mask, r_ids, r_mask)["target"]
    direction = target / target.norm()
    names = {id(p): n for n, p in lm.model.named_parameters()}
    down = {names[id(lm.layout.value_module(i).weight)] for i in (0, 1)}

    def along() -> float:
        with torch.no_grad(), Trace(lm).capture("resid.1") as tr:
            run_model(lm, f_ids, f_mask, stop_after=1)
        return float((tr["resid.1"][f_mask.bool()] @ direction).mean())

    before = along()
    delta = eraser.erase(lm, concept, retain=retain)
    assert set(delta.entries) == down
    assert all(delta.entries[n].to_dense().norm() > 0 for n in down)
    with delta.applied(lm):
        assert along() > before + 0.1


def test_concept_split_is_seeded_disjoint_and_complete():
    lm = make_tiny("llama")
    concept = Concept("tiny", probes=_known_probes(lm, 9), keywords=["w1"])
    tuned, held = concept.split(0)
    again, held_again = concept.split(0)
    assert tuned.probes == again.probes and held == held_again
    assert len(tuned.probes) == 4 or len(tuned.probes) == 5
    assert sorted(map(str, tuned.probes + held)) == sorted(map(str, concept.probes))
    assert not set(tuned.probes) & set(held) and tuned.keywords == ["w1"]
    others = {tuple(concept.split(s)[1]) for s in range(1, 6)}
    assert len(others | {tuple(held)}) > 1  # other seeds, other halves
    with pytest.raises(ConceptError, match="at least 2"):
        Concept("one", probes=concept.probes[:1]).split(0)


def test_erasers_see_only_the_tuning_probes_and_the_report_scores_the_rest(tiny_llama_concept):
    from engramlab.erase.run import run_erasure

    lm, concept = tiny_llama_concept
    seen: list[Probe] = []

    class Spy:
        def erase(self, lm, concept):
            seen.extend(concept.probes)
            return WeightDelta.for_model(lm, {})

    report = run_erasure(lm, concept, "spy", eraser=Spy(), relearn_steps=0, trace_vectors=4,
                         split_seed=3)
    tuned, held = concept.split(3)
    assert seen == tuned.probes and not set(seen) & set(held)
    assert report["split"] == {**report["split"], "seed": 3, "tuned_probes": len(tuned.probes),
                               "held_out_probes": len(held)}
    assert report["pre"]["target_accuracy"] == accuracy(lm, held)
    assert report["pre"]["target_tuned_accuracy"] == accuracy(lm, tuned.probes)
    lines = report_lines(report, "tiny")
    assert lines[1] == (f"tuned on {len(tuned.probes)} probes, reported on the other "
                        f"{len(held)} (split seed 3)")
    assert lines[3].split()[1] == f"{report['pre']['target_accuracy']:.3f}"
    seen.clear()
    unsplit = run_erasure(lm, concept, "spy", eraser=Spy(), relearn_steps=0, trace_vectors=4,
                          split_seed=None)
    assert seen == concept.probes and unsplit["split"]["reported_on"].startswith("every probe")


def test_unedited_figures_are_measured_once_per_concept_and_split(tiny_llama_concept,
                                                                  monkeypatch):
    import engramlab.erase.run as run_module

    lm, concept = tiny_llama_concept
    calls: list[str] = []
    behaviour, relearn = run_module.behaviour, run_module.E.relearn_heldout
    monkeypatch.setattr(run_module, "behaviour",
                        lambda *a, **k: calls.append("behaviour") or behaviour(*a, **k))
    monkeypatch.setattr(run_module.E, "relearn_heldout",
                        lambda *a, **k: calls.append("relearn") or relearn(*a, **k))

    class Damage:  # halves every value weight: the post figures change, the pre ones may not
        def erase(self, lm, concept):
            return WeightDelta.for_model(lm, {
                lm.layout.module_name(lm.layout.value_module(i)) + ".weight":
                ParamDelta(dense=-0.5 * lm.layout.value_module(i).weight.detach().clone())
                for i in range(lm.layout.n_layers)})

    memo: dict = {}
    first = run_erasure(lm, concept, "a", eraser=Damage(), relearn_steps=1, trace_vectors=4,
                        split_seed=1, unedited=memo)
    n = len(calls)
    again = run_erasure(lm, concept, "b", eraser=Damage(), relearn_steps=1, trace_vectors=4,
                        split_seed=1, unedited=memo)
    assert calls[n:] == ["behaviour", "relearn"]  # only after erasing: the rest was kept
    fresh = run_erasure(lm, concept, "c", eraser=Damage(), relearn_steps=1, trace_vectors=4,
                        split_seed=1)
    assert calls.count("relearn") == 2 * 2 + 1  # each run relearns after; the reference once
    for key in ("pre", "relearn"):  # as text: NaN (no paraphrases) equals itself there
        assert json.dumps(again[key]) == json.dumps(fresh[key]) == json.dumps(first[key])
    other = run_erasure(lm, concept, "d", eraser=Damage(), relearn_steps=1, trace_vectors=4,
                        split_seed=2, unedited=memo)
    assert other["pre"]["target_tuned_accuracy"] == accuracy(lm, concept.split(2)[0].probes)


def test_make_eraser_gathers_the_budget_numbers_into_its_budget():
    from engramlab.errors import SettingsError

    eraser = make_eraser("ga", max_control_drop=0.2, max_near_drop=None, steps=3)
    assert eraser.budget == Budget(max_control_drop=0.2, max_near_drop=None)
    assert eraser.steps == 3
    assert make_eraser("concept-vectors").budget == Budget()
    with pytest.raises(SettingsError, match="max_control_drop"):
        make_eraser("rmu", max_control=0.2)


def test_candidate_table_lists_candidates_in_rank_order():
    from engramlab.erase.concept_vectors import Candidate, candidate_table

    found = [Candidate(layer=3, index=17, score=2.5, vocab=1.0, activation=0.5, effect=0.1,
                       drop=0.25, top_tokens=["Potter"]),
             Candidate(layer=1, index=4, score=1.5, vocab=0.2, activation=0.1, effect=0.0)]
    lines = candidate_table(found)
    assert len(lines) == 3 and lines[1].split()[:6] == ["3", "17", "2.50", "1.00", "0.50", "0.250"]
    assert lines[2].split()[5] == "-" and "'Potter'" in lines[1]
