"""Sequential runs: an interrupted run resumed from its checkpoint is the run that was never
interrupted, a checkpoint of another run is refused, and the final scores are those of the
edited model whether or not the run evaluated along the way."""

from __future__ import annotations

import pytest
import torch

from engramlab import EditRequest
from engramlab.data.records import EditCase
from engramlab.edit import MEMIT, DeltaEdit, EditHParams, run_protocol
from engramlab.errors import RequestError
from engramlab.stats import KeyStats
from tests.conftest import make_tiny


def _case(subject: str, target: str, prompt: str) -> EditCase:
    request = EditRequest(prompt=prompt, subject=subject, target_new=target, target_true="w41")
    return EditCase(request, paraphrase_prompts=("w3 " + prompt.format(subject),),
                    neighborhood_prompts=("w2 w9 w3",))


CASES = [_case("w5 w6", "w40", "w1 {} w2 w3"), _case("w7", "w42", "{} w2 w3 w4"),
         _case("w8", "w43", "w1 {} w2"), _case("w9 w10", "w44", "w1 {} w2 w3"),
         _case("w11", "w45", "{} w3"), _case("w12", "w46", "w2 {} w1")]


def _stats(lm) -> dict[int, KeyStats]:
    out = {}
    for layer in (0, 1):
        g = torch.Generator().manual_seed(layer)
        a = torch.randn(lm.d_mlp, lm.d_mlp // 2, generator=g, dtype=torch.float64)
        out[layer] = KeyStats(layer, a @ a.T * 100, 100)
    return out


def _editor(cls, lm, **extra):
    # a zero-width band projects from the second batch on: the state's past update and band
    # must both survive the checkpoint for the resumed run to match
    band = {"band": {"width": 0.0, "warmup": 0, "floor": 0.0, "space": 0.5}} \
        if cls is DeltaEdit else {}
    return cls(layers=[0, 1], key_stats=_stats(lm), templates=[[3, 1]], target={"steps": 4},
               **({"nullspace_threshold": 1e-8} if cls is DeltaEdit else {}), **band, **extra)


class Stop(Exception):
    pass


def _interrupted(lm, editor, folder, at: int):
    """Run until the evaluation point after ``at`` edits, which raises."""
    def stop(point):
        if point["edits"] == at:
            raise Stop

    with pytest.raises(Stop):
        run_protocol(lm, editor, CASES, protocol="sequential", batch_size=2, eval_every=1,
                     noise=True, checkpoint=folder, on_point=stop)


@pytest.mark.parametrize("cls", [MEMIT, DeltaEdit])
def test_a_resumed_run_equals_the_uninterrupted_one(cls, tmp_path, isolated_cache):
    lm = make_tiny("llama")
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    whole = run_protocol(lm, _editor(cls, lm), CASES, protocol="sequential", batch_size=2,
                         eval_every=1, noise=True)
    _interrupted(lm, _editor(cls, lm), tmp_path / "ck", at=4)
    # the interruption left the weights as they were
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())
    resumed = run_protocol(lm, _editor(cls, lm), CASES, protocol="sequential", batch_size=2,
                           eval_every=1, noise=True, checkpoint=tmp_path / "ck")
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())
    # the last batch was edited on the very weights and state the first two left
    assert whole.delta.entries.keys() == resumed.delta.entries.keys()
    for name, entry in whole.delta.entries.items():
        assert torch.equal(resumed.delta.entries[name].u, entry.u)
        assert torch.equal(resumed.delta.entries[name].v, entry.v)
    assert resumed.per_case == whole.per_case
    assert [p["edits"] for p in resumed.curve] == [2, 4, 6]
    assert resumed.curve == whole.curve
    assert resumed.noise == whole.noise
    assert ["mean_ratio" in s for s in whole.noise["steps"]] == [False, True, True]
    assert whole.noise["points"][-1]["mean_later_noise"] > 0
    if cls is DeltaEdit:  # the band's history came through: later batches were projected
        assert whole.noise["steps"][-1]["projected"] >= 1


def test_a_checkpoint_of_another_run_is_refused_and_leaves_the_weights(tmp_path,
                                                                       isolated_cache):
    lm = make_tiny("llama")
    folder = tmp_path / "ck"
    _interrupted(lm, _editor(MEMIT, lm), folder, at=2)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    others = [  # (what differs, the run)
        ("cases", dict(cases=CASES[::-1])),
        ("batch_size", dict(batch_size=3)),
        ("method", dict(editor=_editor(DeltaEdit, lm))),
        ("hparams", dict(editor=_editor(MEMIT, lm, mom2_weight=5.0))),
    ]
    for what, change in others:
        kw = {"editor": _editor(MEMIT, lm), "cases": CASES, "batch_size": 2, **change}
        with pytest.raises(RequestError, match=f"another run.*{what}"):
            run_protocol(lm, kw.pop("editor"), kw.pop("cases"), protocol="sequential",
                         eval_every=1, noise=True, checkpoint=folder, **kw)
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())
    # other weights are another model
    with torch.no_grad():
        next(lm.model.parameters()).add_(1e-3)
    lm.invalidate_fingerprint()
    with pytest.raises(RequestError, match="model_fingerprint"):
        run_protocol(lm, _editor(MEMIT, lm), CASES, protocol="sequential", batch_size=2,
                     eval_every=1, noise=True, checkpoint=folder)


