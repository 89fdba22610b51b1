"""Reasoning–memorisation directions: the generated tasks, the split, the steering maths, the
held-out report and the command."""

from __future__ import annotations

import json
import re

import pytest
import torch

from engramlab.cli import main
from engramlab.data import Fact
from engramlab.errors import EngramError
from engramlab.inspect import (
    REASONING_KINDS,
    DirectionsConfig,
    Task,
    last_states,
    reasoning_directions,
    reasoning_tasks,
    recall_tasks,
    split_tasks,
    steered,
)
from engramlab.inspect.reasoning import SHOTS, auroc, fisher_ratio, mean_difference, solved
from engramlab.trace import Trace, run_model

from .conftest import make_tiny


def _worked(question: str) -> int:
    """The answer of a generated question, worked out from its text alone."""
    if question.endswith("="):
        a, op, b, *rest = question[:-1].split()
        value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        if rest:
            value += int(rest[1]) if rest[0] == "+" else -int(rest[1])
        return value
    had, got, *gave = (int(n) for n in re.findall(r"\d+", question))
    return had + got - sum(gave)


def _pairs(prompt: str) -> tuple[list[tuple[str, int]], str]:
    """A task's solved examples as (question, answer) and its own question."""
    shots = [(q, int(a)) for q, a in re.findall(r"Q: (.*)\nA: (-?\d+)\n", prompt)]
    last = re.fullmatch(r"(?s).*Q: (.*)\nA:", prompt)
    assert last is not None, prompt
    return shots, last.group(1)


def test_generated_tasks_carry_their_true_answers_after_solved_examples():
    tasks = reasoning_tasks(12, seed=3)
    assert [t.kind for t in tasks] == [k for k in REASONING_KINDS for _ in range(12)]
    for t in tasks:
        shots, question = _pairs(t.prompt)
        assert len(shots) == SHOTS and t.prompt.endswith("\nA:")
        assert int(t.answer) == _worked(question), t.prompt
        assert all(a == _worked(q) for q, a in shots)
    questions = [_pairs(t.prompt)[1] for t in tasks]
    assert len(set(questions)) == len(questions)
    shown = {q for t in tasks for q, _ in _pairs(t.prompt)[0]}
    assert not shown & set(questions)  # no example is a scored task
    assert reasoning_tasks(12, seed=3) == tasks and reasoning_tasks(12, seed=4) != tasks


def test_recall_tasks_share_the_format_and_keep_their_examples_apart():
    facts = [Fact("The capital of {} is", s, a) for s, a in
             [("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Peru", "Lima"),
              ("Chile", "Santiago"), ("Japan", None)]]
    tasks = recall_tasks(facts)
    assert [t.answer for t in tasks] == ["Lima", "Santiago"]  # three examples, no answer: no task
    shots, question = _pairs(tasks[0].prompt.replace("A: Paris", "A: 0").replace(
        "A: Madrid", "A: 0").replace("A: Rome", "A: 0"))
    assert question == "The capital of Peru is" and len(shots) == SHOTS


def test_split_keeps_every_kind_on_both_sides_and_is_seeded():
    tasks = [Task(f"p{i}", "a", "x" if i % 3 else "y") for i in range(30)]
    tune, held = split_tasks(tasks, seed=1)
    assert not set(tune) & set(held) and len(tune) + len(held) == 30
    for kind in "xy":
        n = sum(t.kind == kind for t in tasks)
        assert sum(t.kind == kind for t in tune) == round(n / 2)
    assert split_tasks(tasks, seed=1) == (tune, held) and split_tasks(tasks, seed=2) != (tune, held)
    with pytest.raises(EngramError, match="splitting needs 2"):
        split_tasks([Task("p", "a", "z")])


def test_auroc_and_mean_difference():
    assert auroc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert auroc([1.0, 2.0], [3.0, 4.0]) == 0.0
    assert auroc([1.0, 1.0], [1.0]) == 0.5
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(9, generator=g).tolist(), torch.randn(7, generator=g).tolist()
    pairs = [(p > n) + 0.5 * (p == n) for p in pos for n in neg]
    assert auroc(pos, neg) == pytest.approx(sum(pairs) / len(pairs))
    a, b = torch.randn(3, 5, 4, generator=g), torch.randn(3, 6, 4, generator=g)
    d = mean_difference(a, b)
    assert d.dtype == torch.float64
    torch.testing.assert_close(d[1], (a[1].mean(0) - b[1].mean(0)).double())


