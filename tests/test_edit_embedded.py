"""Editing behaviour on the embedded SmolLM2: edits flip answers, generalise, spare neighbours."""

from __future__ import annotations

import json

import pytest
import torch

from engramlab.cli import main
from engramlab.data.bundled import bundled_cases
from engramlab.edit import MEMIT, ROME, AlphaEdit, demo_edit, run_protocol
from engramlab.edit.demo import DEMO_CASE
from engramlab.evaluate import case_scores, edit_scores

pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def rome(smol):
    editor = ROME()
    editor.prepare(smol)
    return editor


def test_rome_edit_flips_the_answer_generalises_and_spares_the_neighbour(smol, rome):
    case = DEMO_CASE
    before = case_scores(smol, [case])[0]
    assert before.efficacy == [False] and before.neighborhood == [True]
    original = {n: p.clone() for n, p in smol.model.named_parameters()}
    delta = rome.edit(smol, case.request)
    with delta.applied(smol):
        after = case_scores(smol, [case])[0]
        top = smol.top_tokens(case.request.text, k=1)[0][0]
    assert after.efficacy == [True] and top == " Rome"
    assert after.paraphrase == [True]  # "can be found in the city of" now says Rome too
    assert after.neighborhood == [True]  # the Louvre stays in Paris
    assert all(torch.equal(p, original[n]) for n, p in smol.model.named_parameters())


def test_rome_independent_on_bundled_facts_beats_the_unedited_model(smol, rome):
    cases = bundled_cases()[:12]
    result = run_protocol(smol, rome, cases, protocol="independent")
    assert result.pre["efficacy"] == 0
    assert result.post["efficacy"] >= 0.9
    assert result.post["paraphrase"] >= 0.75
    assert result.post["neighborhood"] >= 0.8 * result.pre["neighborhood"]
    assert len(result.deltas) == 12 and all(d.num_params() == 576 + 1536 for d in result.deltas)
    for name, (lo, hi) in result.to_json()["post_ci95"].items():
        assert lo <= result.post[name] <= hi


@pytest.mark.parametrize("cls", [MEMIT, AlphaEdit])
def test_mass_editors_write_a_batch_of_facts(smol, cls):
    cases = bundled_cases()[:10]
    delta = cls().edit(smol, [c.request for c in cases])
    pre = edit_scores(smol, cases)
    with delta.applied(smol):
        post = edit_scores(smol, cases)
    assert pre["efficacy"] == 0
    assert post["efficacy"] >= 0.8
    assert post["paraphrase"] >= 0.5
    assert post["neighborhood"] >= 0.7


def test_demo_edit_reports_before_and_after(smol):
    out = demo_edit(smol, progress=False)
    assert out["post"]["efficacy"] == 1.0
    assert "Rome" in out["after"][DEMO_CASE.request.text]
    assert any("before:" in line for line in out["lines"])


def test_cli_edit_prints_the_specified_json(capsys, tmp_path):
    assert main(["edit", "--method", "rome", "--limit", "3", "--json",
                 "--out", str(tmp_path / "run")]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("method", "model", "protocol", "n", "pre", "post", "seconds_per_edit",
                "stats_seconds"):
        assert key in out
    shown = {"efficacy", "paraphrase", "neighborhood", "relation_specificity"}
    assert set(out["pre"]) == shown
    assert set(out["post"]) == shown | {"fluency"}
    assert out["n"] == 3 and out["protocol"] == "independent"
    run = tmp_path / "run"
    assert (run / "report.md").is_file() and (run / "result.json").is_file()
    page = (run / "report.html").read_text()
    assert f"engram edit: {out['method']}" in page and "efficacy" in page
    assert len((run / "cases.jsonl").read_text().splitlines()) == 3
    assert len(list((run / "deltas").iterdir())) == 3
