"""Confidence-threshold early exit read through any lens (the baseline of the early-exit
literature, e.g. Schuster et al. 2022 "Confident Adaptive Language Modeling"; the shortcut
papers report it with their maps).

A token exits at the first layer whose lens distribution has max-probability ≥ τ and takes that
layer's top-1; a token that never gets confident runs the whole model. Reading lens layer ℓ (the
input of block ℓ) means blocks 0 … ℓ−1 ran. Confidences and top-1 tokens are computed once per
(layer, token); every threshold is then free.

Two compute figures per curve point: ``compute_saved`` counts blocks only (1 − ℓ/L), as the
early-exit papers do; ``net_compute_saved`` also charges every exit check made (the lens map,
the final norm and the unembedding at each layer a token passes), in FLOPs relative to the full
model's blocks plus its one readout (:class:`ExitCost`). A check through a 49k-token
unembedding costs about eight SmolLM2 blocks, so checking every layer costs more than it saves.
A threshold (or a policy's α) is chosen on a development slice and reported on a test slice
(:func:`operating_point`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..figures import figure
from ..models.lm import LM
from .base import Lens
from .readings import first_layer_where
from .states import layer_states

DEFAULT_THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.01)


@dataclass
class ExitReadings:
    """Per lens layer and token: max probability and top-1; the final model's top-1."""

    conf: torch.Tensor  # [L, N]
    pred: torch.Tensor  # [L, N]
    final: torch.Tensor  # [N]

    def split(self, frac: float = 0.5) -> tuple[ExitReadings, ExitReadings]:
        """The first ``frac`` of the tokens (development) and the rest (test)."""
        cut = int(self.final.shape[0] * frac)
        if not 0 < cut < self.final.shape[0]:
            raise ValueError(f"cannot split {self.final.shape[0]} tokens at {frac}")
        return (ExitReadings(self.conf[:, :cut], self.pred[:, :cut], self.final[:cut]),
                ExitReadings(self.conf[:, cut:], self.pred[:, cut:], self.final[cut:]))


@torch.no_grad()
def exit_readings(lm: LM, lens: Lens, batches: Iterable[torch.Tensor], *,
                  chunk: int = 256) -> ExitReadings:
    confs, preds, finals = [], [], []
    for ids in batches:
        st = layer_states(lm, ids)
        for start in range(0, st.n_tokens, chunk):
            sl = slice(start, start + chunk)
            finals.append(lm.logits_from_hidden(st.final[sl]).argmax(-1).cpu())
            c, p = [], []
            for layer in range(lm.n_layers):
                probs = F.softmax(lens.predict(lm, st.hidden[layer][sl], layer).float(), -1)
                v, i = probs.max(-1)
                c.append(v.cpu())
                p.append(i.cpu())
            confs.append(torch.stack(c))
            preds.append(torch.stack(p))
    if not finals:
        raise ValueError("no tokens to read early-exit confidences on")
    return ExitReadings(torch.cat(confs, 1), torch.cat(preds, 1), torch.cat(finals))


@dataclass(frozen=True)
class ExitCost:
    """FLOPs per token (weights only; attention over the context is not counted): one block,
    one exit check at a layer, and the readout the full model makes once anyway."""

    block: float
    check: float
    readout: float
    exit_readout: float = 0.0  # paid once on exiting, when the checks do not read out

    @classmethod
    def of(cls, lm: LM, lens: Lens, extra_check: float = 0.0,
           check_reads_out: bool = True) -> ExitCost:
        """Costs for ``lens`` on ``lm``: a check is the lens map at one layer and the final
        norm, plus the unembedding when the check reads the distribution (``check_reads_out``;
        otherwise the unembedding is paid once, at the exit), plus ``extra_check`` (a policy's
        or a confidence head's own work)."""
        block = 2.0 * sum(p.numel() for p in lm.layout.block(0).parameters())
        norm = 4.0 * lm.d_model
        unembed = 2.0 * lm.d_model * lm.vocab_size
        per_layer = sum(p.numel() // lens.n_layers if p.dim() and p.shape[0] == lens.n_layers
                        else p.numel() for p in lens.parameters())
        check = 2.0 * per_layer + norm + extra_check + (unembed if check_reads_out else 0.0)
        return cls(block, check, unembed + norm, 0.0 if check_reads_out else unembed)

    def net_saved(self, layers: torch.Tensor, n_layers: int) -> float:
        """1 − cost / full cost when each token exits at ``layers`` (``n_layers``: never), having
        checked every layer up to its exit (all of them when it never exits)."""
        depth = layers.float()
        exited = layers < n_layers
        checks = torch.where(exited, depth + 1, torch.full_like(depth, float(n_layers)))
        cost = (depth * self.block + checks * self.check
                + torch.where(exited, self.exit_readout, self.readout))
        return float(1 - cost.mean() / (n_layers * self.block + self.readout))


