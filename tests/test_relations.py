"""Relation prompts: the same subject under other relations, and relation specificity."""

from __future__ import annotations

import json

import pytest
import torch

from engramlab.data import EditCase, EditRequest, load_cases, save_cases
from engramlab.data.pararel import pararel_cases
from engramlab.errors import RequestError
from engramlab.evaluate import case_scores, fill_relation_answers, score_targets, summarize
from tests.conftest import make_tiny

RECORD = {
    "case_id": 3,
    "requested_rewrite": {"prompt": "{} is located in", "subject": "w5 w6",
                          "target_new": {"str": " w40"}, "target_true": {"str": " w41"}},
    "paraphrase_prompts": ["w1 w5 w6 is in"],
    "neighborhood_prompts": ["w7 is located in"],
    "relation_prompts": [{"prompt": "w5 w6 was built by", "answer": " w12"},
                         {"prompt": "w5 w6 is made of"}],
}


def test_relation_prompts_load_save_and_refuse_bad_shapes(tmp_path):
    path = tmp_path / "cases.json"
    path.write_text(json.dumps([RECORD]))
    (case,) = load_cases(path)
    assert case.relation_prompts == ("w5 w6 was built by", "w5 w6 is made of")
    assert case.relation_answers == (" w12", None)
    assert load_cases(save_cases([case], tmp_path / "again.jsonl")) == [case]
    for bad in ("w5 w6 was built by", [{"answer": " w12"}], [{"prompt": "", "answer": None}],
                [{"prompt": "x", "answer": 3}]):
        path.write_text(json.dumps([{**RECORD, "relation_prompts": bad}]))
        with pytest.raises(RequestError, match="relation_prompts must be a list"):
            load_cases(path)


def test_missing_relation_answers_are_the_unedited_models_first_word():
    lm = make_tiny("llama")
    (case,) = load_cases_from(RECORD)
    (filled,) = fill_relation_answers(lm, [case])
    assert filled.relation_answers[0] == " w12"  # a given answer is kept
    greedy = lm.generate(["w5 w6 is made of"], max_new_tokens=4)[0]
    assert filled.relation_answers[1] == " " + greedy.split()[0]


def test_relation_specificity_counts_prompts_that_keep_their_answer():
    lm = make_tiny("llama")
    (case,) = fill_relation_answers(lm, load_cases_from(RECORD))
    (scores,) = case_scores(lm, [case])
    # recomputed: P(answer) > P(new) at each relation prompt
    want = []
    for prompt, answer in zip(case.relation_prompts, case.relation_answers, strict=True):
        keep, new = score_targets(lm, [prompt, prompt], [answer, " w40"])
        want.append(keep.logprob > new.logprob)
    assert scores.relation == want
    assert summarize([scores])["relation_specificity"] == pytest.approx(sum(want) / len(want))
    # a case without relation prompts has no figure, and does not count as zero
    bare = EditCase(EditRequest("{} is located in", "w5 w6", " w40", " w41"))
    assert summarize(case_scores(lm, [bare, case]))["relation_specificity"] == \
        pytest.approx(sum(want) / len(want))


def load_cases_from(record):
    return [EditCase.from_dict({**record["requested_rewrite"], "target_new": " w40",
                                "target_true": " w41", "relation_prompts":
                                record["relation_prompts"]})]


def test_pararel_relation_prompts_ask_the_same_subject_other_relations(tmp_path):
    patterns, trex = tmp_path / "patterns", tmp_path / "trex"
    patterns.mkdir()
    trex.mkdir()
    relations = {"P1": ("[X] lives in [Y].", "[X] resides in [Y]."),
                 "P2": ("[X] works for [Y].", "[X] is employed by [Y]."),
                 "P3": ("[X] speaks [Y].",)}
    subjects = {"P1": [("Ann", "Rome"), ("Bob", "Oslo"), ("Cy", "Rome")],
                "P2": [("Ann", "Acme"), ("Dee", "Initech")],
                "P3": [("Ann", "Welsh"), ("Bob", "Dutch")]}
    for rel, pats in relations.items():
        (patterns / f"{rel}.jsonl").write_text("\n".join(json.dumps({"pattern": p})
                                                         for p in pats))
        (trex / f"{rel}.jsonl").write_text("\n".join(
            json.dumps({"sub_label": s, "obj_label": o, "uuid": f"{rel}{i}"})
            for i, (s, o) in enumerate(subjects[rel])))
    cases = pararel_cases(tmp_path, 10, seed=0)
    by_subject = {c.request.subject: c for c in cases if c.request.relation_id == "P1"}
    # Ann has two other relations (P3 has one pattern: usable for relation prompts only)
    assert sorted(by_subject["Ann"].relation_prompts) == ["Ann speaks", "Ann works for"]
    assert by_subject["Bob"].relation_prompts == ("Bob speaks",)
    assert by_subject["Cy"].relation_prompts == ()
    assert all(c.request.subject in p for c in cases for p in c.relation_prompts)


def test_relation_specificity_is_in_the_protocols_json(isolated_cache):
    from engramlab.edit import ROME, run_protocol
    from engramlab.stats import KeyStats

    lm = make_tiny("llama")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(lm.d_mlp, 3 * lm.d_mlp, generator=g, dtype=torch.float64)
    rome = ROME(layers=[1], key_stats={1: KeyStats(1, a @ a.T, 3 * lm.d_mlp)},
                templates=[], target={"steps": 3})
    result = run_protocol(lm, rome, load_cases_from(RECORD))
    obj = result.to_json()
    assert obj["post"]["relation_specificity"] == result.post["relation_specificity"]
    assert obj["pre"]["relation_specificity"] is not None
    assert any("relation specificity" in line for line in result.table())


def test_bundled_facts_ask_their_subjects_other_relations():
    from engramlab.data import bundled_cases

    cases = [c for c in bundled_cases() if c.relation_prompts]
    assert len(cases) >= 10
    for case in cases:
        assert all(case.request.subject in p for p in case.relation_prompts)
        assert case.request.text not in case.relation_prompts  # other relations only
        assert case.relation_answers and all(a and a.startswith(" ")
                                             for a in case.relation_answers)
