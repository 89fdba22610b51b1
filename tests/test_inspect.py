"""Causal tracing: the restored probabilities, their grouping and averages, the facts it reads,
the command, and the paper's picture on the embedded model."""

from __future__ import annotations

import json

import pytest
import torch

from engramlab.cli import main
from engramlab.data import Fact, load_facts
from engramlab.errors import EngramError
from engramlab.inspect import TraceConfig, trace_fact, trace_facts
from engramlab.trace import Trace, run_model

from .conftest import make_tiny

FACT = Fact("w3 {} w9 w4", "w7 w8 w5", answer=None)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_zero_noise_restores_everything(family):
    lm = make_tiny(family)
    tr = trace_fact(lm, FACT, noise_std=1.0, config=TraceConfig(samples=2, noise=0.0))
    assert tr.p_low == pytest.approx(tr.p_clean, rel=1e-5)
    for grid in tr.grids.values():
        assert grid.shape == (lm.n_layers, 6)
        assert torch.allclose(grid, torch.ones_like(grid), atol=1e-5)


def test_the_last_state_restores_the_clean_answer_and_noise_lowers_it():
    lm = make_tiny("llama")
    tr = trace_fact(lm, FACT, noise_std=1.0, config=TraceConfig(samples=4, noise=20.0))
    assert tr.p_low != pytest.approx(tr.p_clean, rel=1e-3)  # the noise does something
    resid = tr.grids["resid"]
    # the last block's output at the last token is what the answer is read from
    assert resid[-1, -1] == pytest.approx(1.0, abs=1e-5)
    # tokens before the subject cannot see the noise: restoring them changes nothing
    assert torch.allclose(resid[:, 0], torch.full((lm.n_layers,), tr.low))
    # restoring a subject token's residual does change the corrupted run
    assert resid[0, 1:4].ne(tr.low).any()


def test_one_state_matches_a_direct_restoration():
    lm = make_tiny("llama")
    config = TraceConfig(samples=3, noise=5.0, window=2, rows=6)  # two states a forward
    noise_std = 0.7
    tr = trace_fact(lm, FACT, noise_std, config)
    ids = torch.tensor([lm.tokenizer(FACT.text)["input_ids"]])
    start, end = tr.subject
    noise = torch.randn(3, end - start, lm.d_model,
                        generator=torch.Generator().manual_seed(0)) * 5.0 * noise_std
    last = f"resid.{lm.n_layers - 1}"
    for state, point, layer, token, layers in (("mlp", "mlp_out", 1, 3, [0, 1]),
                                               ("attn", "attn_out", 2, 4, [1, 2]),
                                               ("resid", "resid", 1, 2, [1])):
        points = [f"{point}.{j}" for j in layers]
        with torch.no_grad(), Trace(lm).capture(*points) as clean:
            run_model(lm, ids)

        def corrupt(t):
            t = t.clone()
            t[:, start:end] += noise
            return t

        run = Trace(lm).edit("embed", corrupt).capture(last)
        for p in points:
            run.replace(p, clean[p][0, token], positions=token)
        with torch.no_grad(), run:
            run_model(lm, ids.expand(3, -1))
        probs = torch.softmax(lm.logits_from_hidden(run[last][:, -1]), -1)[:, tr.answer_id]
        assert float(tr.grids[state][layer, token]) == pytest.approx(
            float(probs.mean()) / tr.p_clean, rel=1e-4)


def test_groups_follow_the_paper():
    lm = make_tiny("llama")
    tr = trace_fact(lm, FACT, 1.0, TraceConfig(samples=1, states=("resid",)))
    assert tr.subject == (1, 4)
    assert tr.groups() == {"first subject": [1], "middle subject": [2], "last subject": [3],
                           "first after": [4], "further": [], "last": [5]}
    grouped = tr.grouped("resid")
    assert torch.equal(grouped[:, 2], tr.grids["resid"][:, 3])
    assert torch.isnan(grouped[:, 4]).all()  # no "further" tokens in this prompt
    long = trace_fact(lm, Fact("w3 {} w4 w5 w6", "w7"), 1.0,
                      TraceConfig(samples=1, states=("resid",)))
    g = long.grouped("resid")
    assert torch.isnan(g[:, 1]).all()  # a one-token subject has no middle
    assert long.groups()["further"] == [3]  # w5: after the first later token, before the last
    assert torch.equal(g[:, 4], long.grids["resid"][:, 3])


