"""Sweeps and Ray: sharded statistics and sweep results equal one process's; a worker killed
mid-sweep is rerun and nothing is lost or counted twice; a sweep run again resumes."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from engramlab.cli import main
from engramlab.data import TextCorpus
from engramlab.errors import InputError
from engramlab.scale import Sweep, options_argv, run_sweep
from engramlab.stats import collect_key_stats
from tests.conftest import make_tiny, tiny_facts_file, tiny_text

GRID = {"command": ["multiply"], "fixed": {"scale": 10}, "grid": {"a": [1, 2, 3], "b": [4, 5]}}


@pytest.fixture(scope="module")
def ray_cluster():
    """A local two-CPU cluster for this module's Ray tests (``connected`` then reuses it)."""
    pytest.importorskip("ray")
    import ray
    from ray import cloudpickle

    # the jobs below are this module's functions: shipped to the workers by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _option(argv, name: str) -> int:
    return int(argv[argv.index(f"--{name}") + 1])


def multiply(argv) -> dict:
    return {"product": _option(argv, "a") * _option(argv, "b") * _option(argv, "scale")}


def dies_once(marker: Path, argv) -> dict:
    """Kills its own worker process the first time it sees a=2, b=5 (as a lost node or an
    out-of-memory kill would); every call is logged beside the marker."""
    with open(marker / "calls.log", "a") as log:
        log.write(" ".join(argv) + "\n")
    if _option(argv, "a") == 2 and _option(argv, "b") == 5 and not (marker / "died").exists():
        (marker / "died").write_text("once")
        os._exit(1)
    return multiply(argv)


def _results(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def test_options_become_a_command_line():
    assert options_argv({"batch_size": 8, "layers": [4, 5], "no_cache": True, "skip": False,
                         "corpus": None}) == ["--batch-size", "8", "--layers", "4", "5",
                                              "--no-cache"]
    jobs = Sweep.from_dict(GRID).jobs()
    assert [j.params for j in jobs[:2]] == [{"a": 1, "b": 4}, {"a": 1, "b": 5}]
    assert jobs[0].argv == ("multiply", "--scale", "10", "--a", "1", "--b", "4", "--json")
    assert len({j.id for j in jobs}) == 6


@pytest.mark.parametrize("bad, needle", [
    ({"grid": {"a": [1]}}, "'command'"),
    ({"command": ["x"], "grid": {"a": []}}, "non-empty list"),
    ({"command": ["x"], "grid": {"a": [1]}, "fixed": {"a": 2}}, "both fixed"),
    ({"command": ["x"], "resources": {"gpus": 1}}, "unknown resource"),
    ({"command": ["x"], "colour": "red"}, "unknown key"),
])
def test_a_bad_sweep_is_refused_with_what_to_change(bad, needle):
    with pytest.raises(InputError, match=needle):
        Sweep.from_dict(bad)


def test_a_sweep_run_again_runs_only_the_jobs_without_a_result(tmp_path):
    calls: list[int] = []

    def interrupted_at_the_fourth(argv):
        calls.append(_option(argv, "a") * 10 + _option(argv, "b"))
        if len(calls) == 4:
            raise KeyboardInterrupt
        return multiply(argv)

    sweep = Sweep.from_dict(GRID)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, tmp_path / "out", fn=interrupted_at_the_fourth, progress=False)
    assert [r["params"] for r in _results(tmp_path / "out")] == \
        [{"a": 1, "b": 4}, {"a": 1, "b": 5}, {"a": 2, "b": 4}]
    assert not list((tmp_path / "out").glob(".*lock"))  # the lock went with the interruption
    calls.clear()
    outcome = run_sweep(sweep, tmp_path / "out", fn=multiply, progress=False)
    assert (outcome.ran, outcome.resumed, outcome.failed) == (3, 3, {})
    results = _results(tmp_path / "out")
    assert [r["result"]["product"] for r in results] == [40, 50, 80, 100, 120, 150]
    assert [r["index"] for r in results] == list(range(6))


def test_statistics_sharded_over_ray_tasks_equal_one_process(tmp_path, isolated_cache,
                                                              ray_cluster):
    from engramlab import load_model

    lm = load_model(str(make_tiny("llama").save(tmp_path / "tiny")), device="cpu",
                    progress=False)
    corpus = TextCorpus([tiny_text(300, seed=s) for s in range(6)], name="tiny-text")
    kw = dict(n_tokens=1200, batch_size=2, seq_len=32, use_cache=False, progress=False)
    one = collect_key_stats(lm, [0, 2], corpus, **kw)
    sharded = collect_key_stats(lm, [0, 2], corpus, workers=2, ray="local", **kw)
    for layer in (0, 2):
        assert sharded[layer].count == one[layer].count == 1216
        assert float(one[layer].sum.abs().max()) > 0
        assert torch.allclose(sharded[layer].sum, one[layer].sum, rtol=1e-10, atol=0)


