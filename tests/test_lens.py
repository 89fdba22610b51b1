"""Lenses: the residual-state convention, identity starts, closed-form fits, files, training."""

from __future__ import annotations

import logging

import pytest
import torch

from engramlab.errors import DeltaMismatchError
from engramlab.lens import (
    Lens,
    LogitLens,
    OneJump,
    RegressionMoments,
    Shortcut,
    TunedLens,
    evaluate_lenses,
    layer_states,
    train_tuned,
)
from engramlab.lens.shortcut import _standardise
from engramlab.lens.tuned import kl_to_final
from engramlab.trace import Trace

from .conftest import VOCAB, make_tiny


def _ids(n_rows: int = 4, seq: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n_rows, seq), generator=g)


def _moments(x: torch.Tensor, y: torch.Tensor) -> RegressionMoments:
    """Moments of explicit data, laid out as RegressionMoments.collect lays them out."""
    xt = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    return RegressionMoments((xt.T @ xt)[None], (xt.T @ y)[None], (y * y).sum(), len(x))


def test_states_enter_each_block_and_the_last_layer_reads_the_model_logits(tiny):
    ids = _ids()
    st = layer_states(tiny, ids)
    assert len(st.hidden) == tiny.n_layers
    points = ["embed", *(f"resid.{i}" for i in range(tiny.n_layers))]
    with torch.no_grad(), Trace(tiny).capture(*points) as tr:
        logits = tiny.model(input_ids=ids).logits
    for layer in range(tiny.n_layers):
        assert torch.equal(st.hidden[layer], tr[points[layer]].reshape(-1, tiny.d_model))
    # no double normalisation: the final state through final norm + unembedding is the output
    torch.testing.assert_close(tiny.logits_from_hidden(st.final),
                               logits.reshape(-1, logits.shape[-1]), rtol=1e-4, atol=1e-4)
    # and the logit lens reads that state exactly as the model does (final norm included)
    torch.testing.assert_close(LogitLens(tiny).predict(tiny, st.final, tiny.n_layers - 1),
                               logits.reshape(-1, logits.shape[-1]), rtol=1e-4, atol=1e-4)
    assert st.next_ids.view(ids.shape)[:, :-1].equal(ids[:, 1:])
    assert bool((st.next_ids.view(ids.shape)[:, -1] == -1).all())


def test_untrained_tuned_lens_is_the_logit_lens():
    lm = make_tiny("llama")
    st = layer_states(lm, _ids())
    tuned, logit = TunedLens(lm), LogitLens(lm)
    for layer in range(lm.n_layers):
        assert torch.equal(tuned.predict(lm, st.hidden[layer], layer),
                           logit.predict(lm, st.hidden[layer], layer))
    assert logit.n_params == 0
    assert tuned.n_params == lm.n_layers * (lm.d_model**2 + lm.d_model)


def test_shortcut_fit_recovers_a_known_affine_map_and_its_rank():
    torch.manual_seed(0)
    lm = make_tiny("gpt2")
    n, d = 500, lm.d_model
    x = torch.randn(n, d, dtype=torch.float64)
    a = torch.randn(d, d, dtype=torch.float64)
    c = torch.randn(d, dtype=torch.float64)
    m = _moments(x, x @ a + c)
    m = RegressionMoments(m.xx.repeat(lm.n_layers, 1, 1), m.xy.repeat(lm.n_layers, 1, 1), m.yy,
                          m.count)
    sc = Shortcut(lm).fit(m, ridge_factor=0.0)
    torch.testing.assert_close(sc.translate(x.float(), 1).double(), x @ a + c,
                               rtol=1e-3, atol=1e-3)
    # a rank-3 shortcut is the identity plus rank 3: it recovers exactly such a map
    low = torch.randn(d, 3, dtype=torch.float64) @ torch.randn(3, d, dtype=torch.float64)
    m3 = _moments(x, x + x @ low)
    m3 = RegressionMoments(m3.xx.repeat(lm.n_layers, 1, 1), m3.xy.repeat(lm.n_layers, 1, 1),
                           m3.yy, n)
    r3 = Shortcut(lm, rank=3).fit(m3, ridge_factor=0.0)
    torch.testing.assert_close(r3.translate(x.float(), 0).double(), x + x @ low,
                               rtol=1e-3, atol=1e-3)
    w, bias = r3.affine(0)  # the same map as a tuned-lens warm start
    torch.testing.assert_close((x.float() @ w.T + bias).double(), x + x @ low,
                               rtol=1e-3, atol=1e-3)
    # on any data, a rank-1 fit never reads worse than the identity (the logit lens's map)
    m1 = _moments(x, x @ a + c)
    m1 = RegressionMoments(m1.xx.repeat(lm.n_layers, 1, 1), m1.xy.repeat(lm.n_layers, 1, 1),
                           m1.yy, n)
    r1 = Shortcut(lm, rank=1).fit(m1, ridge_factor=0.0)
    err = (r1.translate(x.float(), 0).double() - (x @ a + c)).pow(2).sum()
    assert err <= (x - (x @ a + c)).pow(2).sum()
    assert r3.n_params == lm.n_layers * 3 * (2 * d + 1)
    with pytest.raises(ValueError, match="rank"):
        Shortcut(lm, rank=d + 1)


