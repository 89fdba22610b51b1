"""Fine-tuning unlearning baselines: gradient ascent, NPO and RMU, each as a dense WeightDelta.

* **GA** — gradient ascent on the forget text's language-modelling loss (Jang et al. 2023,
  "Knowledge Unlearning for Mitigating Privacy Risks in Language Models"), with the usual
  gradient-descent term on a retain set (``retain_weight``; 0 gives plain GA).
* **NPO** — Negative Preference Optimization (Zhang et al. 2024, "Negative Preference
  Optimization: From Catastrophic Collapse to Effective Unlearning"): the forget loss is
  ``-(2/β) log σ(-β (log π_θ(y|x) - log π_ref(y|x)))`` per sequence, which saturates instead of
  running away like GA; plus the retain term.
* **RMU** — Representation Misdirection for Unlearning (Li et al. 2024, "The WMDP Benchmark"):
  push the forget text's hidden states at one layer toward a fixed random direction scaled by
  ``steering`` and keep the retain text's hidden states where they were, updating only the MLPs
  of that layer and the two before it.

All three train the MLP weights (up/gate/down) of their layers with Adam on the concept's
``forget_text`` against the bundled neutral paragraphs as retain set, then return the change
as a dense delta and leave the model as it was. Deviations: the texts are a paragraph, not a
corpus (the bundled concepts are small); RMU's steering coefficient is relative to the mean
hidden-state norm at the layer (the paper's absolute 6.5 was tuned for Zephyr-7B's scale), and
its forward passes stop after the steered layer (the later blocks play no part in its loss),
so a step runs a third of SmolLM2's blocks and no unembedding (20 steps: 13 s on 2 cores).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..data.concepts import Concept, general_text
from ..delta import ParamDelta, WeightDelta
from ..errors import ConceptError
from ..models.lm import LM
from ..trace import Trace, run_model

log = logging.getLogger(__name__)


def sentences(texts: Sequence[str]) -> list[str]:
    """Split paragraphs into sentences: each becomes one training row."""
    out = []
    for t in texts:
        out.extend(s.strip() for s in re.split(r"(?<=[.!?])\s+", t) if len(s.strip()) > 3)
    return out


def _rows(lm: LM, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = [lm.tokenizer(t)["input_ids"] for t in texts]
    width = max(len(e) for e in enc)
    ids = torch.full((len(enc), width), lm.tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(enc):
        ids[i, :len(e)] = torch.tensor(e)
        mask[i, :len(e)] = 1
    return ids.to(lm.device), mask.to(lm.device)


def _seq_logprob(lm: LM, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ log p(token) per row over the real tokens after the first."""
    logits = lm.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    return (lp * mask[:, 1:]).sum(-1)