def _logits(lm, text="w3 w9 w4 w7"):
    ids = torch.tensor([lm.tokenizer(text)["input_ids"]])
    return lm.model(input_ids=ids).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["scale", "add"])
def test_alpha_zero_is_the_identity_and_other_alphas_are_not(family, mode):
    lm = make_tiny(family)
    direction = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(1))
    plain = _logits(lm)
    with steered(lm, direction, 0.0, mode=mode, layer=1):
        torch.testing.assert_close(_logits(lm), plain, rtol=0, atol=0)
    with steered(lm, direction, 0.5, mode=mode, layer=1):
        assert (_logits(lm) - plain).abs().max() > 1e-4
    torch.testing.assert_close(_logits(lm), plain, rtol=0, atol=0)  # the hooks are gone


def test_scale_minus_one_removes_the_direction_from_every_point_it_edits():
    lm = make_tiny("llama")
    direction = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(2))
    unit = direction / direction.norm()
    edited = [f"resid.{i}" for i in range(lm.n_layers - 1)] + \
        [f"{k}.{i}" for k in ("attn_out", "mlp_out") for i in range(lm.n_layers)]
    ids = torch.tensor([lm.tokenizer("w3 w9 w4 w7")["input_ids"]])
    with Trace(lm).capture(*edited) as before:
        run_model(lm, ids)
    assert max(float((before[p] @ unit).abs().max()) for p in edited) > 1e-2
    with steered(lm, direction, -1.0, mode="scale"), Trace(lm).capture(*edited) as after:
        run_model(lm, ids)
    for p in edited:
        assert float((after[p] @ unit).abs().max()) < 1e-5, p