def exit_layers(conf: torch.Tensor, threshold: float) -> torch.Tensor:
    """First layer whose confidence reaches ``threshold`` per token (L where none does)."""
    return first_layer_where(conf >= threshold)


def threshold_curve(r: ExitReadings, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                    cost: ExitCost | None = None) -> list[dict[str, Any]]:
    """Per threshold: agreement with the full model, compute saved (blocks; with ``cost`` also
    net of the checks), exits per layer."""
    n_layers, n = r.conf.shape
    agree = r.pred == r.final[None]
    out = []
    for tau in thresholds:
        layer = exit_layers(r.conf, tau)
        counts = torch.bincount(layer, minlength=n_layers + 1)
        out.append({"threshold": float(tau), **exit_outcome(agree, layer, cost),
                    "exit_share": (counts.float() / n).tolist()})
    return out


def exit_outcome(agree: torch.Tensor, layers: torch.Tensor, cost: ExitCost | None = None
                 ) -> dict[str, float]:
    """Agreement with the full model and compute saved (blocks; with ``cost`` also net of the
    checks) when token ``i`` exits at ``layers[i]`` (``n_layers``: it did not exit);
    ``agree[l, i]`` says whether layer ``l``'s prediction for it is the final one."""
    n_layers, n = agree.shape
    exited = layers < n_layers
    kept = torch.ones(n, dtype=torch.bool)
    cols = exited.nonzero().squeeze(1)
    kept[cols] = agree[layers[cols], cols].cpu()
    out = {"agreement": float(kept.float().mean()),
           "compute_saved": float(1 - layers.float().mean() / n_layers)}
    if cost is not None:
        out["net_compute_saved"] = cost.net_saved(layers, n_layers)
    return out


def saved_at(curve: Sequence[dict[str, Any]], agreement: float = 0.95,
             key: str = "compute_saved") -> float:
    """Most compute saved by a point of ``curve`` that keeps ``agreement`` with the full model
    (on the data the curve was made on: use :func:`operating_point` to report it)."""
    ok = [p[key] for p in curve if p["agreement"] >= agreement]
    return max(ok, default=0.0)


def operating_point(dev: Sequence[dict[str, Any]], test: Sequence[dict[str, Any]],
                    agreement: float = 0.95, key: str = "compute_saved") -> dict[str, Any]:
    """The point (threshold or α) that saves most ``key`` on ``dev`` while keeping
    ``agreement`` there, with what it does on ``test`` (the same points, other tokens).

    With no dev point reaching the agreement, the most agreeing one is taken (and says so)."""
    if len(dev) != len(test):
        raise ValueError("dev and test curves must list the same points")
    ok = [i for i, p in enumerate(dev) if p["agreement"] >= agreement]
    i = max(ok, key=lambda j: dev[j][key]) if ok else \
        max(range(len(dev)), key=lambda j: dev[j]["agreement"])
    setting = {k: v for k, v in dev[i].items() if k in ("threshold", "alpha")}
    return {"target_agreement": agreement, "reached_on_dev": bool(ok), **setting,
            "dev": {"agreement": dev[i]["agreement"], key: dev[i][key]},
            "test": {k: test[i][k] for k in ("agreement", "compute_saved",
                                             "net_compute_saved") if k in test[i]}}


def plot_curves(curves: dict[str, Sequence[dict[str, Any]]], out: str | Path,
                title: str = "") -> Path:
    """Agreement vs compute saved, one colour per lens (or exit policy): solid for blocks
    saved, dashed for the saving net of the exit checks where the curve has it."""
    with figure(out) as (_, ax):
        for name, curve in curves.items():
            (line,) = ax.plot([p["compute_saved"] for p in curve], [p["agreement"] for p in curve],
                              marker="o", ms=3, label=name)
            if all("net_compute_saved" in p for p in curve):
                ax.plot([p["net_compute_saved"] for p in curve], [p["agreement"] for p in curve],
                        ls="--", lw=1, color=line.get_color())
        ax.axhline(0.95, color="grey", lw=0.8, ls="--")
        ax.axvline(0.0, color="grey", lw=0.8)
        ax.set(xlabel="compute saved (solid: blocks; dashed: net of the exit checks)",
               ylabel="agreement with full model",
               title=title or "early exit trade-off", ylim=(0, 1.02))
        ax.legend(fontsize=8)
    return Path(out)
