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
  of that layer and the two before it. The reference code trains only their down projections;
  ``weights="down"`` does the same, the default trains all three matrices like GA and NPO.

All three train the MLP weights (up/gate/down, or ``weights="down"``) of their layers with Adam
on the concept's ``forget_text`` against the bundled neutral paragraphs as retain set, then
return the change as a dense delta and leave the model as it was. By default the run is *tuned*
under the same budget as concept vectors (:mod:`.budget`: controls lose < 10 points, perplexity
rises < 10 %): checkpoints every few steps along each learning rate's run, keeping the one that
erases most inside the budget, so the methods are compared at equal collateral damage rather
than at whatever a fixed schedule happens to cost. (Papers tune the baselines too, usually on a
utility benchmark; ours is the project's budget.) Perplexity for the check is measured on
neutral text the retain term does not train on. Deviations: the texts are a paragraph, not a
corpus (the bundled concepts are small); RMU's steering coefficient is relative to the mean
hidden-state norm at the layer (the paper's absolute 6.5 was tuned for Zephyr-7B's scale), and
its forward passes stop after the steered layer (the later blocks play no part in its loss), so
a step runs a third of SmolLM2's blocks and no unembedding (20 steps: 13 s on 2 cores).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..data.concepts import Concept, Probe, controls_for, general_text
from ..delta import ParamDelta, WeightDelta
from ..errors import ConceptError
from ..models.lm import LM
from ..trace import Trace, run_model
from .budget import Budget, BudgetSearch

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


WEIGHTS = ("mlp", "down")


def mlp_params(lm: LM, layers: Sequence[int], weights: str = "mlp"
               ) -> dict[str, torch.nn.Parameter]:
    """The MLP weight matrices of ``layers`` (``"mlp"``: all of them; ``"down"``: the down
    projection only), by their names in the model."""
    if weights not in WEIGHTS:
        raise ConceptError(f"unknown weights {weights!r}; choose one of {WEIGHTS}")
    names = {id(p): n for n, p in lm.model.named_parameters()}
    out = {}
    for layer in layers:
        layer = lm.layout.check_layer(layer)
        module = lm.layout.mlp(layer) if weights == "mlp" else lm.layout.value_module(layer)
        for p in module.parameters():
            if p.dim() == 2:
                out[names[id(p)]] = p
    return out


def _diff(params: dict[str, torch.nn.Parameter],
          backup: dict[str, torch.Tensor]) -> dict[str, ParamDelta]:
    return {n: ParamDelta(dense=(p.detach() - backup[n]).cpu().clone())
            for n, p in params.items()}


def _train(params: dict[str, torch.nn.Parameter], backup: dict[str, torch.Tensor],
           loss: Callable[[], torch.Tensor], steps: int, lr: float, name: str, *,
           every: int = 0, check: Callable[[int], bool] | None = None) -> None:
    """Adam from the original weights for ``steps``; ``check(step)`` every ``every`` steps and
    at the last (run under no_grad on the live weights) ends the run early by returning False."""
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(backup[n])
    opt = torch.optim.Adam(params.values(), lr=lr)
    with torch.enable_grad():
        for step in range(1, steps + 1):
            value = loss()
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            if step % 5 == 1:
                log.info("%s lr %g step %d loss %.4f", name, lr, step, float(value.detach()))
            if check is not None and every and (step % every == 0 or step == steps):
                with torch.no_grad():
                    if not check(step):
                        return


# (steps, lr) per method; RMU's was chosen on SmolLM2 / Harry Potter (docs/erasure.md).
DEFAULTS: dict[str, tuple[int, float]] = {"ga": (20, 2e-5), "npo": (20, 2e-5),
                                          "rmu": (40, 2e-4)}


@dataclass
class FineTuneUnlearner:
    """Shared loop: Adam on the MLPs of ``layers``, returns the change as a dense delta.

    With ``tune`` (the default) the run is chosen under the same :class:`~.budget.Budget` as
    concept vectors: for each learning rate of ``lrs`` (default: the method's rate × 1, 2)
    training runs up to ``steps`` (default: twice the method's steps) and is scored every
    ``every`` steps on the live weights; the checkpoint with the lowest concept accuracy
    whose controls and perplexity stay inside the budget is returned, and a learning rate's
    run stops at its first checkpoint over budget. Without ``tune`` it trains exactly
    ``steps`` at ``lr`` (the method's defaults when unset)."""

    method: str = "ga"
    steps: int | None = None  # None: the method's default (DEFAULTS); with tune, twice it
    lr: float | None = None
    layers: list[int] | None = None
    retain_weight: float = 1.0
    beta: float = 0.1  # NPO
    rmu_layer: int | None = None  # RMU: default one third of the depth
    steering: float = 4.0  # RMU: target norm, in units of the mean hidden-state norm
    rmu_alpha: float = 1000.0  # RMU: weight of the retain term
    weights: str = "mlp"  # which MLP matrices train: "mlp" (all) or "down" (RMU's reference)
    seed: int = 0
    tune: bool = True
    lrs: tuple[float, ...] | None = None
    every: int = 5
    budget: Budget = field(default_factory=Budget)  # what a tuned setting may cost
    trials: list[dict[str, object]] = field(default_factory=list, init=False)

    def settings(self) -> tuple[int, float]:
        """Steps and learning rate: the given ones, else the method's measured default."""
        steps, lr = DEFAULTS.get(self.method, (20, 2e-5))
        return (self.steps if self.steps is not None else steps,
                self.lr if self.lr is not None else lr)

    def grid(self) -> tuple[tuple[float, ...], int]:
        """The learning rates and the longest run the tuner tries."""
        steps, lr = DEFAULTS.get(self.method, (20, 2e-5))
        lrs = self.lrs or ((self.lr,) if self.lr is not None else (lr, 2 * lr))
        return tuple(lrs), self.steps if self.steps is not None else 2 * steps

    def _layers(self, lm: LM) -> list[int]:
        if self.method == "rmu":
            at = self._rmu_layer(lm)
            return [i for i in (at - 2, at - 1, at) if i >= 0]
        return [lm.layout.check_layer(i) for i in (self.layers or range(lm.layout.n_layers))]

    def _retain_and_check(self, retain: Sequence[str] | None) -> tuple[list[str], list[str]]:
        """The retain set and the neutral text the tuner checks perplexity on, kept apart:
        GA and NPO descend on the retain set, so its perplexity *falls* as they train
        (Shakespeare, GA: 20.8 → 7.2 in 40 steps) and would hide any damage. By default the
        neutral text's tuning half is split between them; the evaluation half stays unseen."""
        tune = general_text(split="tune")
        if retain is None:
            return (tune[0::2] if self.tune else tune), tune[1::2]
        held = [t for t in tune if t not in retain]
        if self.tune and not held:
            raise ConceptError("the retain set covers all the neutral text the tuner checks "
                               "perplexity on; pass a smaller retain set or tune=False")
        return list(retain), held

    def _rmu_layer(self, lm: LM) -> int:
        return lm.layout.check_layer(self.rmu_layer if self.rmu_layer is not None
                                     else lm.layout.n_layers // 3)

    def erase(self, lm: LM, concept: Concept, retain: Sequence[str] | None = None,
              controls: Sequence[Probe] | None = None) -> WeightDelta:
        if self.method not in ("ga", "npo", "rmu"):
            raise ConceptError(f"unknown fine-tuning method {self.method!r}: ga, npo or rmu")
        if self.every < 1:
            raise ConceptError(f"every must be at least 1 step, got {self.every}")
        forget = sentences(concept.forget_text)
        retain, held = self._retain_and_check(retain)
        retain_rows = sentences(retain)
        if not forget:
            raise ConceptError(f"concept {concept.name!r} has no text to unlearn on")
        f_ids, f_mask = _rows(lm, forget)
        r_ids, r_mask = _rows(lm, retain_rows)
        params = mlp_params(lm, self._layers(lm), self.weights)
        backup = {n: p.detach().clone() for n, p in params.items()}
        flags = {n: p.requires_grad for n, p in lm.model.named_parameters()}
        try:
            extra = self._prepare(lm, f_ids, f_mask, r_ids, r_mask)
            lm.model.requires_grad_(False)
            for p in params.values():
                p.requires_grad_(True)

            def loss() -> torch.Tensor:
                return self._loss(lm, f_ids, f_mask, r_ids, r_mask, extra)

            if self.tune:
                entries, n_steps, lr = self._tune(lm, concept, params, backup, loss, controls,
                                                  held)
            else:
                n_steps, lr = self.settings()
                _train(params, backup, loss, n_steps, lr, self.method)
                entries = _diff(params, backup)
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(backup[n])
            for n, p in lm.model.named_parameters():
                p.requires_grad_(flags[n])
            lm.invalidate_fingerprint()
        return WeightDelta.for_model(lm, entries, method=self.method, concept=concept.name,
                                     steps=n_steps, lr=lr)

    def _tune(self, lm: LM, concept: Concept, params: dict[str, torch.nn.Parameter],
              backup: dict[str, torch.Tensor], loss: Callable[[], torch.Tensor],
              controls: Sequence[Probe] | None,
              neutral: Sequence[str]) -> tuple[dict[str, ParamDelta], int, float]:
        controls = list(controls_for(concept) if controls is None else controls)
        search = BudgetSearch(self.budget, lm, concept, controls, neutral)
        self.trials = search.trials
        first = min(self._layers(lm))  # the blocks before it keep their weights
        lrs, max_steps = self.grid()
        for lr in lrs:
            def check(step: int, lr: float = lr) -> bool:
                lm.invalidate_fingerprint()
                ok, t = search.score({"lr": lr, "steps": step}, lambda: _diff(params, backup),
                                     from_block=first)
                return ok and t > 0  # nothing left to erase: longer runs cannot do better

            _train(params, backup, loss, max_steps, lr, self.method, every=self.every,
                   check=check)
            if search.best_target == 0:
                break
        if search.best is None:
            raise ConceptError(f"no {self.method} run (learning rates {list(lrs)}, checkpoints "
                               f"every {self.every} of {max_steps} steps) keeps "
                               f"{search.budget.describe(concept)}: lower the learning rates "
                               "(--set lrs=...) or loosen the budget")
        setting, entries = search.best
        return entries, setting["steps"], setting["lr"]

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
