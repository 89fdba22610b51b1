"""Batched scoring of targets after prompts: the primitive every editing metric is built on.

For each (prompt, target) pair the target's tokens are appended to the prompt's tokens (the
target tokenised as it continues the prompt) and one teacher-forced forward scores them all:
the mean token log-probability (CounterFact's multi-token rule, ROME §B.1) and, per token,
whether it is the arg-max (the token-level accuracy of zsRE and EasyEdit). Many pairs share one
forward; logits are only computed at the target positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..batching import make_batch, target_ids
from ..models.lm import LM
from ..trace import Trace, run_model


@dataclass(frozen=True)
class TargetScore:
    logprob: float  # mean token log-probability of the target
    correct: tuple[bool, ...]  # per target token: is it the teacher-forced arg-max?

    @property
    def prob(self) -> float:
        return float(torch.tensor(self.logprob).exp())

    @property
    def token_accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)


@torch.no_grad()
def score_targets(lm: LM, prompts: Sequence[str], targets: Sequence[str], *,
                  batch_size: int = 64, progress: bool = False) -> list[TargetScore]:
    """Score ``targets[i]`` after ``prompts[i]`` for every i.

    Rows that are the same tokens (one prompt with several one-token targets, as CounterFact's
    true and new objects often are) run one forward and are read off it together."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    rows, labels = [], []
    cache: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    for prompt, target in zip(prompts, targets, strict=True):
        if (prompt, target) not in cache:
            head = list(lm.tokenizer(prompt, add_special_tokens=True)["input_ids"])
            cache[(prompt, target)] = (head, target_ids(lm, prompt, target))
        head, tids = cache[(prompt, target)]
        rows.append(head + tids[:-1])
        labels.append([(len(head) - 1 + j, t) for j, t in enumerate(tids)])
    readers: dict[tuple[int, ...], list[int]] = {}  # a distinct row -> the scores it serves
    for i, row in enumerate(rows):
        readers.setdefault(tuple(row), []).append(i)
    # longest first: similar lengths share a batch, less padding
    order = sorted(readers, key=lambda r: -len(r))
    out: list[TargetScore | None] = [None] * len(rows)
    last = f"resid.{lm.n_layers - 1}"
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(order), batch_size), desc="scoring", unit="batch",
                      disable=not progress, leave=False):
        part = order[start:start + batch_size]
        batch = make_batch(lm, [list(r) for r in part], list(range(len(part))),
                           [[0]] * len(part))
        with Trace(lm).capture(last) as tr:
            run_model(lm, batch.input_ids, batch.attention_mask)
        flat = [(r, p, t) for r, row in enumerate(part) for i in readers[row]
                for p, t in labels[i]]
        rr = torch.tensor([f[0] for f in flat], device=lm.device)
        pp = torch.tensor([f[1] for f in flat], device=lm.device)
        tt = torch.tensor([f[2] for f in flat], device=lm.device)
        logp = F.log_softmax(lm.logits_from_hidden(tr[last][rr, pp]).float(), -1)
        tok_lp = logp.gather(1, tt[:, None]).squeeze(1).cpu()
        hit = (logp.argmax(-1) == tt).cpu()
        k = 0
        for row in part:
            for i in readers[row]:
                n = len(labels[i])
                out[i] = TargetScore(float(tok_lp[k:k + n].mean()),
                                     tuple(bool(x) for x in hit[k:k + n]))
                k += n
    return out  # type: ignore[return-value]
