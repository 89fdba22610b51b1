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


def test_lens_train_eval_show_and_early_exit_on_a_tiny_model(tmp_path, capsys):
    src = make_tiny("llama").save(tmp_path / "src")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(tiny_text(150, seed=s) for s in range(6)))
    args = ["--model", str(src), "--corpus", str(corpus)]
    assert main(["lens", "train", *args, "--kind", "shortcut", "--tokens", "512",
                 "--out", str(tmp_path / "sc"), "--json"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["kind"] == "shortcut" and trained["params"] == 3 * 33 * 32
    assert "<title>shortcut lens for src</title>" in (tmp_path / "sc" / "report.html").read_text()
    assert main(["lens", "eval", *args, "--kind", "logit", "--lens", str(tmp_path / "sc"),
                 "--tokens", "256", "--skip", "512", "--png", str(tmp_path / "e.png"),
                 "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep) >= {"model", "tokens", "layers", "lenses"} and rep["tokens"] == 256
    assert rep["layers"] == [0, 1, 2]
    assert rep["lenses"]["logit"]["params"] == 0
    for name in ("logit", "shortcut"):
        assert len(rep["lenses"][name]["kl"]) == len(rep["lenses"][name]["top1"]) == 3
    assert (tmp_path / "e.png").stat().st_size > 0
    assert main(["lens", "show", "--model", str(src), "--lens", str(tmp_path / "sc"),
                 "--prompt", "w1 w2 w3", "--png", str(tmp_path / "s.png"), "--json"]) == 0
    view = json.loads(capsys.readouterr().out)
    assert view["lens"] == "shortcut" and len(view["layers"]) == 3
    assert len(view["layers"][0]["top"]) == len(view["tokens"])
    assert main(["early-exit", "eval", *args, "--tokens", "256", "--skip", "512", "--json"]) == 0
    ee = json.loads(capsys.readouterr().out)
    assert ee["curves"]["logit"][-1]["compute_saved"] == 0.0
    assert main(["early-exit", "eval", *args, "--tokens", "256", "--skip", "512", "--learned",
                 "--learned-tokens", "256", "--json"]) == 0
    learned = json.loads(capsys.readouterr().out)
    # the threshold curve read from the policy's data is the same as the plain one
    assert learned["curves"]["logit"] == ee["curves"]["logit"]
    head = learned["curves"]["logit+head"]
    assert head[-1]["compute_saved"] == 0.0  # threshold 1.01: nothing exits
    # a head check skips the unembedding, so it costs far less than a lens readout
    costs = learned["costs"]
    assert costs["logit+head"]["check_flops"] < 0.5 * costs["logit"]["check_flops"]
    assert set(learned["operating_points"]["logit"]) == {"0.95", "0.99"}
    policy = learned["curves"]["logit+policy"]
    assert [p["alpha"] for p in policy] == sorted(p["alpha"] for p in policy)
    assert all(0 <= p["compute_saved"] <= 1 and 0 <= p["agreement"] <= 1 for p in policy)
    assert main(["early-exit", "eval", *args, "--tokens", "256", "--skip", "512"]) == 0
    text = capsys.readouterr().out
    point = ee["operating_points"]["logit"]["0.95"]["test"]
    assert f"net of checks {point['net_compute_saved']:+.1%}" in text
    assert f"{ee['costs']['logit']['check_in_blocks']:.1f} blocks" in text
    assert main(["early-exit", "eval", *args, "--skip", "100", "--learned"]) == 2
    assert main(["lens", "eval", "--model", str(src), "--lens", str(tmp_path)]) == 2
    assert "not a saved lens" in capsys.readouterr().err


def test_concepts_find_offers_every_selection():
    from engramlab.cli import build_parser
    from engramlab.erase.concept_vectors import SELECTIONS

    parser = build_parser()
    for sel in SELECTIONS:
        args = parser.parse_args(["concepts", "find", "--concept", "Harry Potter",
                                  "--selection", sel])
        assert args.selection == sel
    with pytest.raises(SystemExit):
        parser.parse_args(["concepts", "find", "--concept", "Harry Potter",
                           "--selection", "nonsense"])
