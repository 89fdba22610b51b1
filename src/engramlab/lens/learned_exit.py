"""Learned early exit trained consistently with inference (Zeng et al. 2024, "ConsistentEE: A
Consistent and Hardness-Guided Early Exiting Method for Accelerating Language Models
Inference", AAAI).

Threshold exit trains nothing about *when* to stop. ConsistentEE adds a policy that, at each
layer, looks at the state and decides exit / continue; it is trained as reinforcement learning
(REINFORCE with the mean reward of K sampled trajectories of the same instance as baseline),
so that an instance only needs the one classifier it exits at to be right — the objective used
at inference — rather than every classifier. The reward of exiting at layer ℓ is the log
probability the layer's classifier gives the label minus a depth cost, and the cost is weighted
by the instance's hardness, measured by its *memorized layer*: easy instances are pushed to
exit early, hard ones may use the whole model.

Here (reading a frozen model, as everywhere in :mod:`engramlab.lens`):

* the internal classifiers are a trained lens (tuned / shortcut / logit), not fine-tuned heads,
  and the label is the full model's own top-1 token — early exit is judged by agreement with
  the full model, like the threshold baseline in :mod:`.early_exit`;
* exiting at lens layer ℓ means blocks 0 … ℓ−1 ran (cost ℓ/L); never exiting runs the whole
  model (cost 1, reward the full model's log-probability of its own top-1);
* the memorized layer is the shallowest lens layer from which every deeper lens agrees with the
  full model (the paper tracks when a layer's prediction becomes stable over training epochs;
  with frozen classifiers, stability over depth is the analogue). Hardness h = memorized / L and
  the reward is ``a_ℓ(y) − α·(1 − h)·ℓ/L``. Without the hardness weight every α above a small
  value sends nearly all tokens out at layer 0 (agreement 0.24); with it the curve is smooth;
* the reward's accuracy term is 1 when the exit layer's top-1 agrees with the full model, 0
  otherwise (``quality="agreement"``, the default), not the paper's log-probability of the
  label (``quality="logprob"``): on SmolLM2 the log-probability reward kept rewarding waiting
  for confidence after the answer was already right and gave a worse curve (at 0.91 agreement
  9 % of compute saved against 15 % at 0.94 with the 0/1 reward; shortcut lens, 3k training
  tokens);
* the policy is the paper's one logistic unit per layer, on the final-normed lens state —
  projected on its first ``n_components`` principal directions per layer (16; the paper feeds
  the whole state, which with a few thousand training tokens overfitted: its held-out expected
  reward fell below never exiting) — plus three confidence features (max probability, top-2
  margin, normalised entropy), standardised per layer. Training reads precomputed features
  (the model is frozen), so a policy trains in seconds.
* besides REINFORCE, ``estimator="exact"`` maximises the expected reward in closed form (the
  exit distribution of a chain of Bernoulli decisions is explicit): same objective, no variance.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models.lm import LM
from .base import Lens
from .early_exit import ExitCost, ExitReadings, exit_layers, exit_outcome
from .readings import first_layer_where, settled_from
from .states import layer_states

N_CONF = 3  # max probability, top-2 margin, normalised entropy
DEFAULT_ALPHAS = (0.2, 0.4, 0.8, 1.6, 3.2, 6.4)


@dataclass
class ExitData:
    """What a policy is trained and judged on, per lens layer ℓ < L and token.

    ``feats``: [L, N, F] policy inputs; ``logq``: [L, N] the lens' log-probability of the full
    model's top-1 (``final``, [N]); ``pred``/``conf``: [L, N] the lens' top-1 and its
    probability (what the threshold baseline reads); ``final_logp``: [N] the full model's
    log-probability of its own top-1.
    """

    feats: torch.Tensor
    logq: torch.Tensor
    conf: torch.Tensor
    pred: torch.Tensor
    final: torch.Tensor
    final_logp: torch.Tensor

    @property
    def agree(self) -> torch.Tensor:
        """[L, N] whether each lens layer's top-1 is the full model's."""
        return self.pred == self.final[None]

    def readings(self) -> ExitReadings:
        """The same tokens as the threshold baseline of :mod:`.early_exit` reads them."""
        return ExitReadings(self.conf, self.pred, self.final)

    def split(self, frac: float = 0.5) -> tuple[ExitData, ExitData]:
        """The first ``frac`` of the tokens (development) and the rest (test)."""
        cut = int(self.n_tokens * frac)
        if not 0 < cut < self.n_tokens:
            raise ValueError(f"cannot split {self.n_tokens} tokens at {frac}")

        def part(sl: slice) -> ExitData:
            return ExitData(self.feats[:, sl], self.logq[:, sl], self.conf[:, sl],
                            self.pred[:, sl], self.final[sl], self.final_logp[sl])

        return part(slice(None, cut)), part(slice(cut, None))

    @property
    def n_layers(self) -> int:
        return int(self.logq.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.logq.shape[1])

    def memorized_layer(self) -> torch.Tensor:
        """Shallowest layer from which every deeper lens agrees with the full model (L: none)."""
        return settled_from(self.agree)

    def rewards(self, alpha: float, *, hardness: bool = True,
                quality: str = "agreement") -> torch.Tensor:
        """[L + 1, N]: reward of exiting at each lens layer, and (last row) of running it all."""
        n_layers = self.n_layers
        depth = torch.arange(n_layers + 1, dtype=torch.float32)[:, None] / n_layers
        weight = alpha * torch.ones(self.n_tokens)
        if hardness:
            weight = weight * (1 - self.memorized_layer().float() / n_layers)
        if quality == "agreement":
            good = torch.cat([self.agree.float(), torch.ones(1, self.n_tokens)], 0)
        elif quality == "logprob":
            good = torch.cat([self.logq, self.final_logp[None]], 0)
        else:
            raise ValueError(f"unknown reward quality {quality!r}; choose 'agreement' or "
                             "'logprob'")
        return good - weight[None] * depth


@torch.no_grad()
def exit_data(lm: LM, lens: Lens, batches: Iterable[torch.Tensor], *,
              chunk: int = 256) -> ExitData:
    """Read every lens layer once over ``batches`` and keep only what policies need."""
    feats, logq, conf, pred, final_top, final_lp = [], [], [], [], [], []
    for ids in batches:
        st = layer_states(lm, ids)
        for start in range(0, st.n_tokens, chunk):
            sl = slice(start, start + chunk)
            final = F.log_softmax(lm.logits_from_hidden(st.final[sl]).float(), -1)
            fv, top = final.max(-1)
            final_lp.append(fv.cpu())
            final_top.append(top.cpu())
            f_l, q_l, p_l, c_l = [], [], [], []
            for layer in range(lm.n_layers):
                h = lens.translate(st.hidden[layer][sl], layer)
                normed = lm.layout.final_norm(h).float()
                logp = F.log_softmax(lm.logits_from_hidden(h).float(), -1)
                top2 = logp.topk(2, -1).values.exp()
                ent = -(logp.exp() * logp).sum(-1) / math.log(logp.shape[-1])
                f_l.append(torch.cat([normed, top2[:, :1], top2[:, :1] - top2[:, 1:],
                                      ent[:, None]], 1).cpu())
                q_l.append(logp.gather(1, top[:, None]).squeeze(1).cpu())
                p_l.append(logp.argmax(-1).cpu())
                c_l.append(top2[:, 0].cpu())
            feats.append(torch.stack(f_l))
            logq.append(torch.stack(q_l))
            conf.append(torch.stack(c_l))
            pred.append(torch.stack(p_l))
    if not final_lp:
        raise ValueError("no tokens to read exit data on")
    return ExitData(torch.cat(feats, 1), torch.cat(logq, 1), torch.cat(conf, 1),
                    torch.cat(pred, 1), torch.cat(final_top), torch.cat(final_lp))


class ExitPolicy(nn.Module):
    """One logistic exit unit per lens layer on a few standardised features of its state."""

    def __init__(self, n_layers: int, d_state: int, n_components: int = 16,
                 confidence: bool = True) -> None:
        super().__init__()
        self.n_conf = N_CONF if confidence else 0  # read the lens's confidence features too
        k = n_components + self.n_conf
        self.n_components = n_components
        self.weight = nn.Parameter(torch.zeros(n_layers, k))
        # start cautious: exit probability sigmoid(-4) ≈ 0.02 per layer
        self.bias = nn.Parameter(torch.full((n_layers,), -4.0))
        self.register_buffer("center", torch.zeros(n_layers, d_state))
        self.register_buffer("basis", torch.zeros(n_layers, d_state, n_components))
        self.register_buffer("mean", torch.zeros(n_layers, k))
        self.register_buffer("std", torch.ones(n_layers, k))

    @torch.no_grad()
    def fit_inputs(self, feats: torch.Tensor, seed: int = 0) -> None:
        """Principal directions of each layer's state and the standardisation, from ``feats``."""
        state = feats[..., :-N_CONF]
        self.center.copy_(state.mean(1))
        if self.n_components:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                _, _, v = torch.pca_lowrank(state - self.center[:, None], q=self.n_components,
                                            center=False)
            self.basis.copy_(v)
        z = self._raw(feats)
        self.mean.copy_(z.mean(1))
        self.std.copy_(z.std(1).clamp_min(1e-4))

    def _raw(self, feats: torch.Tensor) -> torch.Tensor:
        state = feats[..., :-N_CONF] - self.center[:, None]
        parts = [torch.einsum("lnd,ldk->lnk", state, self.basis)] if self.n_components else []
        if self.n_conf:
            parts.append(feats[..., -N_CONF:])
        return torch.cat(parts, -1)

    def inputs(self, feats: torch.Tensor) -> torch.Tensor:
        """[L, N, k] standardised policy inputs from exit features [L, N, F]."""
        return (self._raw(feats) - self.mean[:, None]) / self.std[:, None]

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        return torch.einsum("lnf,lf->ln", z, self.weight) + self.bias[:, None]

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """Exit logits [L, N] from exit features [L, N, F]."""
        return self.logits(self.inputs(feats))

    @torch.no_grad()
    def exit_layers(self, feats: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
        """First layer whose exit probability reaches ``threshold`` (L: run the whole model)."""
        return first_layer_where(torch.sigmoid(self(feats)) >= threshold)


def exit_distribution(logits: torch.Tensor) -> torch.Tensor:
    """[L + 1, N] probability of exiting first at each layer (last row: never) for a chain of
    independent Bernoulli exits with the given logits."""
    log_stay = F.logsigmoid(-logits)
    before = torch.cat([torch.zeros_like(log_stay[:1]), log_stay.cumsum(0)], 0)  # [L+1, N]
    log_exit = torch.cat([F.logsigmoid(logits), torch.zeros_like(logits[:1])], 0)
    return (before + log_exit).exp()


def _reinforce_loss(logits: torch.Tensor, rewards: torch.Tensor, k: int,
                    gen: torch.Generator) -> torch.Tensor:
    """REINFORCE over ``k`` sampled exit trajectories per token, baseline = their mean reward."""
    n_layers, n = logits.shape
    with torch.no_grad():
        p = torch.sigmoid(logits)
        u = torch.rand((k, n_layers, n), generator=gen)
        hit = u < p[None]
        first = torch.where(hit.any(1), hit.float().argmax(1),
                            torch.full((k, n), n_layers)).long()  # [k, N]
    log_stay = F.logsigmoid(-logits)
    before = torch.cat([torch.zeros_like(log_stay[:1]), log_stay.cumsum(0)], 0)  # [L+1, N]
    log_exit = torch.cat([F.logsigmoid(logits), torch.zeros_like(logits[:1])], 0)
    logp = (before + log_exit).gather(0, first)  # [k, N] log-prob of each trajectory
    r = rewards.gather(0, first)
    adv = r - r.mean(0, keepdim=True)
    return -(adv * logp).mean()


def train_policy(data: ExitData, *, alpha: float = 1.0, hardness: bool = True,
                 quality: str = "agreement", estimator: str = "reinforce", samples: int = 4,
                 n_components: int = 16, steps: int = 300, batch_size: int = 1024,
                 lr: float = 0.02, seed: int = 0, progress: bool = False) -> ExitPolicy:
    """Fit an exit policy to ``data``; ``alpha`` prices depth (larger: exit earlier)."""
    from tqdm.auto import tqdm

    if estimator not in ("reinforce", "exact"):
        raise ValueError(f"unknown estimator {estimator!r}; choose 'reinforce' or 'exact'")
    gen = torch.Generator().manual_seed(seed)
    policy = ExitPolicy(data.n_layers, data.feats.shape[-1] - N_CONF, n_components)
    policy.fit_inputs(data.feats, seed=seed)
    z = policy.inputs(data.feats)
    rewards = data.rewards(alpha, hardness=hardness, quality=quality)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    for _ in tqdm(range(steps), desc="exit policy", unit="step", disable=not progress):
        idx = torch.randint(data.n_tokens, (min(batch_size, data.n_tokens),), generator=gen)
        logits = policy.logits(z[:, idx])
        r = rewards[:, idx]
        if estimator == "exact":
            loss = -(exit_distribution(logits) * r).sum(0).mean()
        else:
            loss = _reinforce_loss(logits, r, samples, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy.config = {"alpha": alpha, "hardness": hardness, "quality": quality,
                     "estimator": estimator, "samples": samples, "steps": steps,
                     "train_tokens": data.n_tokens}
    policy.eval()
    return policy


def policy_check_flops(policy_components: int, d_model: int, n_conf: int = N_CONF) -> float:
    """What a policy adds to an exit check: the projection of the normed state and the unit."""
    return 2.0 * d_model * policy_components + 2.0 * (policy_components + n_conf)


def outcome(data: ExitData, layers: torch.Tensor, cost: ExitCost | None = None
            ) -> dict[str, float]:
    """:func:`~.early_exit.exit_outcome` of the tokens of ``data`` exiting at ``layers``."""
    return exit_outcome(data.agree, layers, cost)


def policy_curve(train: ExitData, held_out: ExitData | Sequence[ExitData], *,
                 alphas: Sequence[float] = DEFAULT_ALPHAS, cost: ExitCost | None = None,
                 progress: bool = False, **kwargs: Any) -> Any:
    """One trained policy per depth price ``alpha``, judged on held-out tokens (greedy 0.5).

    ``held_out`` may be several slices (e.g. development and test): each gets its own curve
    from the same policies, returned as a list of curves."""
    slices = [held_out] if isinstance(held_out, ExitData) else list(held_out)
    curves: list[list[dict[str, Any]]] = [[] for _ in slices]
    for alpha in alphas:
        policy = train_policy(train, alpha=alpha, progress=progress, **kwargs)
        for curve, data in zip(curves, slices, strict=True):
            layers = policy.exit_layers(data.feats)
            curve.append({"alpha": float(alpha), **outcome(data, layers, cost),
                          "mean_exit_layer": float(layers.float().mean())})
    return curves[0] if isinstance(held_out, ExitData) else curves


def threshold_baseline(data: ExitData, thresholds: Sequence[float],
                       cost: ExitCost | None = None) -> list[dict[str, Any]]:
    """Confidence-threshold exit on the same tokens, for the comparison curve."""
    return [{"threshold": float(t), **outcome(data, exit_layers(data.conf, t), cost)}
            for t in thresholds]
