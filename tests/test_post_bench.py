"""``bench/post.py`` goes on from where an interrupted seed stopped: every prompt it finished is
kept with its row of figures, and a rerun takes them instead of tuning them again."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from engramlab.prompt.post import transfer as real_transfer
from tests.conftest import make_tiny

BENCH = Path(__file__).resolve().parents[1] / "bench"
NAMES = ["direct", "small", "small_dp", "transferred", "transferred_dp"]


@pytest.fixture
def bench_post(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the bench imports its neighbours by name
    spec = importlib.util.spec_from_file_location("bench_post", BENCH / "post.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(task: Path) -> argparse.Namespace:
    return argparse.Namespace(task=str(task), pararel=None, public_set="wiki", public=16,
                              tokens=3, steps=4, lr=0.01, transfer_steps=None,
                              transfer_lr=None, init="random", epsilon=8.0, dev=False,
                              objective=False)


def test_a_seed_run_again_takes_its_finished_prompts_and_their_figures(bench_post, tmp_path,
                                                                       monkeypatch):
    task = tmp_path / "toy.jsonl"
    task.write_text("\n".join(json.dumps({"text": f"w{5 + i % 20} w{6 + i % 7} w2",
                                          "label": "w40" if i % 3 else "w41"})
                              for i in range(60)))
    large, small = make_tiny("llama"), make_tiny("llama", seed=1)
    wiki = [f"w{5 + i % 30} w{9 + i % 11} w3" for i in range(16)]
    work = tmp_path / "seed0"
    first = bench_post.run_seed(_args(task), 0, large, small, wiki, work)
    assert sorted(p.name for p in work.iterdir()) == sorted(NAMES)

    def remade(*_a, **_k):
        raise AssertionError("a kept prompt was made again")

    # every prompt kept: nothing is tuned or transferred, and the seed's figures are the same
    monkeypatch.setattr(bench_post, "tune", remade)
    monkeypatch.setattr(bench_post, "transfer", remade)
    again = bench_post.run_seed(_args(task), 0, large, small, wiki, work)
    assert json.loads(json.dumps(again, default=str)) == json.loads(json.dumps(first,
                                                                               default=str))
    # one prompt lost: only it is made again, from the kept prompt it transfers
    shutil.rmtree(work / "transferred_dp")
    sources: list[Path | None] = []

    def transfer(small_lm, large_lm, source, *rest, **options):
        sources.append(source.folder)  # the kept prompt it moves, by where it was loaded from
        return real_transfer(small_lm, large_lm, source, *rest, **options)

    monkeypatch.setattr(bench_post, "transfer", transfer)
    third = bench_post.run_seed(_args(task), 0, large, small, wiki, work)
    assert sources == [work / "small_dp"]
    assert third["transferred_dp"]["test"] == pytest.approx(first["transferred_dp"]["test"])
