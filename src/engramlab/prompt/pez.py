"""Readable prompts: PEZ's hard prompts and the interpretability terms of Patel et al.

PEZ (Wen et al., "Hard Prompts Made Easy: Gradient-Based Discrete Optimization for Prompt
Tuning and Discovery", NeurIPS 2023) keeps a continuous prompt P but always evaluates its
projection P' onto the nearest vocabulary embeddings (cosine): each step computes the loss and
its gradient at P' and applies that gradient to P (a straight-through step), so the prompt that
is scored and kept is a sequence of real tokens.

Patel et al. ("Towards Interpretable Soft Prompts", 2025) judge a trainable prompt by
*faithfulness* (does what a person reads — its nearest tokens — do what the prompt does?) and
*scrutability*, proxied by the prompt's perplexity under the model, and add that proxy to the
tuning loss. Here the fluency term is the mean next-token negative log-likelihood of the prompt's
nearest tokens, read with the prompt itself as input (``prompt_nll``): for PEZ the prompt's own
tokens, for a soft prompt the tokens a reader would see. Its weight ``fluency`` sets the trade
between task accuracy and readability.

Each position plays two roles in that likelihood: context for the tokens after it, and the token
predicted from those before it. The nearest token is a discrete choice, so a plain
cross-entropy against it reaches a position only in its first role: the term would move the
prompt to make its current tokens likelier but never towards likelier tokens. With
``fluency_roles="both"`` (the default) the one-hot target of each predicted position is
replaced, in the gradient only, by a softmax over the cosines of that position's vector to the
vocabulary at temperature ``fluency_temperature`` (a straight-through target: the loss's value
is unchanged), so the term also pulls each position towards the tokens the model expects there.
``"context"`` keeps the first role only.

Deviations: PEZ's reference optimises CLIP image-text similarity with AdamW (lr 0.1, weight
decay 0.1), here the label cross-entropy of a task (the same optimiser settings); the best
validation step is kept, as for soft prompts; Patel et al. tune GPT-2 with RLPrompt as well,
which is not offered. The straight-through target of the second role is ours; neither paper
says how the perplexity's gradient reaches a projected prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..models.lm import LM
from .nearest import nearest_ids
from .soft import (
    Keeper,
    SoftPrompt,
    TuneConfig,
    accuracy,
    batches,
    initial_prompt,
    label_loss,
)
from .tasks import LabelRow, LabelTask


def project(lm: LM, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [P], embeddings [P, d])``: each vector's nearest vocabulary token (cosine)."""
    ids = nearest_ids(lm, vectors, 1)[0][:, 0]
    emb = lm.model.get_input_embeddings().weight
    return ids, emb[ids.to(emb.device)].detach().float()


FLUENCY_ROLES = ("both", "context")


def prompt_nll(lm: LM, prompt: torch.Tensor, ids: torch.Tensor, *,
               temperature: float | None = None) -> torch.Tensor:
    """Mean negative log-likelihood of ``ids[1:]`` when the model reads ``prompt`` (``[P, d]``)
    as its input: the log-perplexity of the prompt's tokens, differentiable in ``prompt``.

    With a ``temperature``, the gradient also reaches each predicted position through its
    target (module docstring): the one-hot of ``ids[i]`` becomes, in the gradient only,
    ``softmax(cos(prompt[i], vocabulary) / temperature)``."""
    if prompt.shape[0] < 2:
        return prompt.new_zeros(())
    emb = lm.model.get_input_embeddings().weight
    out = lm.model(inputs_embeds=prompt[None].to(emb.dtype), use_cache=False).logits[0, :-1]
    logp = out.float().log_softmax(-1)
    target = F.one_hot(ids[1:].to(out.device), logp.shape[-1]).float()
    if temperature is not None:
        cos = F.normalize(prompt[1:].float().to(out.device), dim=-1) \
            @ F.normalize(emb.detach().float(), dim=-1).T
        soft = (cos / temperature).softmax(-1)
        target = target + soft - soft.detach()
    return -(target * logp).sum(-1).mean()


def readability(lm: LM, prompt: torch.Tensor, task: LabelTask, rows: Sequence[LabelRow]
                ) -> dict[str, Any]:
    """What a reader of ``prompt`` sees and whether it does the prompt's work: its nearest
    tokens and their perplexity, and accuracy with the prompt and with those tokens instead."""
    ids, hard = project(lm, prompt)
    with torch.no_grad():
        nll = float(prompt_nll(lm, hard, ids))
    return {"tokens": [lm.decode(int(i)) for i in ids], "text": lm.decode(ids.tolist()),
            "perplexity": float(torch.tensor(nll).exp()),
            "accuracy": accuracy(lm, prompt, task, rows),
            "projected_accuracy": accuracy(lm, hard, task, rows)}