def test_add_moves_the_recall_mean_onto_the_reasoning_mean_at_its_layer():
    lm = make_tiny("llama")
    reasoning = ["w3 w4 w5", "w3 w6 w5 w8", "w9 w4"]
    recall = ["w40 w41", "w42 w43 w44", "w45 w46", "w47"]
    r, m = last_states(lm, reasoning), last_states(lm, recall)
    assert r.shape == (lm.n_layers + 1, 3, lm.d_model)
    layer = 2
    direction = mean_difference(r, m)[layer]
    with steered(lm, direction, 1.0, mode="add", layer=layer):
        moved = last_states(lm, recall)
    torch.testing.assert_close(moved[layer].mean(0), r[layer].mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(moved[:layer], m[:layer])  # earlier layers untouched


@pytest.mark.parametrize("alpha", [float("nan"), float("inf")])
def test_steering_refuses_a_non_finite_alpha_and_a_layer_out_of_range(alpha):
    lm = make_tiny("gpt2")
    with pytest.raises(EngramError, match="finite"), steered(lm, torch.ones(lm.d_model), alpha):
        pass
    with pytest.raises(EngramError, match="out of range"), \
            steered(lm, torch.ones(lm.d_model), 1.0, mode="add", layer=lm.n_layers):
        pass
    with pytest.raises(EngramError, match="finite"):
        DirectionsConfig(alphas=(0.0, alpha)).check()


def _tiny_tasks() -> tuple[list[Task], list[Task]]:
    reasoning = [Task(f"w3 w{4 + i % 5} w{10 + i % 7} w2", f"w{20 + i % 3}", f"r{i % 2}")
                 for i in range(16)]
    recall = [Task(f"w50 w{60 + i % 9} w{70 + i % 4}", f"w{30 + i % 3}", "facts")
              for i in range(14)]
    return reasoning, recall


def test_report_reads_directions_on_the_tuning_half_and_figures_on_the_held_out_half():
    lm = make_tiny("llama")
    reasoning, recall = _tiny_tasks()
    config = DirectionsConfig(alphas=(0.0, 0.5, -1.0), split_seed=3)
    report = reasoning_directions(lm, reasoning, recall, config)
    (tr, hr), (tm, hm) = split_tasks(reasoning, 3), split_tasks(recall, 3)
    assert report.counts == {"reasoning": {"tune": len(tr), "held": len(hr)},
                             "recall": {"tune": len(tm), "held": len(hm)}}
    states = {k: last_states(lm, [t.prompt for t in v])
              for k, v in {"tr": tr, "hr": hr, "tm": tm, "hm": hm}.items()}
    dirs = mean_difference(states["tr"], states["tm"])
    for lay in (1, report.layer):
        unit = dirs[lay] / dirs[lay].norm()
        expected = auroc((states["hr"][lay].double() @ unit).tolist(),
                         (states["hm"][lay].double() @ unit).tolist())
        assert report.separation[lay]["auroc"] == pytest.approx(expected)
        tune = [(states[k][lay].double() @ unit) for k in ("tr", "tm")]
        assert report.separation[lay]["fisher_tune"] == pytest.approx(fisher_ratio(*tune))
        held = [(states[k][lay].double() @ unit) for k in ("hr", "hm")]
        d = (held[0].mean() - held[1].mean()) / ((held[0].var() + held[1].var()) / 2).sqrt()
        assert report.separation[lay]["cohens_d"] == pytest.approx(float(d))
    assert report.direction_norms == pytest.approx([float(d.norm()) for d in dirs[:-1]])
    fisher = [s["fisher_tune"] for s in report.separation]
    assert report.layer == max(range(1, lm.n_layers), key=fisher.__getitem__)
    rows = {r["alpha"]: r for r in report.steering}
    assert [r["alpha"] for r in report.steering] == [-1.0, 0.0, 0.5]
    base = solved(lm, hr)
    assert rows[0.0]["reasoning"]["accuracy"] == sum(base) / len(base)
    assert rows[0.0]["reasoning"]["change"] == 0
    with steered(lm, dirs[report.layer], -1.0):
        ablated = solved(lm, hm)
    assert rows[-1.0]["recall"]["accuracy"] == sum(ablated) / len(ablated)
    lines = report.lines()
    assert f"AUROC {report.separation[report.layer]['auroc']:.3f}" in lines[1]
    given = reasoning_directions(lm, reasoning, recall,
                                 DirectionsConfig(alphas=(0.5,), layer=1, split_seed=3))
    assert given.layer == 1 and given.layer_chosen_on == "given"
    assert [r["alpha"] for r in given.steering] == [0.0, 0.5]  # the base is always measured
    assert given.steering[0]["reasoning"]["accuracy"] == sum(base) / len(base)


def test_directions_command(tmp_path, capsys):
    src = make_tiny("llama").save(tmp_path / "m")
    facts = tmp_path / "f.jsonl"
    facts.write_text("".join(json.dumps({"subject": f"w{40 + i}", "attribute": f"w{60 + i % 3}",
                                         "prompt": f"w3 w{40 + i} w9"}) + "\n"
                             for i in range(12)))
    args = ["directions", "--model", str(src), "--facts", str(facts), "--per-kind", "4",
            "--alphas", "0", "0.5"]
    assert main([*args, "--json", "--png", str(tmp_path / "d.png")]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["counts"]["recall"] == {"tune": 4, "held": 5}
    assert obj["counts"]["reasoning"]["held"] == 2 * len(REASONING_KINDS)
    assert [r["alpha"] for r in obj["steering"]] == [0.0, 0.5]
    assert (tmp_path / "d.png").stat().st_size > 0
    assert main(args) == 0
    text = capsys.readouterr().out
    layer = obj["layer"]
    assert f"steering layer {layer}" in text
    assert f"AUROC {obj['separation'][layer]['auroc']:.3f}" in text
    assert main([*args, "--layer", "7", "--json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out of range" in err[0]


def test_directions_command_refuses_nan_before_loading(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["directions", "--alphas", "0", "nan"])
    assert exc.value.code == 2 and "--alphas" in capsys.readouterr().err


@pytest.mark.embedded
def test_embedded_direction_separates_held_out_reasoning_from_recall(smol):
    """The paper's picture on SmolLM2: the tuning-half direction separates the held-out halves
    once the question has been read (not at block 0, whose input at the last token is the same
    for every task), and removing it everywhere costs the reasoning tasks accuracy."""
    from engramlab.data import load_facts
    from engramlab.data.bundled import bundled_facts_path
    from engramlab.inspect import recall_tasks

    reasoning = reasoning_tasks(6, kinds=["add", "multiply", "chain", "word"])
    recall = recall_tasks(load_facts(bundled_facts_path("smollm2_facts"), limit=40))
    report = reasoning_directions(smol, reasoning, recall, DirectionsConfig(alphas=(0.0, -1.0)))
    assert report.separation[0]["auroc"] == 0.5
    assert report.separation[report.layer]["auroc"] > 0.9
    rows = {r["alpha"]: r for r in report.steering}
    assert rows[-1.0]["reasoning"]["accuracy"] < rows[0.0]["reasoning"]["accuracy"]