def test_checkpoints_are_for_sequential_runs_and_empty_folders(tmp_path, capsys):
    from engramlab.cli import main

    assert main(["edit", "--method", "memit", "--checkpoint", str(tmp_path / "ck"),
                 "--model", "none"]) == 2
    assert "--protocol sequential" in capsys.readouterr().err
    lm = make_tiny("llama")
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(RequestError, match="holds something else"):
        run_protocol(lm, _editor(MEMIT, lm), CASES, protocol="sequential", batch_size=2,
                     checkpoint=stray)
    with pytest.raises(RequestError, match="only sequential"):
        run_protocol(lm, _editor(MEMIT, lm), CASES, protocol="batch", checkpoint=stray)


def test_the_last_evaluation_is_the_final_score(isolated_cache):
    lm = make_tiny("llama")
    quiet = run_protocol(lm, _editor(MEMIT, lm), CASES, protocol="sequential", batch_size=2)
    curve = run_protocol(lm, _editor(MEMIT, lm), CASES, protocol="sequential", batch_size=2,
                         eval_every=2)
    assert [p["edits"] for p in curve.curve] == [4, 6]
    assert curve.per_case == quiet.per_case and curve.post == quiet.post
    # scored on the edited weights
    assert curve.post["efficacy_magnitude"] > quiet.pre["efficacy_magnitude"]


def test_engram_edit_resumes_a_sequential_run_from_its_checkpoint(tmp_path, isolated_cache,
                                                                  capsys):
    import json

    from engramlab.cli import main
    from tests.conftest import tiny_facts_file

    folder = make_tiny("llama").save(tmp_path / "tiny")
    facts = tiny_facts_file(tmp_path / "facts.jsonl", 4)
    argv = ["edit", "--model", str(folder), "--facts", str(facts), "--method", "memit",
            "--protocol", "sequential", "--batch-size", "2", "--eval-every", "1",
            "--layers", "0", "1", "--set", "stats.tokens=1024", "stats.seq_len=32",
            "target.steps=3", "templates=[]", "--json"]
    assert main(argv) == 0
    whole = json.loads(capsys.readouterr().out)
    check = ["--checkpoint", str(tmp_path / "ck")]
    assert main([*argv, *check]) == 0
    first = json.loads(capsys.readouterr().out)
    progress = json.loads((tmp_path / "ck" / "progress.json").read_text())
    assert progress["batches_done"] == 2
    # a finished run's checkpoint resumes at its end: nothing is edited again
    assert main([*argv, *check]) == 0
    again = json.loads(capsys.readouterr().out)
    assert first["post_all"] == whole["post_all"] == again["post_all"]
    assert first["curve"] == again["curve"]
    # the same checkpoint with other cases is another run: a one-line error, exit 2
    other = tiny_facts_file(tmp_path / "other.jsonl", 6)
    argv[argv.index(str(facts))] = str(other)
    assert main([*argv, *check]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another run" in err[0] and "cases" in err[0]


def test_a_finished_run_resumed_from_its_checkpoint_is_only_scored_again(tmp_path,
                                                                        isolated_cache):
    """What ``bench/sequential.py --redo`` relies on: the checkpoint of a run that finished
    holds its last batch, so running it again edits nothing and reports the same scores,
    curve and noise on the same final weights, and leaves the model unedited."""
    lm = make_tiny("llama")
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    folder = tmp_path / "ck"
    whole = run_protocol(lm, _editor(MEMIT, lm), CASES, protocol="sequential", batch_size=2,
                         eval_every=1, noise=True, checkpoint=folder)
    again = _editor(MEMIT, lm)

    def no_step(*_args, **_kwargs):
        raise AssertionError("a finished run was edited again")

    again.step = no_step  # type: ignore[method-assign]
    rescored = run_protocol(lm, again, CASES, protocol="sequential", batch_size=2,
                            eval_every=1, noise=True, checkpoint=folder)
    assert rescored.per_case == whole.per_case
    assert rescored.post == whole.post
    assert rescored.curve == whole.curve and rescored.noise == whole.noise
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())


def test_a_runs_identity_holds_the_relation_settings_only_when_its_targets_read_them():
    from engramlab.edit.checkpoint import run_identity

    lm = make_tiny("llama")
    hp = _editor(MEMIT, lm).hparams_for(lm)
    moved = hp.replace(**{"relation.offset": hp.relation.offset + 3})

    def ident(h: EditHParams) -> dict:
        return run_identity(lm, "memit", h, CASES, 2, 1, False)

    assert hp.targets == "one_stage" and ident(moved) == ident(hp)
    two = hp.replace(targets="two_stage")
    assert ident(moved.replace(targets="two_stage"))["hparams"] != ident(two)["hparams"]
    assert ident(two)["hparams"] != ident(hp)["hparams"]
