"""Linear shortcuts from a layer straight to the last block's output, fitted in closed form.

* :class:`Shortcut` — Din et al. 2023, "Jump to Conclusions: Short-Cutting Transformers With
  Linear Transformations": one linear map per layer, ``final ≈ A_ℓ h``, fitted by least squares
  on corpus states. We add a bias and a ridge term (λ · mean diagonal of XᵀX, default 1e-4), and
  an optional rank r. A rank-r map is the identity plus a rank-r correction (as LoRA adds a
  low-rank change to a weight): ``final ≈ h + B_r h̃``, with B_r the reduced-rank regression of
  the residual ``final − h`` (the full fit projected onto the top-r principal directions of its
  own fitted values, the least-squares optimum at that rank). Without the identity path a
  low-rank map throws away what the residual stream already carries and reads worse than the
  logit lens at late layers; with it, the fit can only improve on the identity (the logit lens)
  on the data it was fitted on.
* :class:`OneJump` — Seshadri 2025, "One Jump Is All You Need: Short-Cutting Transformers for
  Early Exit Prediction with One Jump to Fit All Exit Levels": a *single* low-rank shortcut used
  from every exit layer. Following the paper's normalised narrow shortcuts, each layer's state is
  first standardised (its own per-dimension mean and standard deviation, 2·d numbers per layer,
  which also tames the few "massive activation" dimensions whose scale differs by orders of
  magnitude between layers); candidate rank-r maps are fitted — one per layer, as the paper
  selects among, plus one fitted on all layers pooled — and the candidate with the lowest
  held-out error summed over all exit layers is kept. Deviations: as for the low-rank shortcut,
  the shared map is a correction added to the identity (``final ≈ h + B_r z̃``; the paper's has
  no identity path), and the paper selects on precision@1 where we select on held-out squared
  error of the final state, which the sufficient statistics give exactly without any vocabulary
  projection (a selection over L+1 candidates × L layers would otherwise cost more than the fit).

Both are fitted from streamed sufficient statistics (XᵀX, XᵀY per layer, float64), so the corpus
is read once and never held in memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..models.lm import LM
from .base import Lens
from .states import layer_states


@dataclass
class RegressionMoments:
    """Per-layer sums for affine least squares: X̃ = [X, 1] against the final state Y."""

    xx: torch.Tensor  # [L, d+1, d+1]
    xy: torch.Tensor  # [L, d+1, d]
    yy: torch.Tensor  # [] Σ‖y‖² (the same for every layer)
    count: int

    def residual(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """X̃ᵀR and Σ‖R‖² for the residual R = Y − X (what a map added to the identity fits)."""
        xx, xy = self.xx[layer], self.xy[layer]
        d = xy.shape[1]
        xr = xy - xx[:, :d]
        rr = self.yy - 2 * xy[:d].diagonal().sum() + xx[:d, :d].diagonal().sum()
        return xr, rr

    @classmethod
    @torch.no_grad()
    def collect(cls, lm: LM, batches: Iterable[torch.Tensor], *,
                progress: bool = False) -> RegressionMoments:
        from tqdm.auto import tqdm

        d, n_layers = lm.d_model, lm.n_layers
        xx = torch.zeros(n_layers, d + 1, d + 1, dtype=torch.float64, device=lm.device)
        xy = torch.zeros(n_layers, d + 1, d, dtype=torch.float64, device=lm.device)
        yy = torch.zeros((), dtype=torch.float64, device=lm.device)
        count = 0
        bar = tqdm(desc="shortcut statistics", unit="tok", disable=not progress)
        for ids in batches:
            st = layer_states(lm, ids)
            y = st.final.double()
            ones = torch.ones(st.n_tokens, 1, dtype=torch.float64, device=lm.device)
            for layer, h in enumerate(st.hidden):
                x = torch.cat([h.double(), ones], 1)
                xx[layer] += x.T @ x
                xy[layer] += x.T @ y
            yy += (y * y).sum()
            count += st.n_tokens
            bar.update(st.n_tokens)
        bar.close()
        if count == 0:
            raise ValueError("no tokens to fit shortcuts on; give a non-empty corpus")
        return cls(xx, xy, yy, count)


def ridge(xx: torch.Tensor, xy: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_B ‖X̃B − Y‖² + λ‖B‖² with λ relative to XᵀX's mean diagonal."""
    lam = ridge * xx.diagonal().mean()
    eye = torch.eye(xx.shape[0], dtype=xx.dtype, device=xx.device)
    return torch.linalg.solve(xx + lam * eye, xy)


