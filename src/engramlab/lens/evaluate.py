"""Per-layer quality of lenses on held-out text: KL to the final distribution, top-1 agreement
with the final prediction (precision@1, as in the shortcut papers) and next-token cross-entropy.

Logits are formed for a chunk of positions at a time and reduced at once to these three numbers,
so the cost in memory is one ``[chunk, vocab]`` matrix whatever the number of layers and tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..figures import figure
from ..models.lm import LM
from .base import Lens
from .states import layer_states


@dataclass
class LensReport:
    """Means over the evaluated tokens, one value per lens layer."""

    model: str
    tokens: int
    layers: list[int]
    lenses: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "tokens": self.tokens, "layers": self.layers,
                "lenses": self.lenses}

    def table(self) -> list[str]:
        """KL and top-1 agreement per layer and lens, as text lines (``engram lens eval``)."""
        names = [n for n in self.lenses if not n.startswith("_")]
        lines = [f"{self.model}: {self.tokens:,} held-out tokens; KL(final ‖ lens) / top-1 "
                 "agreement", f"{'layer':>5}  " + "  ".join(f"{n[:14]:>14}" for n in names)]
        for j, layer in enumerate(self.layers):
            cells = [f"{self.lenses[n]['kl'][j]:>6.2f} / {self.lenses[n]['top1'][j]:.2f}"
                     for n in names]
            lines.append(f"{layer:>5}  " + "  ".join(f"{c:>14}" for c in cells))
        lines.append("params: " + ", ".join(f"{n} {self.lenses[n]['params']:,}" for n in names))
        return lines


@torch.no_grad()
def evaluate_lenses(lm: LM, lenses: Mapping[str, Lens], batches: Iterable[torch.Tensor], *,
                    layers: Sequence[int] | None = None, chunk: int = 256,
                    progress: bool = False) -> LensReport:
    """Evaluate every lens at ``layers`` (default: all) on the text in ``batches``."""
    from tqdm.auto import tqdm

    layers = list(range(lm.n_layers)) if layers is None else [int(x) for x in layers]
    for layer in layers:
        if not 0 <= layer < lm.n_layers:
            raise IndexError(f"layer {layer} out of range 0..{lm.n_layers - 1}")
    sums = {name: {k: torch.zeros(len(layers), dtype=torch.float64) for k in ("kl", "top1", "ce")}
            for name in lenses}
    final_ce = torch.zeros((), dtype=torch.float64)
    tokens = ce_tokens = 0
    bar = tqdm(desc="lens eval", unit="tok", disable=not progress)
    for ids in batches:
        st = layer_states(lm, ids)
        for start in range(0, st.n_tokens, chunk):
            sl = slice(start, start + chunk)
            final = F.log_softmax(lm.logits_from_hidden(st.final[sl]).float(), -1)
            top = final.argmax(-1)
            nxt = st.next_ids[sl]
            has_next = nxt >= 0
            tgt = nxt.clamp_min(0)[:, None]
            final_ce += float(-final.gather(1, tgt).squeeze(1)[has_next].sum())
            for name, lens in lenses.items():
                s = sums[name]
                for j, layer in enumerate(layers):
                    logq = F.log_softmax(lens.predict(lm, st.hidden[layer][sl], layer).float(), -1)
                    s["kl"][j] += float((final.exp() * (final - logq)).sum())
                    s["top1"][j] += float((logq.argmax(-1) == top).sum())
                    s["ce"][j] += float(-logq.gather(1, tgt).squeeze(1)[has_next].sum())
            ce_tokens += int(has_next.sum())
        tokens += st.n_tokens
        bar.update(st.n_tokens)
    bar.close()
    if tokens == 0:
        raise ValueError("no tokens to evaluate lenses on")
    report = LensReport(lm.label, tokens, layers)
    for name, lens in lenses.items():
        s = sums[name]
        report.lenses[name] = {
            "kl": (s["kl"] / tokens).tolist(), "top1": (s["top1"] / tokens).tolist(),
            "ce": (s["ce"] / max(1, ce_tokens)).tolist(), "params": lens.n_params}
    report.lenses["_final"] = {"ce": float(final_ce) / max(1, ce_tokens)}
    return report


def plot_report(report: LensReport, out: str | Path) -> Path:
    """KL and top-1 agreement per layer for every lens, side by side (PNG)."""
    with figure(out, ncols=2, figsize=(11, 4)) as (_, (ax_kl, ax_top)):
        for name, vals in report.lenses.items():
            if name.startswith("_"):
                continue
            label = f"{name} ({vals['params']:,} params)"
            ax_kl.plot(report.layers, vals["kl"], marker=".", label=label)
            ax_top.plot(report.layers, vals["top1"], marker=".", label=label)
        ax_kl.set(xlabel="layer (input of block)", ylabel="KL(final ‖ lens), nats", yscale="log",
                  title=f"{Path(report.model).name}: KL to the final distribution")
        ax_top.set(xlabel="layer (input of block)", ylabel="top-1 agreement with final",
                   title=f"precision@1 ({report.tokens:,} held-out tokens)", ylim=(0, 1.02))
        ax_top.legend(fontsize=8)
    return Path(out)
