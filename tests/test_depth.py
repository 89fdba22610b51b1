"""Depth analysis (Guess-then-Refine): frequency ranks, first/settled layers, the summary, fact
recall, and the paper's qualitative findings on the embedded model."""

from __future__ import annotations

import json

import pytest
import torch

from engramlab.cli import main
from engramlab.lens import LogitLens
from engramlab.lens.depth import (
    DepthReadings,
    bucket_of,
    fact_recall_depth,
    frequency_ranks,
    guess_then_refine,
)

from .conftest import make_tiny, tiny_text


def test_frequency_ranks_order_tokens_by_count_and_unseen_ones_last():
    ids = torch.tensor([[5, 5, 5, 2, 2, 7]])
    ranks = frequency_ranks([ids], vocab_size=9)
    assert ranks[5] == 0 and ranks[2] == 1 and ranks[7] == 2
    assert bool((ranks[[0, 1, 3, 4, 6, 8]] == 3).all())
    assert bucket_of(torch.tensor([0, 9, 10, 99, 100, 999, 1000, 50_000])).tolist() == \
        [0, 0, 1, 1, 2, 2, 3, 3]


def test_first_and_settled_layers():
    pred = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 0]])  # [L=3, N=3]; final token: 1, 1, 1
    r = DepthReadings(pred, torch.tensor([1, 1, 1]))
    assert r.first_top1().tolist() == [0, 1, 3]
    assert r.settled().tolist() == [2, 1, 3]


def test_summary_counts_guesses_refinements_and_depth_per_bucket():
    ranks = torch.arange(2000)  # token id = its frequency rank
    # two positions whose final token is rare (1500); layers 0-1 guess the frequent token 3
    pred = torch.tensor([[3, 3], [3, 1500], [1500, 1500]])
    g = guess_then_refine(DepthReadings(pred, torch.tensor([1500, 1500])), ranks)
    assert g["top1_bucket_share"]["1-10"] == [1.0, 0.5, 0.0]
    assert g["final_bucket_share"][">1000"] == 1.0
    assert g["refined_share"][:2] == [1.0, 1.0] and g["refined_share"][2] is None
    assert g["early_high_freq_refined"] == 1.0
    assert g["first_top1_layer"][">1000"] == 1.5 and g["first_top1_layer"]["1-10"] is None
    assert g["settled_layer"][">1000"] == 1.5


def test_fact_recall_locates_known_answers_and_skips_unknown_ones():
    lm = make_tiny("llama")
    prompt = "w1 w2 w3"
    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = lm.model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    answer = lm.tokenizer.decode(out[0, ids.shape[1]:]).strip()
    wrong = "w7" if not answer.startswith("w7") else "w8"
    f = fact_recall_depth(lm, LogitLens(lm), [(prompt, answer), (prompt, wrong)])
    assert f["facts"] == 2 and f["known"] == 1
    assert 0 <= f["first_token_layer"] <= lm.n_layers
    assert len(f["first_token_log_rank"]) == lm.n_layers + 1
    assert f["first_token_log_rank"][-1] == 0.0  # the model itself ranks its answer first


def test_depth_cli_on_a_tiny_model(tmp_path, capsys):
    src = make_tiny("llama").save(tmp_path / "src")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(tiny_text(150, seed=s) for s in range(6)))
    facts = tmp_path / "f.jsonl"
    facts.write_text(json.dumps({"prompt": "{} w3", "subject": "w1 w2", "target_new": "w5",
                                 "target_true": "w4"}) + "\n")
    assert main(["depth", "--model", str(src), "--corpus", str(corpus), "--tokens", "256",
                 "--skip", "512", "--facts", str(facts), "--png", str(tmp_path / "d.png"),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    g = out["guess_then_refine"]
    assert out["lens"] == "logit" and g["tokens"] == 256
    assert len(g["top1_bucket_share"]["1-10"]) == g["n_layers"] == 3
    shares = [sum(g["top1_bucket_share"][b][0] for b in g["buckets"])]
    assert shares == pytest.approx([1.0])
    assert out["facts"]["facts"] == 1
    assert (tmp_path / "d.png").stat().st_size > 0
    assert main(["depth", "--model", str(src), "--corpus", str(corpus), "--tokens", "256",
                 "--skip", "512", "--facts", str(facts)]) == 0
    text = capsys.readouterr().out
    share = g["top1_bucket_share"]["1-10"]
    assert "256 held-out tokens" in text
    assert f"layer 0 {share[0]:.0%}, last layer {share[-1]:.0%}" in text


@pytest.mark.embedded
def test_embedded_lenses_tuned_beats_logit_and_guesses_then_refines(smol):
    from engramlab.data import wiki_corpus
    from engramlab.data.bundled import bundled_cases
    from engramlab.lens import (
        TunedLens,
        corpus_batches,
        evaluate_lenses,
        fit_lens,
        train_tuned,
    )
    from engramlab.lens.depth import depth_readings

    corpus = wiki_corpus()

    def batches(n: int, skip: int = 0):
        return corpus_batches(smol, corpus, n_tokens=n, skip_tokens=skip)

    mid = smol.n_layers // 2
    tuned = TunedLens(smol)

    def cycle():
        while True:
            yield from batches(2048)

    losses = train_tuned(smol, tuned, cycle(), steps=12, layers=[mid])
    assert losses[-1] < losses[0]
    rep = evaluate_lenses(smol, {"logit": LogitLens(smol), "tuned": tuned}, batches(512, 8192),
                          layers=[mid])
    kl_logit, kl_tuned = rep.lenses["logit"]["kl"][0], rep.lenses["tuned"]["kl"][0]
    assert kl_tuned < 0.5 * kl_logit, (kl_tuned, kl_logit)

    # Guess-then-Refine through a least-squares shortcut lens
    lens = fit_lens(smol, "shortcut", corpus, n_tokens=4096)
    ranks = frequency_ranks(batches(8192), smol.vocab_size)
    g = guess_then_refine(depth_readings(smol, lens, batches(512, 8192)), ranks)
    early = g["early_layers"]
    early_share = sum(g["top1_bucket_share"]["1-10"][:early]) / early
    assert early_share > g["final_bucket_share"]["1-10"] + 0.15
    assert g["early_high_freq_refined"] > 0.5
    assert g["first_top1_layer"]["1-10"] < g["first_top1_layer"][">1000"]
    facts = [(c.request.text, c.request.target_true) for c in bundled_cases()[:12]]
    f = fact_recall_depth(smol, lens, facts)
    assert f["known"] == 12  # the bundled facts are ones the model answers
    assert f["first_token_layer"] > smol.n_layers / 2  # recall needs depth
