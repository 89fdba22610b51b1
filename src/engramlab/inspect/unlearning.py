"""Dissecting unlearning: in which layers erased knowledge can be patched back.

Hong et al. 2024, "Dissecting Fine-Tuning Unlearning in Large Language Models" (EMNLP), §3:
fine-tuning unlearning (GA, NPO, RMU, …) mostly changes how knowledge is *retrieved* — the MLP
coefficients and the attention — and leaves the value vectors that store it, so putting the
unedited model's activations back into the unlearned one, a window of layers at a time, brings
the knowledge back. How much comes back is the knowledge recovery score

    KRS = 1 − MSE(L_patched, L_original) / MSE(L_unlearned, L_original)

where L is each prompt's loss on the unedited model's own continuation of it and the mean
squared error runs over the prompts: 1 when the patch restores the original behaviour, 0 when
it changes nothing (it can fall below 0 when a patch moves the model further away). Patched
activations: the MLP coefficients (``mlp_key.{i}``, the input of the value projection) or the
attention outputs (``attn_out.{i}``) of every layer in the window, at every position.

An in-parameter erasure that rewrites value vectors (concept vectors, features) should leave
little to recover by patching coefficients: the knowledge is not where the patch can reach it.

Deviations: the continuation is ``tokens`` greedy tokens of the unedited model and L is the
mean negative log-likelihood over them; windows slide one layer at a time (``stride``). The
patching is :func:`engramlab.evaluate.erasure.patched_logits`, shared with erasure's own
coefficient-patching figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..batching import length_mask, pad_rows
from ..delta import WeightDelta
from ..errors import SettingsError
from ..evaluate.erasure import patched_logits
from ..models.lm import LM
from ..trace import Trace

PATCHED = {"mlp": "mlp_key", "attn": "attn_out"}


@dataclass
class Continued:
    """Prompts and the unedited model's continuations, right-padded: ``ids[r, starts[r]:
    ends[r]]`` are row r's continuation tokens."""

    ids: torch.Tensor
    mask: torch.Tensor
    starts: list[int]
    ends: list[int]


@torch.no_grad()
def continue_greedily(lm: LM, prompts: Sequence[str], tokens: int) -> Continued:
    """Each prompt followed by the model's ``tokens`` most likely next tokens, one at a time."""
    rows = [list(lm.tokenizer(p)["input_ids"]) for p in prompts]
    starts = [len(r) for r in rows]
    for _ in range(tokens):
        ids, mask = _pad(lm, rows)
        logits = lm.model(input_ids=ids, attention_mask=mask).logits
        nxt = logits[torch.arange(len(rows)), torch.tensor([len(r) - 1 for r in rows])]
        for r, t in zip(rows, nxt.argmax(-1).tolist(), strict=True):
            r.append(t)
    ids, mask = _pad(lm, rows)
    return Continued(ids, mask, starts, [len(r) for r in rows])