def test_standardised_moments_equal_moments_of_standardised_data():
    torch.manual_seed(1)
    x = torch.randn(200, 6, dtype=torch.float64) * 3 + 5
    y = torch.randn(200, 6, dtype=torch.float64)
    xx, xy, mu, s = _standardise(_moments(x, y), 0)
    torch.testing.assert_close(mu, x.mean(0))
    z = (x - mu) / s
    ref = _moments(z, y - x)  # the one jump fits the residual final − h
    torch.testing.assert_close(xx, ref.xx[0])
    torch.testing.assert_close(xy, ref.xy[0])
    torch.testing.assert_close(s, x.std(0, unbiased=False))


def test_one_jump_is_one_low_rank_map_for_every_layer():
    lm = make_tiny("llama")
    train = RegressionMoments.collect(lm, [_ids(8, 16, seed=s) for s in range(3)])
    held = RegressionMoments.collect(lm, [_ids(8, 16, seed=9)])
    oj = OneJump(lm, rank=4).fit(train, held)
    per_layer = Shortcut(lm).fit(train)
    assert oj.n_params == lm.n_layers * 2 * lm.d_model + 4 * (2 * lm.d_model + 1)
    assert oj.n_params < per_layer.n_params / 5
    assert oj.config["chosen"] == "pooled" or oj.config["chosen"].startswith("layer ")
    assert 0 < oj.config["held_out_r2"] <= 1
    st = layer_states(lm, _ids(seed=5))
    out = oj.predict(lm, st.hidden[1], 1)
    assert out.shape == (st.n_tokens, VOCAB) and bool(torch.isfinite(out).all())


def test_lens_save_load_round_trip_and_refusals(tmp_path, caplog):
    lm = make_tiny("llama")
    lens = TunedLens(lm)
    with torch.no_grad():
        lens.weight.normal_(std=0.01)
        lens.bias.normal_(std=0.01)
    lens.save(tmp_path / "tl")
    back = Lens.load(tmp_path / "tl", lm)
    assert isinstance(back, TunedLens)
    assert torch.equal(back.weight, lens.weight) and torch.equal(back.bias, lens.bias)
    Shortcut(lm, rank=2).save(tmp_path / "sc")
    assert Lens.load(tmp_path / "sc", lm).rank == 2
    with pytest.raises(DeltaMismatchError, match="another model architecture"):
        Lens.load(tmp_path / "tl", make_tiny("gpt2"))
    other = make_tiny("llama", seed=1)  # same architecture, other weights: warn, or refuse
    with caplog.at_level(logging.WARNING):
        Lens.load(tmp_path / "tl", other)
    assert "other weights" in caplog.text
    with pytest.raises(DeltaMismatchError):
        Lens.load(tmp_path / "tl", other, strict=True)
    with pytest.raises(FileNotFoundError, match="not a saved lens"):
        Lens.load(tmp_path, lm)


def test_tuned_lens_training_lowers_kl_below_the_logit_lens():
    lm = make_tiny("gpt2")
    lens = TunedLens(lm)
    batches = [_ids(8, 16, seed=s) for s in range(4)]
    losses = train_tuned(lm, lens, (batches[i % 3] for i in range(60)), steps=60, lr=1e-2)
    assert losses[-1] < losses[0]
    rep = evaluate_lenses(lm, {"logit": LogitLens(lm), "tuned": lens}, batches[3:])
    assert rep.tokens == 8 * 16
    assert sum(rep.lenses["tuned"]["kl"]) < sum(rep.lenses["logit"]["kl"])
    # the report's KL is the per-token KL(final ‖ lens) averaged over the held-out tokens
    st = layer_states(lm, batches[3])
    final_logp = torch.log_softmax(lm.logits_from_hidden(st.final).float(), -1)
    for layer in (0, lm.n_layers - 1):
        direct = kl_to_final(lm, final_logp, LogitLens(lm).predict(lm, st.hidden[layer], layer))
        assert rep.lenses["logit"]["kl"][layer] == pytest.approx(float(direct.mean()), rel=1e-4)