def fluency_loss(lm: LM, task: LabelTask, weight: float, roles: str = "both",
                 temperature: float = 0.05
                 ) -> Callable[[torch.Tensor, Sequence[LabelRow]], torch.Tensor]:
    """A soft prompt's loss with Patel et al.'s term: the label cross-entropy plus ``weight``
    × the log-perplexity of the prompt's nearest tokens, read with the prompt as input (and,
    with ``roles="both"``, as the tokens predicted: :func:`prompt_nll`)."""
    tau = target_temperature(roles, temperature)

    def loss(p: torch.Tensor, rows: Sequence[LabelRow]) -> torch.Tensor:
        task_loss = label_loss(lm, task, p, rows)
        if weight == 0:
            return task_loss
        ids = project(lm, p.detach())[0]
        return task_loss + weight * prompt_nll(lm, p, ids, temperature=tau)

    return loss


def target_temperature(roles: str, temperature: float) -> float | None:
    """What :func:`prompt_nll` takes for these settings: ``temperature`` when the term reaches
    a position in both roles, None in its context role alone; bad settings are refused."""
    if roles not in FLUENCY_ROLES:
        raise InputError(f"fluency roles {roles!r}; use one of {', '.join(FLUENCY_ROLES)}")
    if not temperature > 0:
        raise InputError(f"the fluency temperature must be above 0, got {temperature}")
    return temperature if roles == "both" else None


@dataclass
class PEZConfig:
    tokens: int = 10
    steps: int = 150
    lr: float = 0.1
    weight_decay: float = 0.1
    batch_size: int = 16
    eval_every: int = 25
    fluency: float = 0.0
    fluency_roles: str = "both"  # "context": the term reaches a position only as context
    fluency_temperature: float = 0.05  # of the cosine softmax that stands for the target
    seed: int = 0

    def check(self) -> None:
        TuneConfig(tokens=self.tokens, steps=self.steps, lr=self.lr,
                   batch_size=self.batch_size, eval_every=self.eval_every).check()
        if self.fluency < 0:
            raise InputError(f"the fluency weight must be at least 0, got {self.fluency}")
        target_temperature(self.fluency_roles, self.fluency_temperature)


def pez(lm: LM, task: LabelTask, config: PEZConfig | None = None, *,
        on_step: Callable[[dict[str, Any]], None] | None = None) -> SoftPrompt:
    """A hard prompt for ``task`` by PEZ (module docstring); the returned prompt's vectors are
    real token embeddings, its tokens in ``meta["ids"]`` and ``meta["text"]``."""
    config = config or PEZConfig()
    config.check()
    tau = target_temperature(config.fluency_roles, config.fluency_temperature)
    soft = initial_prompt(lm, config.tokens, config.seed).requires_grad_(True)
    opt = torch.optim.AdamW([soft], lr=config.lr, weight_decay=config.weight_decay)
    keeper = Keeper(lm, task, config.steps, config.eval_every, on_step)
    draw = batches(len(task.train), config.batch_size, config.seed)
    with lm.frozen_weights():
        for step in range(1, config.steps + 1):
            rows = [task.train[i] for i in next(draw)]
            ids, hard = project(lm, soft.detach())
            hard.requires_grad_(True)
            loss = label_loss(lm, task, hard, rows)
            if config.fluency > 0:
                loss = loss + config.fluency * prompt_nll(lm, hard, ids, temperature=tau)
            (grad,) = torch.autograd.grad(loss, hard)
            opt.zero_grad()
            soft.grad = grad.to(soft)  # the projection's gradient, applied to the soft prompt
            opt.step()
            ids, hard = project(lm, soft.detach())  # what the step leaves is what is scored
            keeper.after(step, loss, hard, text=lm.decode(ids.tolist()))
    emb = keeper.prompt.cpu()
    ids = project(lm, emb)[0]
    meta = {"task": task.name, "labels": task.labels, "template": task.template,
            "method": "pez", "config": asdict(config), **keeper.meta(), "ids": ids.tolist(),
            "text": lm.decode(ids.tolist())}
    return SoftPrompt(emb, meta)