def _pad(lm: LM, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    ids, lengths = pad_rows(lm, rows)
    return ids, length_mask(ids, lengths).long()


def continuation_losses(logits: torch.Tensor, c: Continued) -> torch.Tensor:
    """Each row's mean negative log-likelihood of its continuation tokens."""
    logp = F.log_softmax(logits.float(), -1)
    out = []
    for r, (a, b) in enumerate(zip(c.starts, c.ends, strict=True)):
        pos = torch.arange(a - 1, b - 1, device=logits.device)  # the logits that predict them
        out.append(-logp[r, pos, c.ids[r, a:b]].mean())
    return torch.stack(out).cpu()


@dataclass
class Dissection:
    """KRS per window of layers and per patched activation."""

    windows: list[tuple[int, int]]
    krs: dict[str, list[float]]
    loss_original: float
    loss_unlearned: float
    n: int

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "windows": [list(w) for w in self.windows], "krs": self.krs,
                "loss_original": self.loss_original, "loss_unlearned": self.loss_unlearned,
                "peak": {k: self.peak(k) for k in self.krs}}

    def peak(self, kind: str) -> dict[str, Any]:
        k = max(range(len(self.windows)), key=self.krs[kind].__getitem__)
        return {"window": list(self.windows[k]), "krs": self.krs[kind][k]}

    def lines(self, title: str = "") -> list[str]:
        out = [title or "knowledge recovery by patching (KRS)",
               f"{self.n} prompts; loss on the unedited model's continuations: unedited "
               f"{self.loss_original:.3f}, unlearned {self.loss_unlearned:.3f}",
               f"{'layers':<10}" + "".join(f"{k:>8}" for k in self.krs)]
        for i, (a, b) in enumerate(self.windows):
            out.append(f"{a:>3}-{b - 1:<6}" + "".join(f"{v[i]:>8.3f}" for v in
                                                       self.krs.values()))
        for k in self.krs:
            p = self.peak(k)
            out.append(f"{k}: most recovered by layers {p['window'][0]}-{p['window'][1] - 1} "
                       f"(KRS {p['krs']:.3f})")
        return out


@torch.no_grad()
def dissect(lm: LM, delta: WeightDelta, prompts: Sequence[str], *, window: int = 5,
            stride: int = 1, tokens: int = 8, kinds: Sequence[str] = ("mlp", "attn")
            ) -> Dissection:
    """KRS of patching each window of ``window`` layers (see the module docstring). ``lm`` must
    be unedited; it is on exit."""
    unknown = set(kinds) - set(PATCHED)
    if unknown or not kinds:
        raise SettingsError(f"unknown activations {sorted(unknown)}; choose from {list(PATCHED)}")
    if not 1 <= window <= lm.n_layers or stride < 1 or tokens < 1:
        raise SettingsError(f"window must be 1..{lm.n_layers} layers; stride and tokens ≥ 1")
    if not prompts:
        raise SettingsError("no prompts to dissect the unlearning on")
    c = continue_greedily(lm, prompts, tokens)
    # the unedited run once, with every activation a window may patch back
    every = [f"{PATCHED[k]}.{i}" for k in kinds for i in range(lm.n_layers)]
    with Trace(lm).capture(*every) as unedited:
        logits = lm.model(input_ids=c.ids, attention_mask=c.mask).logits
    original = continuation_losses(logits, c)
    with delta.applied(lm):
        unlearned = continuation_losses(
            lm.model(input_ids=c.ids, attention_mask=c.mask).logits, c)
    base = float(((unlearned - original) ** 2).mean())
    if base == 0:
        raise SettingsError("the delta leaves these prompts' continuations exactly as they "
                            "were: there is nothing to recover")
    windows = [(a, a + window) for a in range(0, lm.n_layers - window + 1, stride)]
    krs: dict[str, list[float]] = {}
    for kind in kinds:
        krs[kind] = []
        for a, b in windows:
            points = [f"{PATCHED[kind]}.{i}" for i in range(a, b)]
            logits = patched_logits(lm, delta, c.ids, c.mask, points,
                                    {p: unedited[p] for p in points})
            patched = continuation_losses(logits, c)
            krs[kind].append(1 - float(((patched - original) ** 2).mean()) / base)
    return Dissection(windows, krs, float(original.mean()), float(unlearned.mean()),
                      len(prompts))


def plot_dissection(d: Dissection, out: str | Path, title: str = "") -> Path:
    """KRS against the window's first layer, one line per patched activation."""
    from ..figures import figure

    with figure(out) as (_, ax):
        for kind, values in d.krs.items():
            ax.plot([a for a, _ in d.windows], values, marker=".", label=f"patch {kind}")
        ax.axhline(0, color="grey", lw=0.8)
        width = d.windows[0][1] - d.windows[0][0]
        ax.set(xlabel=f"first layer of the {width}-layer window", ylabel="KRS",
               title=title or "knowledge recovered by patching")
        ax.legend()
    return Path(out)
