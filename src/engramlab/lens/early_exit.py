"""Confidence-threshold early exit read through any lens (the baseline of the early-exit
literature, e.g. Schuster et al. 2022 "Confident Adaptive Language Modeling"; the shortcut
papers report it with their maps).

A token exits at the first layer whose lens distribution has max-probability ≥ τ and takes that
layer's top-1; a token that never gets confident runs the whole model. Reading lens layer ℓ (the
input of block ℓ) means blocks 0 … ℓ−1 ran, so the compute share used is ℓ / L. Confidences and
top-1 tokens are computed once per (layer, token); every threshold is then free.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..models.lm import LM
from .base import Lens
from .states import layer_states

DEFAULT_THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.01)


@dataclass
class ExitReadings:
    """Per lens layer and token: max probability and top-1; the final model's top-1."""

    conf: torch.Tensor  # [L, N]
    pred: torch.Tensor  # [L, N]
    final: torch.Tensor  # [N]


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


def exit_layers(conf: torch.Tensor, threshold: float) -> torch.Tensor:
    """First layer whose confidence reaches ``threshold`` per token (L where none does)."""
    n_layers = conf.shape[0]
    hit = conf >= threshold
    first = torch.where(hit.any(0), hit.float().argmax(0), torch.full_like(hit[0], n_layers,
                                                                          dtype=torch.long))
    return first.long()


def threshold_curve(r: ExitReadings, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
                    ) -> list[dict[str, Any]]:
    """Per threshold: agreement with the full model, compute saved, exits per layer."""
    n_layers, n = r.conf.shape
    out = []
    for tau in thresholds:
        layer = exit_layers(r.conf, tau)
        exited = layer < n_layers
        pred = r.final.clone()
        pred[exited] = r.pred[layer[exited], exited.nonzero().squeeze(1)]
        counts = torch.bincount(layer, minlength=n_layers + 1)
        out.append({"threshold": float(tau),
                    "agreement": float((pred == r.final).float().mean()),
                    "compute_saved": float(1 - layer.float().mean() / n_layers),
                    "exit_share": (counts.float() / n).tolist()})
    return out


def saved_at(curve: Sequence[dict[str, Any]], agreement: float = 0.95) -> float:
    """Most compute saved by a threshold that keeps ``agreement`` with the full model."""
    ok = [p["compute_saved"] for p in curve if p["agreement"] >= agreement]
    return max(ok, default=0.0)


def plot_curves(curves: dict[str, Sequence[dict[str, Any]]], out: str | Path,
                title: str = "") -> Path:
    """Agreement vs compute saved, one line per lens (or exit policy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, curve in curves.items():
        ax.plot([p["compute_saved"] for p in curve], [p["agreement"] for p in curve],
                marker="o", ms=3, label=name)
    ax.axhline(0.95, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="share of block computations saved", ylabel="agreement with full model",
           title=title or "early exit trade-off", ylim=(0, 1.02))
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