def _nll(lm: LM, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return -_seq_logprob(lm, ids, mask).sum() / mask[:, 1:].sum()


def mlp_params(lm: LM, layers: Sequence[int]) -> dict[str, torch.nn.Parameter]:
    """The MLP weight matrices of ``layers``, by their names in the model."""
    names = {id(p): n for n, p in lm.model.named_parameters()}
    out = {}
    for layer in layers:
        for p in lm.layout.mlp(lm.layout.check_layer(layer)).parameters():
            if p.dim() == 2:
                out[names[id(p)]] = p
    return out


# (steps, lr) per method. RMU's, measured on SmolLM2 / Harry Potter (target / controls /
# perplexity; unedited 1.0 / 1.0 / 17.69): lr 2e-5 x 20 steps changed nothing (1.0 / 0.99);
# 1e-4 x 20: 0.82 / 0.94; 2e-4 x 20 (retain weight 100): 0.53 / 0.90; 5e-4 x 20: 0.06 / 0.62;
# 2e-4 x 40 with retain weight 1000: 0.18 / 0.905 / 17.94, the default.
DEFAULTS: dict[str, tuple[int, float]] = {"ga": (20, 2e-5), "npo": (20, 2e-5),
                                          "rmu": (40, 2e-4)}


@dataclass
class FineTuneUnlearner:
    """Shared loop: Adam on the MLPs of ``layers``, returns the change as a dense delta."""

    method: str = "ga"
    steps: int | None = None  # None: the method's default (DEFAULTS)
    lr: float | None = None
    layers: list[int] | None = None
    retain_weight: float = 1.0
    beta: float = 0.1  # NPO
    rmu_layer: int | None = None  # RMU: default one third of the depth
    steering: float = 4.0  # RMU: target norm, in units of the mean hidden-state norm
    rmu_alpha: float = 1000.0  # RMU: weight of the retain term
    seed: int = 0

    def settings(self) -> tuple[int, float]:
        """Steps and learning rate: the given ones, else the method's measured default."""
        steps, lr = DEFAULTS.get(self.method, (20, 2e-5))
        return (self.steps if self.steps is not None else steps,
                self.lr if self.lr is not None else lr)

    def _layers(self, lm: LM) -> list[int]:
        if self.method == "rmu":
            at = self._rmu_layer(lm)
            return [i for i in (at - 2, at - 1, at) if i >= 0]
        return [lm.layout.check_layer(i) for i in (self.layers or range(lm.layout.n_layers))]

    def _rmu_layer(self, lm: LM) -> int:
        return lm.layout.check_layer(self.rmu_layer if self.rmu_layer is not None
                                     else lm.layout.n_layers // 3)

    def erase(self, lm: LM, concept: Concept, retain: Sequence[str] | None = None) -> WeightDelta:
        if self.method not in ("ga", "npo", "rmu"):
            raise ConceptError(f"unknown fine-tuning method {self.method!r}: ga, npo or rmu")
        forget = sentences(concept.forget_text)
        retain_rows = sentences(general_text(split="tune") if retain is None else retain)
        if not forget:
            raise ConceptError(f"concept {concept.name!r} has no text to unlearn on")
        f_ids, f_mask = _rows(lm, forget)
        r_ids, r_mask = _rows(lm, retain_rows)
        params = mlp_params(lm, self._layers(lm))
        backup = {n: p.detach().clone() for n, p in params.items()}
        flags = {n: p.requires_grad for n, p in lm.model.named_parameters()}
        lm.model.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        extra = self._prepare(lm, f_ids, f_mask, r_ids, r_mask)
        n_steps, lr = self.settings()
        opt = torch.optim.Adam(params.values(), lr=lr)
        try:
            with torch.enable_grad():
                for step in range(n_steps):
                    loss = self._loss(lm, f_ids, f_mask, r_ids, r_mask, extra)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if step % 5 == 0:
                        log.info("%s step %d loss %.4f", self.method, step, float(loss.detach()))
            entries = {n: ParamDelta(dense=(p.detach() - backup[n]).cpu().clone())
                       for n, p in params.items()}
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(backup[n])
            for n, p in lm.model.named_parameters():
                p.requires_grad_(flags[n])
            lm.invalidate_fingerprint()
        return WeightDelta.for_model(lm, entries, method=self.method, concept=concept.name,
                                     steps=n_steps, lr=lr)

    # method-specific pieces ----------------------------------------------------------------
    @torch.no_grad()
    def _prepare(self, lm: LM, f_ids: torch.Tensor, f_mask: torch.Tensor, r_ids: torch.Tensor,
                 r_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.method == "npo":
            return {"ref": _seq_logprob(lm, f_ids, f_mask)}
        if self.method == "rmu":
            at = self._rmu_layer(lm)
            point = f"resid.{at}"
            with Trace(lm).capture(point) as tr:
                run_model(lm, f_ids, f_mask, stop_after=at)
            scale = tr[point][f_mask.bool()].norm(dim=-1).mean()
            with Trace(lm).capture(point) as tr:
                run_model(lm, r_ids, r_mask, stop_after=at)
            gen = torch.Generator().manual_seed(self.seed)
            u = torch.rand(lm.layout.d_model, generator=gen)
            u = (u / u.norm()).to(lm.device, tr[point].dtype)
            return {"target": self.steering * scale * u, "retain_h": tr[point].clone()}
        return {}

    def _loss(self, lm: LM, f_ids: torch.Tensor, f_mask: torch.Tensor, r_ids: torch.Tensor,
              r_mask: torch.Tensor, extra: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.method == "rmu":
            at = self._rmu_layer(lm)
            point = f"resid.{at}"
            # only the blocks up to the layer matter: the later ones are never run
            with Trace(lm).capture(point, detach=False) as tr:
                run_model(lm, f_ids, f_mask, stop_after=at)
                hf = tr[point]
                run_model(lm, r_ids, r_mask, stop_after=at)
                hr = tr[point]
            fm, rm = f_mask.bool(), r_mask.bool()
            forget = ((hf - extra["target"]) ** 2)[fm].mean()
            keep = ((hr - extra["retain_h"]) ** 2)[rm].mean()
            return forget + self.rmu_alpha * keep
        retain = _nll(lm, r_ids, r_mask) if self.retain_weight else torch.zeros(())
        if self.method == "ga":
            return -_nll(lm, f_ids, f_mask) + self.retain_weight * retain
        logp = _seq_logprob(lm, f_ids, f_mask)
        ratio = logp - extra["ref"]
        npo = -(2.0 / self.beta) * torch.nn.functional.logsigmoid(-self.beta * ratio).mean()
        return npo + self.retain_weight * retain


def GA(**kw: object) -> FineTuneUnlearner:
    return FineTuneUnlearner(method="ga", **kw)  # type: ignore[arg-type]


def NPO(**kw: object) -> FineTuneUnlearner:
    return FineTuneUnlearner(method="npo", **kw)  # type: ignore[arg-type]


def RMU(**kw: object) -> FineTuneUnlearner:
    return FineTuneUnlearner(method="rmu", **kw)  # type: ignore[arg-type]
