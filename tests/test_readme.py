"""The README's Python blocks run as written, in order, on the embedded model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_python_blocks_and_no_link_outside_the_repository():
    text = README.read_text()
    assert len(python_blocks()) >= 3
    assert "../" not in text, "the README must stand alone: no path outside the repository"


@pytest.mark.embedded
def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch, capsys):
    import engramlab as eg

    monkeypatch.chdir(tmp_path)  # the blocks write edit.delta where they run
    namespace: dict = {}
    for i, block in enumerate(python_blocks()):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "' Paris'" in out and "' Rome'" in out  # before the edit, and the edited paraphrase
    lm = namespace["lm"]
    assert isinstance(namespace["again"], eg.WeightDelta) and (tmp_path / "edit.delta").is_dir()
    # every delta the blocks applied was reverted: the weights are the loaded ones
    assert lm.fingerprint() == eg.load_model("smollm2-135m", progress=False).fingerprint()
    assert namespace["result"].post["efficacy"] >= 0.8


def test_readme_facts_example_is_a_case_the_loader_reads(tmp_path):
    from engramlab.data import load_cases

    (example,) = re.findall(r"^```json\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    path = tmp_path / "facts.jsonl"
    path.write_text(example, encoding="utf-8")
    (case,) = load_cases(path)
    assert case.request.text == "The Eiffel Tower is located in the city of"
    assert case.request.target_true == "Paris" and len(case.neighborhood_prompts) == 1