def reduce_rank(b: torch.Tensor, xx: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced-rank regression: ``B ≈ U Vᵀ`` with the top-``rank`` directions of the fitted
    values' second moment BᵀXᵀXB. Returns U [d+1, r], V [d, r]."""
    fitted = b.T @ xx @ b
    _, vecs = torch.linalg.eigh(fitted)
    v = vecs[:, -rank:]
    return b @ v, v


def _sse(b: torch.Tensor, xx: torch.Tensor, xy: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
    """Σ‖X̃B − Y‖² from the sums alone."""
    return yy - 2 * (b * xy).sum() + (b * (xx @ b)).sum()


class Shortcut(Lens):
    kind = "shortcut"

    def __init__(self, lm: LM, *, rank: int | None = None, **config: Any) -> None:
        super().__init__(lm, rank=rank, **config)
        d, n = lm.d_model, lm.n_layers
        r = d if rank is None else int(rank)
        if not 0 < r <= d:
            raise ValueError(f"shortcut rank {rank} must be in 1..{d} (the model width)")
        self.rank = rank
        if rank is None:
            self.weight = nn.Parameter(torch.zeros(n, d + 1, d, device=lm.device),
                                       requires_grad=False)
        else:
            self.u = nn.Parameter(torch.zeros(n, d + 1, r, device=lm.device), requires_grad=False)
            self.v = nn.Parameter(torch.zeros(n, d, r, device=lm.device), requires_grad=False)

    def translate(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        h = hidden.float()
        if self.rank is None:
            w = self.weight[layer]
            return (h @ w[:-1] + w[-1]).to(hidden.dtype)
        u, v = self.u[layer], self.v[layer]
        return (h + (h @ u[:-1] + u[-1]) @ v.T).to(hidden.dtype)

    @torch.no_grad()
    def fit(self, moments: RegressionMoments, *, ridge_factor: float = 1e-4) -> Shortcut:
        for layer in range(self.n_layers):
            if self.rank is None:
                self.weight[layer] = ridge(moments.xx[layer], moments.xy[layer],
                                           ridge_factor).float()
            else:  # the identity plus the best rank-r fit of what it leaves
                xr, _ = moments.residual(layer)
                b = ridge(moments.xx[layer], xr, ridge_factor)
                u, v = reduce_rank(b, moments.xx[layer], self.rank)
                self.u[layer], self.v[layer] = u.float(), v.float()
        self.config.update(ridge=ridge_factor, fit_tokens=moments.count)
        return self

    def affine(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s map as (W [d, d] acting as ``h Wᵀ``, c [d]): a tuned-lens start."""
        if self.rank is None:
            w = self.weight[layer]
            return w[:-1].T, w[-1]
        full = self.u[layer] @ self.v[layer].T
        eye = torch.eye(self.d_model, device=full.device, dtype=full.dtype)
        return eye + full[:-1].T, full[-1]


class OneJump(Lens):
    kind = "onejump"

    def __init__(self, lm: LM, *, rank: int = 64, **config: Any) -> None:
        super().__init__(lm, rank=rank, **config)
        d, n = lm.d_model, lm.n_layers
        if not 0 < rank <= d:
            raise ValueError(f"one-jump rank {rank} must be in 1..{d} (the model width)")
        self.rank = rank
        self.mean = nn.Parameter(torch.zeros(n, d, device=lm.device), requires_grad=False)
        self.scale = nn.Parameter(torch.ones(n, d, device=lm.device), requires_grad=False)
        self.u = nn.Parameter(torch.zeros(d + 1, rank, device=lm.device), requires_grad=False)
        self.v = nn.Parameter(torch.zeros(d, rank, device=lm.device), requires_grad=False)

    def translate(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        h = hidden.float()
        z = (h - self.mean[layer]) / self.scale[layer]
        return (h + (z @ self.u[:-1] + self.u[-1]) @ self.v.T).to(hidden.dtype)

    @torch.no_grad()
    def fit(self, train: RegressionMoments, held_out: RegressionMoments, *,
            ridge_factor: float = 1e-4) -> OneJump:
        """Fit the candidates on ``train``, keep the best on ``held_out`` (see module doc)."""
        # every candidate fits the residual final − h on the standardised state z̃
        zs_train = [_standardise(train, layer) for layer in range(self.n_layers)]
        stats = [(m, s) for _, _, m, s in zs_train]
        zs_held = [_standardise(held_out, layer, stats[layer])
                   for layer in range(self.n_layers)]
        rr_held = [held_out.residual(layer)[1] for layer in range(self.n_layers)]
        candidates = [ridge(xx, xy, ridge_factor) for xx, xy, _, _ in zs_train]
        pooled_xx = sum(xx for xx, _, _, _ in zs_train)
        pooled_xy = sum(xy for _, xy, _, _ in zs_train)
        candidates.append(ridge(pooled_xx, pooled_xy, ridge_factor))
        pooled_rank = None
        best, best_err, best_from = None, float("inf"), -1
        for c, b in enumerate(candidates):
            xx_src = pooled_xx if c == self.n_layers else zs_train[c][0]
            u, v = reduce_rank(b, xx_src, self.rank)
            low = u @ v.T
            err = sum(float(_sse(low, xx, xr, rr))
                      for (xx, xr, _, _), rr in zip(zs_held, rr_held, strict=True))
            if err < best_err:
                best, best_err, best_from = (u, v), err, c
            if c == self.n_layers:
                pooled_rank = err
        assert best is not None
        for layer, (m, s) in enumerate(stats):
            self.mean[layer], self.scale[layer] = m.float(), s.float()
        self.u.copy_(best[0].float())
        self.v.copy_(best[1].float())
        total = float(held_out.yy) * self.n_layers  # R² of the final state, as before
        self.config.update(ridge=ridge_factor, fit_tokens=train.count,
                           chosen="pooled" if best_from == self.n_layers else f"layer {best_from}",
                           held_out_r2=1 - best_err / total,
                           pooled_r2=None if pooled_rank is None else 1 - pooled_rank / total)
        return self


def _standardise(m: RegressionMoments, layer: int,
                 stats: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Moments of z = (x − μ)/s from those of x, without revisiting the data: Z̃ᵀZ̃ and Z̃ᵀR
    for the residual R = Y − X.

    With x̃ = [x, 1] and z̃ = [z, 1] = x̃ T for T = [[diag(1/s), 0], [−μ/s, 1]], Z̃ᵀZ̃ =
    Tᵀ X̃ᵀX̃ T and Z̃ᵀR = Tᵀ X̃ᵀR. μ and s (per-dimension mean and standard deviation) come from
    ``stats`` (the training split's) or from these moments.
    """
    xx, xy = m.xx[layer], m.residual(layer)[0]
    d = xx.shape[0] - 1
    n = xx[d, d]
    if stats is None:
        mu = xx[d, :d] / n
        s = (xx[:d, :d].diagonal() / n - mu * mu).clamp_min(1e-12).sqrt()
    else:
        mu, s = stats
    t = torch.zeros(d + 1, d + 1, dtype=xx.dtype, device=xx.device)
    t[:d, :d] = torch.diag(1 / s)
    t[d, :d] = -mu / s
    t[d, d] = 1
    return t.T @ xx @ t, t.T @ xy, mu, s