def test_threshold_early_exit_picks_the_first_confident_layer():
    from engramlab.lens import ExitReadings, saved_at, threshold_curve
    from engramlab.lens.early_exit import exit_layers

    conf = torch.tensor([[0.1, 0.9, 0.2], [0.6, 0.95, 0.3], [0.7, 0.99, 0.4]])  # [L=3, N=3]
    pred = torch.tensor([[5, 1, 5], [2, 1, 5], [2, 1, 5]])
    final = torch.tensor([2, 1, 7])
    assert exit_layers(conf, 0.5).tolist() == [1, 0, 3]
    r = ExitReadings(conf, pred, final)
    curve = threshold_curve(r, [0.5, 1.01])
    # τ=0.5: token 0 exits at layer 1 (pred 2, right), token 1 at layer 0 (right), token 2 runs
    # the whole model (right by definition); compute used (1 + 0 + 3) / 9
    assert curve[0]["agreement"] == 1.0
    assert curve[0]["compute_saved"] == pytest.approx(1 - 4 / 9)
    assert curve[1] == {"threshold": 1.01, "agreement": 1.0, "compute_saved": 0.0,
                        "exit_share": [0.0, 0.0, 0.0, 1.0]}
    curve = threshold_curve(ExitReadings(conf, pred, torch.tensor([2, 3, 7])), [0.5])
    assert curve[0]["agreement"] == pytest.approx(2 / 3)
    assert saved_at(curve, 0.95) == 0.0 and saved_at(curve, 0.6) == pytest.approx(5 / 9)


def test_net_compute_charges_every_exit_check():
    from engramlab.lens.early_exit import ExitCost

    cost = ExitCost(block=1.0, check=2.0, readout=3.0)
    # exits at lens layers 0 and 2 of 4, one token never exits:
    # 0·1 + 1·2, 2·1 + 3·2, 4·1 + 4·2 + 3 → mean 25/3 against 4·1 + 3 for the full model
    assert cost.net_saved(torch.tensor([0, 2, 4]), 4) == pytest.approx(1 - (25 / 3) / 7)
    assert ExitCost(1.0, 0.0, 0.0).net_saved(torch.tensor([1, 3]), 4) == pytest.approx(0.5)


def test_exit_cost_counts_a_block_and_the_unembedding():
    from engramlab.lens.early_exit import ExitCost

    lm = make_tiny("llama")
    cost = ExitCost.of(lm, LogitLens(lm))
    block = sum(p.numel() for p in lm.layout.block(1).parameters())
    assert cost.block == 2 * block
    assert cost.readout == pytest.approx(2 * lm.d_model * lm.vocab_size + 4 * lm.d_model)
    assert cost.check == cost.readout  # the logit lens adds no map
    tuned = ExitCost.of(lm, TunedLens(lm))
    assert tuned.check - cost.check == 2 * (lm.d_model**2 + lm.d_model)  # one layer's map


def test_operating_points_are_chosen_on_dev_and_reported_on_test():
    from engramlab.lens.early_exit import operating_point

    dev = [{"threshold": 0.5, "agreement": 0.90, "net_compute_saved": 0.4},
           {"threshold": 0.8, "agreement": 0.96, "net_compute_saved": 0.2},
           {"threshold": 0.9, "agreement": 0.99, "net_compute_saved": 0.1}]
    test = [{"threshold": 0.5, "agreement": 0.97, "compute_saved": 0.5,
             "net_compute_saved": 0.45},
            {"threshold": 0.8, "agreement": 0.93, "compute_saved": 0.3,
             "net_compute_saved": 0.25},
            {"threshold": 0.9, "agreement": 0.98, "compute_saved": 0.2,
             "net_compute_saved": 0.15}]
    p = operating_point(dev, test, 0.95, key="net_compute_saved")
    assert p["threshold"] == 0.8 and p["reached_on_dev"]
    assert p["test"] == {"agreement": 0.93, "compute_saved": 0.3, "net_compute_saved": 0.25}
    none = operating_point(dev, test, 0.999, key="net_compute_saved")
    assert not none["reached_on_dev"] and none["threshold"] == 0.9


def test_first_layer_where_and_settled_from():
    from engramlab.lens.readings import first_layer_where, settled_from

    holds = torch.tensor([[1, 0, 0, 1, 0], [0, 1, 0, 1, 1], [1, 1, 1, 0, 1]], dtype=torch.bool)
    assert first_layer_where(holds).tolist() == [0, 1, 2, 0, 1]
    assert first_layer_where(torch.zeros(3, 2, dtype=torch.bool)).tolist() == [3, 3]
    # from which layer on it holds at every deeper layer (3 = not even at the last)
    assert settled_from(holds).tolist() == [2, 1, 2, 3, 1]
    assert settled_from(torch.ones(3, 1, dtype=torch.bool)).tolist() == [0]


def test_figures_are_written_whole_or_not_at_all(tmp_path):
    from engramlab.figures import figure

    out = tmp_path / "sub" / "f.png"
    with figure(out, ncols=2) as (_, axes):
        axes[0].plot([0, 1], [1, 0])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = out.read_bytes()
    with pytest.raises(RuntimeError), figure(out) as (_, ax):
        ax.plot([0, 1], [0, 1])
        raise RuntimeError("drawing failed")
    assert out.read_bytes() == before  # the earlier figure stays as it was
    assert sorted(p.name for p in out.parent.iterdir()) == ["f.png"]  # no temporary debris