def test_report_averages_facts_and_finds_the_peak():
    lm = make_tiny("llama")
    facts = [FACT, Fact("w11 {} w12", "w13 w14")]
    rep = trace_facts(lm, facts, TraceConfig(samples=2, noise=10.0))
    one = [trace_fact(lm, f, rep.noise_std, rep.config) for f in facts]
    expected = torch.stack([t.grouped("mlp") for t in one]).nanmean(0)
    assert torch.allclose(rep.average("mlp"), expected, equal_nan=True)
    s = rep.summary("mlp")
    grid = torch.tensor([[float("nan") if v is None else v for v in row] for row in s["grid"]])
    best = torch.nan_to_num(grid, nan=-1.0).max()
    assert s["peak_recovery"] == pytest.approx(float(best), abs=1e-3)
    assert s["peak_indirect_effect"] == pytest.approx(s["peak_recovery"] - s["low"])
    lo, hi = s["by_group"]["last"]["peak_layer_ci95"]
    assert 0 <= lo <= hi < lm.n_layers


def test_peak_interval_is_tight_when_facts_agree_and_wide_when_they_do_not():
    from engramlab.inspect import FactTrace, TraceReport

    def trace(peak: int) -> FactTrace:
        grid = torch.full((8, 3), 0.1)
        grid[peak, 1:] = 0.9
        return FactTrace(FACT, ["a", "b", "c"], (1, 2), "x", 0, None, 1.0, 0.1,
                         {"mlp": grid})

    config = TraceConfig(states=("mlp",))
    same = TraceReport("m", config, 1.0, [trace(5) for _ in range(6)], 6)
    assert same.peak_interval("mlp", 2) == [5, 5]
    mixed = TraceReport("m", config, 1.0, [trace(k) for k in (1, 2, 6, 7, 1, 7)], 6)
    lo, hi = mixed.peak_interval("mlp", 2)
    assert lo <= 2 and hi >= 6


def test_known_only_keeps_facts_the_model_answers():
    lm = make_tiny("llama")
    tr = trace_fact(lm, FACT, 1.0, TraceConfig(samples=1, states=("resid",)))
    right = Fact(FACT.prompt, FACT.subject, answer=tr.answer.strip())
    wrong_word = "w50" if tr.answer.strip() != "w50" else "w51"
    wrong = Fact(FACT.prompt, FACT.subject, answer=wrong_word)
    rep = trace_facts(lm, [right, wrong], TraceConfig(samples=1, states=("resid",)))
    assert rep.n_given == 2 and [f.fact for f in rep.facts] == [right]
    with pytest.raises(EngramError, match="answers none"):
        trace_facts(lm, [wrong], TraceConfig(samples=1, states=("resid",)))


def test_facts_load_from_known_1000_and_edit_cases(tmp_path):
    known = tmp_path / "known.json"
    known.write_text(json.dumps([{"known_id": 4, "subject": "Paris", "attribute": "France",
                                  "prompt": "Paris is the capital of", "relation_id": "P1"}]))
    [f] = load_facts(known)
    assert (f.prompt, f.subject, f.answer, f.fact_id) == ("{} is the capital of", "Paris",
                                                          "France", 4)
    cases = tmp_path / "c.jsonl"
    cases.write_text(json.dumps({"prompt": "{} is in", "subject": "Rome", "target_new": "Peru",
                                 "target_true": "Italy"}) + "\n")
    [g] = load_facts(cases)
    assert (g.text, g.answer) == ("Rome is in", "Italy")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"subject": "Oslo", "attribute": "Norway",
                                "prompt": "The capital is"}]))
    with pytest.raises(EngramError, match="not found in prompt"):
        load_facts(bad)