def test_a_sweep_on_ray_gives_the_sequential_results(tmp_path, ray_cluster):
    sweep = Sweep.from_dict(GRID)
    run_sweep(sweep, tmp_path / "here", fn=multiply, progress=False)
    outcome = run_sweep(sweep, tmp_path / "ray", fn=multiply, ray="local", progress=False)
    assert outcome.ran == 6
    here, there = _results(tmp_path / "here"), _results(tmp_path / "ray")
    assert [(r["id"], r["result"]) for r in there] == [(r["id"], r["result"]) for r in here]


def test_a_worker_killed_mid_sweep_is_rerun_and_counted_once(tmp_path, ray_cluster):
    outcome = run_sweep(Sweep.from_dict(GRID), tmp_path / "out",
                        fn=functools.partial(dies_once, tmp_path), ray="local", progress=False)
    assert (tmp_path / "died").exists()
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert len(calls) == 7 and sum("--a 2 --b 5" in c for c in calls) == 2  # rerun once
    assert (outcome.ran, outcome.failed) == (6, {})
    results = _results(tmp_path / "out")
    assert len(results) == len({r["id"] for r in results}) == 6
    assert sorted(r["result"]["product"] for r in results) == [40, 50, 80, 100, 120, 150]
    assert len(list((tmp_path / "out" / "jobs").iterdir())) == 6


def test_engram_sweep_runs_engram_jobs_resumes_and_reports_failures(tmp_path, isolated_cache,
                                                                     capsys):
    folder = make_tiny("llama").save(tmp_path / "tiny")
    corpus = tmp_path / "text.txt"
    corpus.write_text("\n\n".join(tiny_text(200, seed=s) for s in range(4)))
    spec = tmp_path / "sweep.yaml"
    spec.write_text(f"command: [stats]\nfixed: {{model: {folder}, tokens: 256, seq_len: 32, "
                    f"corpus: {corpus}, no_cache: true}}\ngrid: {{layers: [0, 2, 7]}}\n")
    out = tmp_path / "out"
    assert main(["sweep", str(spec), "--out", str(out), "--json"]) == 1  # layer 7: no such
    report = json.loads(capsys.readouterr().out)
    assert (report["jobs"], report["ran"], report["resumed"]) == (3, 2, 0)
    (why,) = report["failed"].values()
    assert "out of range" in why or "layer 7" in why
    results = _results(out)
    assert [r["result"]["layers"] for r in results] == [[0], [2]]
    assert all(r["result"]["tokens"] == 256 for r in results)
    assert main(["sweep", str(spec), "--out", str(out), "--json"]) == 1
    again = json.loads(capsys.readouterr().out)
    assert (again["ran"], again["resumed"]) == (0, 2)  # only the failed job ran again
    spec.write_text("command: [stats]\ngrid: {layers: 3}\n")
    assert main(["sweep", str(spec), "--out", str(out)]) == 2
    assert "non-empty list" in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_sweep_over_case_shards_gives_the_whole_runs_scores(tmp_path, isolated_cache,
                                                               capsys):
    folder = make_tiny("llama").save(tmp_path / "tiny")
    facts = tiny_facts_file(tmp_path / "facts.jsonl", 5)
    fixed = ["edit", "--model", str(folder), "--facts", str(facts), "--method", "rome",
             "--set", "stats.tokens=1024", "stats.seq_len=32", "target.steps=3", "templates=[]"]
    assert main([*fixed, "--json"]) == 0
    whole = json.loads(capsys.readouterr().out)
    spec = tmp_path / "shards.json"
    spec.write_text(json.dumps({"command": fixed, "grid": {"shard": ["0/2", "1/2"]}}))
    assert main(["sweep", str(spec), "--out", str(tmp_path / "out"), "--json"]) == 0
    capsys.readouterr()
    parts = [r["result"] for r in _results(tmp_path / "out")]
    assert [p["shard"] for p in parts] == [[0, 2], [1, 2]]
    sizes = [p["n"] for p in parts]
    assert sizes == [2, 3]
    for key, value in whole["post"].items():
        if isinstance(value, float):
            merged = sum(p["post"][key] * n for p, n in zip(parts, sizes, strict=True)) / 5
            assert merged == pytest.approx(value, abs=1e-6), key
    with pytest.raises(SystemExit):
        main([*fixed, "--shard", "2/2"])  # no such shard: argparse's own error, exit 2
    capsys.readouterr()
    assert main([*fixed, "--shard", "0/6"]) == 2  # five cases have no sixth part for each
    assert "empty" in capsys.readouterr().err.strip().splitlines()[-1]


def test_ray_asked_for_but_not_installed_is_one_line_with_the_install_command(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    spec = tmp_path / "sweep.json"
    spec.write_text(json.dumps(GRID))
    assert main(["sweep", str(spec), "--out", str(tmp_path / "out"), "--ray"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "engramlab[ray]" in last and "Traceback" not in last
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*lock"))
