from __future__ import annotations

import json

import pytest
import torch

from engramlab import ParamDelta, WeightDelta, load_model
from engramlab.cli import main
from tests.conftest import make_tiny, tiny_text


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "apply" in capsys.readouterr().out


def test_models_json_lists_embedded_default(capsys, isolated_cache):
    assert main(["models", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    names = {r["name"]: r for r in out["registry"]}
    assert names["smollm2-135m"]["embedded"] and "gpt2-xl" in names


def test_apply_writes_edited_folder_and_refuses_the_source(tmp_path, capsys):
    lm = make_tiny("llama")
    src = lm.save(tmp_path / "src")
    lm = load_model(str(src), device="cpu", progress=False)
    name = lm.layout.value_param_name(1)
    u, v = torch.randn(lm.d_model), torch.randn(lm.d_mlp)
    WeightDelta.for_model(lm, {name: ParamDelta(u=u, v=v)}, method="test").save(tmp_path / "d")

    assert main(["apply", "--model", str(src), "--delta", str(tmp_path / "d"),
                 "--out", str(tmp_path / "out"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["params_changed"] == [name]
    edited = load_model(str(tmp_path / "out"), device="cpu", progress=False)
    diff = edited.layout.value_weight(1) - lm.layout.value_weight(1)
    assert torch.allclose(diff, torch.outer(u, v), atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(edited.model(**edited.tokenize(tiny_text())).logits,
                                  lm.model(**lm.tokenize(tiny_text())).logits)

    code = main(["apply", "--model", str(src), "--delta", str(tmp_path / "d"), "--out", str(src)])
    assert code == 2
    assert "source model folder" in capsys.readouterr().err


def test_apply_refuses_delta_for_other_model(tmp_path, capsys):
    src = make_tiny("llama", seed=5).save(tmp_path / "src")
    other = make_tiny("llama", seed=6)
    name = other.layout.value_param_name(0)
    WeightDelta.for_model(other, {name: ParamDelta(u=torch.ones(other.d_model),
                                                   v=torch.ones(other.d_mlp))}).save(tmp_path / "d")
    code = main(["apply", "--model", str(src), "--delta", str(tmp_path / "d"),
                 "--out", str(tmp_path / "out")])
    assert code == 2 and "fingerprint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.embedded
def test_demo_runs_on_embedded_model(capsys):
    assert main(["demo", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["top5"][0]["token"] == " Paris"
