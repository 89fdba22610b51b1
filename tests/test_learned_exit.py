"""ConsistentEE-style learned exit: hardness, the exit distribution, both estimators, behaviour
on data whose right answer is known."""

from __future__ import annotations

import pytest
import torch

from engramlab.lens.learned_exit import (
    N_CONF,
    ExitData,
    ExitPolicy,
    _reinforce_loss,
    exit_distribution,
    outcome,
    threshold_baseline,
    train_policy,
)


def _synthetic(n: int = 800, n_layers: int = 6, d: int = 8, seed: int = 0) -> ExitData:
    """Half the tokens are easy (every lens right from layer 1), half hard (only the full model);
    feature 0 of the state tells them apart; the confidence features carry no signal."""
    g = torch.Generator().manual_seed(seed)
    easy = torch.rand(n, generator=g) < 0.5
    state = torch.randn(n_layers, n, d, generator=g)
    state[:, :, 0] = torch.where(easy, 2.0, -2.0) + 0.1 * state[:, :, 0]
    conf = torch.rand(n_layers, n, N_CONF, generator=g)
    agree = torch.zeros(n_layers, n, dtype=torch.bool)
    agree[1:, easy] = True
    logq = torch.where(agree, -0.1, -5.0)
    return _data(torch.cat([state, conf], -1), logq, agree, conf[..., 0])


def _data(feats: torch.Tensor, logq: torch.Tensor, agree: torch.Tensor,
          conf: torch.Tensor) -> ExitData:
    """Exit data whose lenses agree with the full model (token 0) exactly where ``agree``."""
    n = agree.shape[1]
    return ExitData(feats, logq, conf, (~agree).long(), torch.zeros(n, dtype=torch.long),
                    torch.full((n,), -0.1))


def test_memorized_layer_is_where_agreement_becomes_permanent():
    agree = torch.tensor([[1, 0, 0, 1], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    data = _data(torch.zeros(3, 4, 5), torch.zeros(3, 4), agree, torch.zeros(3, 4))
    assert data.memorized_layer().tolist() == [0, 1, 2, 2]
    agree[2, 3] = False  # the last lens is wrong: only the full model is
    data = _data(torch.zeros(3, 4, 5), torch.zeros(3, 4), agree, torch.zeros(3, 4))
    assert data.memorized_layer()[3] == 3


def test_exit_distribution_is_a_distribution_and_matches_sampling():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 3, generator=g)
    dist = exit_distribution(logits)
    torch.testing.assert_close(dist.sum(0), torch.ones(3))
    u = torch.rand(200_000, 5, 3, generator=g)
    hit = u < torch.sigmoid(logits)
    first = torch.where(hit.any(1), hit.float().argmax(1), torch.full((200_000, 3), 5))
    empirical = torch.stack([(first == i).float().mean(0) for i in range(6)])
    torch.testing.assert_close(empirical, dist, atol=5e-3, rtol=0)


def test_reinforce_gradient_is_unbiased_for_the_exact_one():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 6, generator=g, requires_grad=True)
    rewards = torch.randn(5, 6, generator=g)
    (-(exit_distribution(logits) * rewards).sum(0).mean()).backward()
    exact = logits.grad.clone()
    logits.grad = None
    # many samples per token: the mean-baseline estimator's bias shrinks as (k-1)/k -> 1
    _reinforce_loss(logits, rewards, 100_000, g).backward()
    torch.testing.assert_close(logits.grad, exact, atol=0.01, rtol=0.05)


def test_policy_sends_easy_tokens_out_early_and_hard_ones_through():
    train, held = _synthetic(seed=0), _synthetic(seed=1)
    for estimator in ("reinforce", "exact"):
        policy = train_policy(train, alpha=1.0, estimator=estimator, n_components=2, steps=200)
        layers = policy.exit_layers(held.feats)
        easy = held.agree[1]
        assert (layers[easy] == 1).float().mean() > 0.95  # first layer that is right
        assert (layers[~easy] == held.n_layers).float().mean() > 0.95  # run the whole model
        res = outcome(held, layers)
        assert res["agreement"] > 0.97
        assert res["compute_saved"] > 0.35  # ≈ half the tokens save 5/6 of the blocks
    # confidence carries no signal here, so no threshold can both agree and save compute
    assert all(p["agreement"] < 0.97 or p["compute_saved"] < 0.05
               for p in threshold_baseline(held, [0.1, 0.3, 0.5, 0.7, 0.9]))


def test_a_higher_depth_price_exits_earlier():
    base = _synthetic()
    # every token is hard-ish: right only from layer 3, so waiting costs
    agree = torch.zeros_like(base.agree)
    agree[3:] = True
    data = _data(base.feats, base.logq, agree, base.conf)
    saved = [outcome(data, train_policy(data, alpha=a, estimator="exact", n_components=2,
                                        steps=150, hardness=False).exit_layers(data.feats)
                     )["compute_saved"] for a in (0.1, 8.0)]
    assert saved[0] < saved[1]


def test_policy_inputs_are_standardised_projections():
    data = _synthetic()
    policy = ExitPolicy(data.n_layers, data.feats.shape[-1] - N_CONF, n_components=3)
    policy.fit_inputs(data.feats)
    z = policy.inputs(data.feats)
    assert z.shape == (data.n_layers, data.n_tokens, 3 + N_CONF)
    torch.testing.assert_close(z.mean(1), torch.zeros(data.n_layers, 3 + N_CONF), atol=1e-4,
                               rtol=0)
    torch.testing.assert_close(z.std(1), torch.ones(data.n_layers, 3 + N_CONF), atol=1e-3,
                               rtol=0)


def test_confidence_head_learns_which_tokens_are_done_and_exits_them_early():
    from engramlab.lens.exit_head import head_curve, train_head

    train, held = _synthetic(seed=0), _synthetic(seed=1)
    head = train_head(train, n_components=4)
    probs = torch.sigmoid(head(held.feats))
    easy = held.agree[-1]
    # from layer 1 on, the head is sure about easy tokens and not about hard ones
    assert float(probs[1:, easy].mean()) > 0.9 and float(probs[:, ~easy].mean()) < 0.1
    curve = head_curve(head, held, thresholds=(0.5, 1.01))
    sure, never = curve
    assert sure["agreement"] > 0.98 and sure["compute_saved"] > 0.3  # easy half out at 1
    assert never["compute_saved"] == 0.0 and never["agreement"] == 1.0


def test_a_check_without_a_readout_pays_the_unembedding_once():
    from engramlab.lens.early_exit import ExitCost

    reads = ExitCost(block=1.0, check=3.0, readout=2.0)
    head = ExitCost(block=1.0, check=0.5, readout=2.0, exit_readout=2.0)
    layers = torch.tensor([1, 1, 5])  # two tokens out after one block of five, one never
    # reading out at every check: (1 + 2·3), (1 + 2·3), (5 + 5·3 + 2) → 36 against 3·7
    assert reads.net_saved(layers, 5) == pytest.approx(1 - 36 / 21)
    # the head: (1 + 2·0.5 + 2) twice, (5 + 5·0.5 + 2) → 17.5 against 21
    assert head.net_saved(layers, 5) == pytest.approx(1 - 17.5 / 21)
