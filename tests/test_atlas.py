"""Neuron atlas: exact top contexts, promoted tokens, categories, zones, regrouping, the saved
index and the command."""

from __future__ import annotations

import json

import pytest
import torch

from engramlab.cli import main
from engramlab.data.corpus import TextCorpus
from engramlab.errors import EngramError
from engramlab.inspect import Atlas, AtlasConfig, build_atlas
from engramlab.inspect.atlas import _spherical_kmeans, homogeneity
from engramlab.trace import Trace, run_model

from .conftest import make_tiny, tiny_text

CORPUS = TextCorpus([tiny_text(40, seed=s) for s in range(12)], name="tiny")
CONFIG = AtlasConfig(layers=(0, 2), tokens=400, seq_len=16, top_k=8, window=3, promoted=5,
                     categories=6, batch_size=5)


@pytest.fixture(scope="module")
def built():
    lm = make_tiny("llama")
    return lm, build_atlas(lm, CORPUS, CONFIG)


def test_top_contexts_are_the_true_arg_max_activations(built):
    lm, atlas = built
    rows = CORPUS.token_rows(lm, seq_len=16, max_tokens=400)
    with Trace(lm).capture("mlp_key.0", "mlp_key.2") as tr:
        run_model(lm, rows, torch.ones_like(rows))
    for layer in (0, 2):
        acts = tr[f"mlp_key.{layer}"].reshape(-1, lm.d_mlp)
        values, positions = acts.topk(8, dim=0)
        torch.testing.assert_close(atlas.arrays[f"L{layer}.top_act"], values)
        found = atlas.arrays[f"L{layer}.top_pos"].long()
        torch.testing.assert_close(acts.gather(0, found), values)  # ties may swap places
        assert (found == positions).float().mean() > 0.99
    torch.testing.assert_close(atlas.arrays["corpus_ids"].long(), rows.reshape(-1))


def test_promoted_tokens_are_the_value_vectors_logit_lens(built):
    lm, atlas = built
    for i in (0, 7, lm.d_mlp - 1):
        logits = lm.logits_from_hidden(lm.layout.value_weight(2)[:, i][None])[0]
        v, t = logits.topk(5)
        assert atlas.arrays["L2.promoted"][i].tolist() == t.tolist()
        torch.testing.assert_close(atlas.arrays["L2.promoted_logit"][i], v)


def test_spherical_kmeans_finds_separated_groups_and_assigns_to_the_nearest_centre():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3, 8) * 5
    x = torch.cat([c + 0.1 * torch.randn(10, 8, generator=g) for c in centres])
    assign, cents = _spherical_kmeans(x, 3, seed=1)
    groups = [set(assign[i * 10:(i + 1) * 10].tolist()) for i in range(3)]
    assert all(len(s) == 1 for s in groups) and len(set.union(*groups)) == 3
    unit = x / x.norm(dim=1, keepdim=True)
    assert torch.equal(assign, (unit @ cents.T).argmax(1))


def test_homogeneity_averages_cosines_over_pairs_of_different_tokens():
    embed = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    ids = torch.tensor([[0, 1, 2], [0, 0, 2], [1, 1, 1]])
    got = homogeneity(embed, ids)
    c = 2 ** -0.5  # cos(e0, e2) = cos(e1, e2); cos(e0, e1) = 0
    assert got[0] == pytest.approx((0 + c + c) / 3)
    assert got[1] == pytest.approx(c)  # the repeated 0 is not a pair of different tokens
    assert got[2].isnan()