def test_trace_command(tmp_path, capsys):
    src = make_tiny("llama").save(tmp_path / "m")
    facts = tmp_path / "f.jsonl"
    facts.write_text("".join(json.dumps({"prompt": p, "subject": s, "target_new": "w1"}) + "\n"
                             for p, s in (("w3 {} w9 w4", "w7 w8"), ("{} w5 w6", "w2"))))
    args = ["trace", "--model", str(src), "--facts", str(facts), "--samples", "2"]
    assert main([*args, "--json", "--out", str(tmp_path / "out")]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["n"] == 2 and set(obj["states"]) == {"resid", "mlp", "attn"}
    for s in obj["states"].values():
        assert len(s["grid"]) == 3 and len(s["grid"][0]) == 6
        assert {"peak_layer", "peak_position", "peak_recovery"} <= set(s)
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    assert len(saved["facts"]) == 2 and saved["states"] == obj["states"]
    assert (tmp_path / "out" / "average.png").stat().st_size > 0
    assert (tmp_path / "out" / "fact_01.png").stat().st_size > 0
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3  # the average and both facts, inline
    assert main(args) == 0
    text = capsys.readouterr().out
    mlp = obj["states"]["mlp"]
    assert f"peak {mlp['peak_recovery']:.2f} at layer {mlp['peak_layer']}" in text


@pytest.mark.parametrize("extra, message", [
    (["--noise", "nan"], "--noise"),
    (["--samples", "0"], "--samples"),
])
def test_trace_refuses_bad_settings(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        main(["trace", *extra])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_trace_refuses_a_subject_missing_from_its_prompt(tmp_path, capsys, monkeypatch):
    import engramlab.models as models

    facts = tmp_path / "f.json"
    facts.write_text(json.dumps([{"subject": "Oslo", "attribute": "Norway",
                                  "prompt": "The capital is"}]))
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert main(["trace", "--facts", str(facts)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Oslo" in err[0] and "not found" in err[0]
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    assert main(["trace", "--facts", str(empty)]) == 2
    assert "no facts" in capsys.readouterr().err


@pytest.mark.embedded
def test_embedded_trace_peaks_where_rome_edits_work(smol):
    from engramlab.data.bundled import bundled_cases, bundled_facts_path
    from engramlab.edit import ROME
    from engramlab.evaluate.counterfact import case_scores

    facts = load_facts(bundled_facts_path("smollm2_facts"), limit=3)
    rep = trace_facts(smol, facts, TraceConfig(samples=3, states=("mlp", "attn")))
    assert len(rep.facts) == 3  # the bundled facts are all known
    mlp, attn = rep.summary("mlp"), rep.summary("attn")
    assert mlp["low"] < 0.2  # the noise makes the model forget the subject
    # the MLPs matter at the subject's last token, the attention at the prompt's last token
    assert mlp["by_group"]["last subject"]["peak_recovery"] > \
        mlp["by_group"]["last"]["peak_recovery"]
    assert attn["by_group"]["last"]["peak_recovery"] > \
        attn["by_group"]["last subject"]["peak_recovery"]
    layer = mlp["by_group"]["last subject"]["peak_layer"]
    case = bundled_cases()[0]
    delta = ROME(layers=[layer]).edit(smol, case.request)
    with delta.applied(smol):
        [score] = case_scores(smol, [case])
    assert score.to_dict()["efficacy"] == 1.0  # an edit at the traced layer works


def _delta_on(lm, name: str, seed: int = 0):
    from engramlab.delta import ParamDelta, WeightDelta

    weight = dict(lm.model.named_parameters())[name]
    g = torch.Generator().manual_seed(seed)
    return WeightDelta.for_model(lm, {name: ParamDelta(
        dense=torch.randn(weight.shape, generator=g) * 2 * weight.std())})


PROMPTS = ["w3 w7 w8", "w11 w12 w13 w14", "w20 w5"]


def test_krs_is_one_where_the_patch_undoes_the_delta_and_zero_below_it():
    from engramlab.inspect import dissect

    lm = make_tiny("llama")
    # a change to layer 1's MLP keys (up projection): patching layer 1's coefficients undoes
    # it exactly; patching layer 0's cannot touch it
    d = dissect(lm, _delta_on(lm, "model.layers.1.mlp.up_proj.weight"), PROMPTS, window=1,
                tokens=3)
    assert d.windows == [(0, 1), (1, 2), (2, 3)]
    assert d.krs["mlp"][1] == pytest.approx(1.0, abs=1e-6)
    assert d.krs["mlp"][0] == pytest.approx(0.0, abs=1e-6)
    assert d.krs["attn"][0] == pytest.approx(0.0, abs=1e-6)  # attention below layer 1 too
    assert d.loss_unlearned != pytest.approx(d.loss_original)
    # a change to layer 2's attention output projection: undone by patching layer 2's attn_out
    d2 = dissect(lm, _delta_on(lm, "model.layers.2.self_attn.o_proj.weight"), PROMPTS,
                 window=1, tokens=3)
    assert d2.krs["attn"][2] == pytest.approx(1.0, abs=1e-6)
    assert d2.krs["attn"][1] == pytest.approx(0.0, abs=1e-6)
    # a window covering the changed layer recovers all of it
    d3 = dissect(lm, _delta_on(lm, "model.layers.1.mlp.up_proj.weight"), PROMPTS, window=2,
                 tokens=3, kinds=("mlp",))
    assert d3.windows == [(0, 2), (1, 3)] and d3.krs["mlp"] == pytest.approx([1.0, 1.0])


def test_krs_follows_its_formula():
    from engramlab.evaluate.erasure import patched_logits
    from engramlab.inspect import dissect
    from engramlab.inspect.unlearning import continuation_losses, continue_greedily

    lm = make_tiny("llama")
    delta = _delta_on(lm, "model.layers.0.mlp.down_proj.weight")  # the values themselves
    d = dissect(lm, delta, PROMPTS, window=2, tokens=2, kinds=("mlp",))
    c = continue_greedily(lm, PROMPTS, 2)
    with torch.no_grad():
        orig = continuation_losses(lm.model(input_ids=c.ids, attention_mask=c.mask).logits, c)
        with delta.applied(lm):
            unl = continuation_losses(lm.model(input_ids=c.ids, attention_mask=c.mask).logits, c)
        patched = continuation_losses(
            patched_logits(lm, delta, c.ids, c.mask, ["mlp_key.0", "mlp_key.1"]), c)
    expected = 1 - ((patched - orig) ** 2).mean() / ((unl - orig) ** 2).mean()
    assert d.krs["mlp"][0] == pytest.approx(float(expected), abs=1e-6)
    assert d.krs["mlp"][0] < 0.99  # patching keys cannot undo a change to the values
    assert c.ends[0] - c.starts[0] == 2


def test_dissect_refuses_what_it_cannot_measure():
    from engramlab.delta import WeightDelta
    from engramlab.inspect import dissect

    lm = make_tiny("llama")
    delta = _delta_on(lm, "model.layers.1.mlp.up_proj.weight")
    with pytest.raises(EngramError, match="window"):
        dissect(lm, delta, PROMPTS, window=9)
    with pytest.raises(EngramError, match="unknown activations"):
        dissect(lm, delta, PROMPTS, kinds=("resid",))
    with pytest.raises(EngramError, match="nothing to recover"):
        dissect(lm, WeightDelta.for_model(lm, {}), PROMPTS, window=2)


def test_dissect_command_reads_a_saved_erasure(tmp_path, capsys):
    lm = make_tiny("llama")
    src = lm.save(tmp_path / "m")
    concept = tmp_path / "c.json"
    concept.write_text(json.dumps({
        "name": "w-things", "probes": [{"prompt": p, "answer": "w9"} for p in PROMPTS],
        "paraphrases": [{"prompt": "w30 w31", "answer": "w9"}]}))
    run = tmp_path / "erased"
    _delta_on(lm, "model.layers.1.mlp.up_proj.weight").save(run / "delta")
    (run / "report.json").write_text(json.dumps({"split": {"seed": 3}}))
    args = ["dissect", "--model", str(src), "--concept-file", str(concept), "--window", "1",
            "--tokens", "2"]
    assert main([*args, "--delta", str(run), "--json", "--png", str(tmp_path / "k.png")]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["split_seed"] == 3 and obj["windows"] == [[0, 1], [1, 2], [2, 3]]
    assert obj["krs"]["mlp"][1] == pytest.approx(1.0, abs=1e-5)
    assert obj["peak"]["mlp"]["window"] == [1, 2]
    assert (tmp_path / "k.png").stat().st_size > 0
    assert main([*args, "--delta", str(tmp_path / "nowhere")]) == 2
    assert "--delta" in capsys.readouterr().err


@pytest.mark.embedded
def test_embedded_fine_tuning_unlearning_is_undone_by_patching_coefficients(smol):
    """Hong et al.'s finding on SmolLM2: after gradient ascent, putting the unedited MLP
    coefficients back in a window of layers restores most of the behaviour, far more than
    putting the attention outputs back."""
    from engramlab.data import general_text, get_concept
    from engramlab.erase.run import make_eraser
    from engramlab.inspect import dissect

    concept = get_concept("Harry Potter")
    tuned, held = concept.split(0)
    prompts = [p.prompt for p in [*held, *concept.paraphrases]]
    ga = make_eraser("ga", tune=False, steps=10, lr=4e-5).erase(
        smol, tuned, retain=list(general_text())[:4])
    d = dissect(smol, ga, prompts, window=10, stride=10, tokens=4)
    assert d.loss_unlearned > d.loss_original + 0.5
    assert max(d.krs["mlp"]) > 0.6 and max(d.krs["mlp"]) > max(d.krs["attn"]) + 0.2


def _known_probes(lm, prompts):
    """Probes whose answers are what ``lm`` predicts: a tiny random model "knows" them."""
    from engramlab.batching import encode_prompts
    from engramlab.data.concepts import Probe
    from engramlab.evaluate.erasure import last_logits

    ids, lengths = encode_prompts(lm, prompts)
    with torch.no_grad():
        pred = last_logits(lm, ids, lengths).argmax(-1).tolist()
    return [Probe(p, lm.tokenizer.decode([t]).strip()) for p, t in zip(prompts, pred,
                                                                        strict=True)]


def _tiny_concept(lm):
    from engramlab.data.concepts import Concept

    probes = _known_probes(lm, [f"w{i} w{i + 1}" for i in range(10, 30, 2)])
    controls = _known_probes(lm, [f"w{i} w{i + 3}" for i in range(40, 70, 3)])
    return Concept("tiny", probes, keywords=["w10"], controls=controls,
                   text="w10 w11 w12 w13 w14 w15")


def test_specialisation_score_follows_its_formula_and_its_random_baseline():
    from engramlab.erase.concept_vectors import vectors_delta
    from engramlab.evaluate.erasure import accuracy
    from engramlab.inspect import specialisation

    lm = make_tiny("llama")
    concept = _tiny_concept(lm)
    _, held = concept.split(0)
    general = concept.controls[1::2]
    drops = []
    for k in (96, 150):  # the tiny model loses general answers at one, concept ones at the other
        r = specialisation(lm, concept, top_k=k, random_draws=2)
        assert r["concept_before"] == 1.0 and r["general_before"] == 1.0  # its own answers
        with vectors_delta(lm, [tuple(v) for v in r["vectors"]], damping=0.0).applied(lm):
            c_after, g_after = accuracy(lm, held), accuracy(lm, general)
        assert r["pss"] == pytest.approx((1 - c_after) - (1 - g_after))
        assert len(r["vectors"]) == k and r["random_pss"] is not None
        drops.append((r["concept_drop"], r["general_drop"]))
    assert any(c > 0 for c, _ in drops) and any(g > 0 for _, g in drops)


def test_specialisation_is_zero_when_the_vectors_are_zero_already():
    from engramlab.erase.concept_vectors import vectors_delta
    from engramlab.inspect import masked_pss, specialisation

    lm = make_tiny("llama")
    concept = _tiny_concept(lm)
    first = specialisation(lm, concept, top_k=150, random_draws=0)
    vectors = [tuple(v) for v in first["vectors"]]
    _, held = concept.split(0)
    general = concept.controls[1::2]
    assert first["concept_drop"] != 0 or first["general_drop"] != 0  # masking did something
    with vectors_delta(lm, vectors, damping=0.0).applied(lm):
        again = masked_pss(lm, vectors, held, general)
    assert again["pss"] == 0.0 and again["concept_drop"] == 0.0 and again["general_drop"] == 0.0


def test_specialise_command(tmp_path, capsys):
    lm = make_tiny("llama")
    src = lm.save(tmp_path / "m")
    concept = _tiny_concept(lm)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(concept.to_dict()))
    assert main(["specialise", "--model", str(src), "--concept-file", str(path), "--top-k",
                 "150", "--random-draws", "1", "--json", "--png", str(tmp_path / "s.png")]) == 0
    table = json.loads(capsys.readouterr().out)
    assert (tmp_path / "s.png").stat().st_size > 0
    [row] = table["concepts"]
    assert row["concept"] == "tiny" and row["top_k"] == 150
    assert table["mean_pss"] == pytest.approx(row["pss"]) and table["sd_pss"] is None
    assert main(["specialise", "--concepts", "Atlantis"]) == 2
    assert "Atlantis" in capsys.readouterr().err