def test_categories_purity_and_regrouping_follow_from_the_arrays(built):
    lm, atlas = built
    ids, cat = atlas.arrays["corpus_ids"].long(), atlas.arrays["token_category"].long()
    n_cat = len(atlas.index["categories"])
    present = {}
    for layer in (0, 2):
        cats = cat[ids[atlas.arrays[f"L{layer}.top_pos"].long()]]  # [k, n]
        counts = torch.stack([(cats == c).sum(0) for c in range(n_cat)], 1)  # [n, n_cat]
        torch.testing.assert_close(atlas.arrays[f"L{layer}.purity"], counts.max(1).values / 8)
        assert torch.equal(atlas.arrays[f"L{layer}.spanned"].long(), (counts > 0).sum(1))
        assert (counts.gather(1, atlas.arrays[f"L{layer}.category"].long()[:, None])[:, 0]
                == counts.max(1).values).all()
        present[layer] = (counts > 0).float()
    (pair,) = atlas.index["regrouping"]
    both = {x: (p.T @ p) / lm.d_mlp for x, p in present.items()}
    upper = torch.ones(n_cat, n_cat, dtype=torch.bool).triu(1)
    assert pair["share_from"] == pytest.approx(float(both[0][upper].mean()))
    assert pair["share_to"] == pytest.approx(float(both[2][upper].mean()))
    for r in pair["rising"]:
        assert r["after"] - r["before"] > 0
        assert r["after"] == pytest.approx(float(both[2][r["a"], r["b"]]))


def test_a_saved_atlas_pages_through_neurons_without_the_model(built, tmp_path):
    lm, atlas = built
    atlas.save(tmp_path / "a")
    book = Atlas.load(tmp_path / "a")
    assert book.arrays.keys() == atlas.arrays.keys()
    page = book.neuron(2, 3)
    ids = atlas.arrays["corpus_ids"].tolist()
    for c in page["contexts"]:
        pos = c["position"]
        assert c["token"] == lm.decode(ids[pos])
        start = max(pos - 3, pos - pos % 16)
        assert c["before"] == "".join(lm.decode(t) for t in ids[start:pos])
    assert [c["activation"] for c in page["contexts"]] == \
        sorted((c["activation"] for c in page["contexts"]), reverse=True)
    with pytest.raises(EngramError, match="not in this atlas"):
        book.neuron(1, 0)
    with pytest.raises(EngramError, match="out of range"):
        book.neuron(2, lm.d_mlp)
    with pytest.raises(EngramError, match="not an atlas folder"):
        Atlas.load(tmp_path)


def test_atlas_refuses_bad_settings():
    lm = make_tiny("gpt2")
    with pytest.raises(EngramError, match="out of range"):
        build_atlas(lm, CORPUS, AtlasConfig(layers=(0, 3)))
    with pytest.raises(EngramError, match="fewer than one row"):
        build_atlas(lm, TextCorpus(["w1 w2"], name="short"), AtlasConfig(seq_len=16))


def test_atlas_command(tmp_path, capsys):
    src = make_tiny("llama").save(tmp_path / "m")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(CORPUS.documents))
    out = tmp_path / "atlas"
    args = ["atlas", "--model", str(src), "--corpus", str(corpus), "--tokens", "300",
            "--top-k", "4", "--categories", "5", "--layers", "0", "1"]
    assert main([*args, "--out", str(out), "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["config"]["layers"] == [0, 1] and len(obj["categories"]) == 5
    assert (out / "atlas.safetensors").is_file()
    assert main(["atlas", "--load", str(out), "--neuron", "1:2", "--json"]) == 0
    page = json.loads(capsys.readouterr().out)
    assert len(page["contexts"]) == 4 and page["neuron"] == 2
    assert main(["atlas", "--load", str(out), "--png", str(tmp_path / "a.png")]) == 0
    assert (tmp_path / "a.png").stat().st_size > 0
    text = capsys.readouterr().out
    s = obj["summary"]["0"]
    assert f"{s['mean_purity']:>8.3f}" in text
    assert main(["atlas", "--load", str(out), "--neuron", "5:0", "--json"]) == 2
    assert "not in this atlas" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("w1 w2")
    assert main([*args, "--corpus", str(empty), "--out", str(tmp_path / "x"), "--json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fewer than one row" in err[0]
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as exc:
        main(["atlas", "--neuron", "one"])
    assert exc.value.code == 2 and "LAYER:INDEX" in capsys.readouterr().err
