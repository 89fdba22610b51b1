"""POST: private soft-prompt transfer (Wang et al., "Efficient and Privacy-Preserving Soft
Prompt Transfer for LLMs", ICML 2025; reference code sprintml/POST).

1. **Distil** (the provider): a small model cut from the large one (its embeddings, final norm,
   unembedding and a few of its blocks, :func:`~engramlab.models.student.keep_layers`) is
   trained on public text to match it: ``alpha_ce`` · T² · KL(teacher_T ‖ student_T) +
   ``alpha_clm`` · next-token cross-entropy, T = 2 (the reference's DistilGPT-2 losses).
2. **Tune** (the user, on private data): a soft prompt on the small model
   (:func:`~.soft.tune`), optionally with DP-SGD (:class:`~.soft.DPConfig`).
3. **Transfer** (the user, with public data and the large model): a prompt for the large model
   is trained so that it behaves on public texts as the small prompt makes the small model
   behave. At the answer position, with logits z and temperature T:

       α · T² · KL(softmax((z_s,prompt − z_s)/T) ‖ softmax((z_l,prompt − z_l)/T))
       + (1 − α) · T² · KL(softmax(z_s,prompt/T) ‖ softmax(z_l,prompt/T))

   the first term matches the *shift* the prompt causes, the second the prompted outputs (the
   reference's ``mix_transfer``, α = 0.5, T = 2). No private example is used. The prompt
   starts from random tokens' embeddings, or (``init="source"``, the reference's
   ``--init_with_source``) from the small prompt itself, which a distilled student's shared
   embedding space makes meaningful.

The transfer keeps the prompt of its best validation accuracy, except when the small prompt
was tuned with DP-SGD: then the last one, as :func:`~.soft.tune` does, since choosing by a score
on private data would spend privacy that the stated ε does not count.

Deviations from the reference code: the student keeps evenly spaced blocks of the teacher
(first and last included) rather than a fixed slice; distillation runs for a fixed number of
steps on the bundled public text rather than epochs over OpenWebText; the transfer keeps the
prompt of the best accuracy on the user's own validation split (the reference's selection reads
the private test set); the unprompted logits and the small model's outputs are computed once
per public text, since neither depends on the prompt being trained.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data.corpus import TextCorpus
from ..errors import InputError
from ..models.lm import LM
from ..models.student import keep_layers
from .soft import Keeper, SoftPrompt, batches, initial_prompt, last_logits
from .tasks import LabelTask


def spaced_layers(n_layers: int, keep: int) -> list[int]:
    """``keep`` block indices spread evenly over ``n_layers``, the first and last included."""
    if not 1 <= keep <= n_layers:
        raise InputError(f"a student keeps 1 to {n_layers} blocks, not {keep}")
    if keep == 1:
        return [n_layers - 1]
    return sorted({round(i * (n_layers - 1) / (keep - 1)) for i in range(keep)})


@dataclass
class DistilConfig:
    keep: int = 6  # blocks the student keeps
    steps: int = 200
    lr: float = 2e-4
    batch_size: int = 8
    seq_len: int = 128
    temperature: float = 2.0
    alpha_ce: float = 0.5
    alpha_clm: float = 0.5
    seed: int = 0

    def check(self, n_layers: int) -> None:
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1")
        if not 1 <= self.keep < n_layers:
            raise InputError(f"--keep {self.keep}: a student keeps fewer blocks than the "
                             f"model's {n_layers}")


def distil(teacher: LM, corpus: TextCorpus, config: DistilConfig | None = None, *,
           on_step: Callable[[dict[str, Any]], None] | None = None) -> LM:
    """A student of ``config.keep`` of the teacher's blocks, distilled on ``corpus``."""
    config = config or DistilConfig()
    config.check(teacher.n_layers)
    student = keep_layers(teacher, spaced_layers(teacher.n_layers, config.keep))
    rows = corpus.token_rows(teacher, seq_len=config.seq_len,
                             max_tokens=config.steps * config.batch_size * config.seq_len)
    if len(rows) == 0:
        raise InputError("the distillation corpus holds no full row of text")
    order = list(range(len(rows)))
    rng = random.Random(config.seed)
    params = [p for p in student.model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=config.lr)
    t = config.temperature
    student.model.train()
    try:
        for step in range(1, config.steps + 1):
            if len(order) < config.batch_size:
                order = list(range(len(rows)))
            rng.shuffle(order)
            ids = rows[order[:config.batch_size]].to(teacher.device)
            del order[:config.batch_size]
            with torch.no_grad():
                target = teacher.model(input_ids=ids).logits.float()
            logits = student.model(input_ids=ids).logits.float()
            kd = F.kl_div(F.log_softmax(logits / t, -1).flatten(0, 1),
                          F.log_softmax(target / t, -1).flatten(0, 1),
                          log_target=True, reduction="batchmean") * t * t
            clm = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            loss = config.alpha_ce * kd + config.alpha_clm * clm
            opt.zero_grad()
            loss.backward()
            opt.step()
            if on_step:
                on_step({"step": step, "loss": float(loss.detach()), "kd": float(kd.detach()),
                         "clm": float(clm.detach())})
    finally:
        student.model.eval()
        for p in params:
            p.requires_grad_(False)
    return student


def save_student(student: LM, folder: str | Path, meta: dict[str, Any]) -> None:
    """A normal Hugging Face model folder (config, safetensors weights, tokenizer) with
    ``meta`` in ``engramlab.json``, replacing what ``folder`` held."""
    student.save(folder, overwrite=True,
                 extra={"engramlab.json": json.dumps(meta, indent=1, default=str) + "\n"})


def public_texts(corpus: TextCorpus, n: int, *, seed: int = 0, max_words: int = 24) -> list[str]:
    """``n`` sentences of public text (the first ``max_words`` words of each), in a seeded
    order: the transfer's inputs, shown in the task's template."""
    sentences = []
    for doc in corpus.documents:
        for sent in re.split(r"(?<=[.!?])\s+", doc):
            words = sent.split()
            if len(words) >= 6:
                sentences.append(" ".join(words[:max_words]))
    random.Random(seed).shuffle(sentences)
    if not sentences:
        raise InputError("the public text holds no sentence of six words or more")
    return sentences[:n]


def transfer_loss(small_prompted: torch.Tensor, small_plain: torch.Tensor,
                  large_prompted: torch.Tensor, large_plain: torch.Tensor, *,
                  alpha: float = 0.5, temperature: float = 2.0) -> torch.Tensor:
    """POST's transfer loss on ``[n, vocab]`` logits at the answer position (module docstring):
    zero exactly when the large model's prompted outputs equal the small model's."""
    t = temperature

    def kl(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(target / t, -1), F.log_softmax(source / t, -1),
                        log_target=True, reduction="batchmean") * t * t

    shift = kl(small_prompted - small_plain, large_prompted - large_plain)
    output = kl(small_prompted, large_prompted)
    return alpha * shift + (1 - alpha) * output


@dataclass
class TransferConfig:
    steps: int = 150
    lr: float = 0.003
    batch_size: int = 16
    eval_every: int = 25
    alpha: float = 0.5
    temperature: float = 2.0
    public: int = 512  # public texts
    seed: int = 0
    tokens: int | None = None  # default: the small prompt's length
    init: str = "random"  # or "source": start from the small prompt

    def check(self) -> None:
        if self.init not in ("random", "source"):
            raise InputError(f"the transfer starts from 'random' or 'source', not {self.init!r}")


@torch.no_grad()
def _outputs(lm: LM, prompt: torch.Tensor | None, texts: Sequence[str], batch: int = 32
             ) -> torch.Tensor:
    return torch.cat([last_logits(lm, prompt, texts[s:s + batch]).cpu()
                      for s in range(0, len(texts), batch)])


@torch.no_grad()
def _fixed_outputs(small: LM, large: LM, source: SoftPrompt, texts: Sequence[str]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the transfer loss compares against and does not train: the small model's outputs
    with and without ``source``, and the large model's without a prompt."""
    return (_outputs(small, source.embeddings.to(small.device), texts),
            _outputs(small, None, texts), _outputs(large, None, texts))


@torch.no_grad()
def transfer_objective(small: LM, large: LM, source: SoftPrompt,
                       candidates: dict[str, torch.Tensor], task: LabelTask,
                       public: Sequence[str], config: TransferConfig | None = None
                       ) -> dict[str, float]:
    """The transfer loss of each of ``candidates`` (large-model prompts) against ``source``
    on the small model, over all of ``public`` in the task's template: what :func:`transfer`
    minimises. Comparing it for the transferred prompt and for a prompt tuned directly on
    the large model tells whether the objective itself prefers the better prompt."""
    config = config or TransferConfig()
    texts = [task.template.format(t) for t in public]
    small_prompted, small_plain, large_plain = _fixed_outputs(small, large, source, texts)
    return {name: float(transfer_loss(small_prompted, small_plain,
                                      _outputs(large, prompt.to(large.device), texts),
                                      large_plain, alpha=config.alpha,
                                      temperature=config.temperature))
            for name, prompt in candidates.items()}


def transfer(small: LM, large: LM, prompt: SoftPrompt, task: LabelTask, public: Sequence[str],
             config: TransferConfig | None = None, *,
             on_step: Callable[[dict[str, Any]], None] | None = None) -> SoftPrompt:
    """A prompt for ``large`` that moves it on ``public`` texts (in the task's template) as
    ``prompt`` moves ``small``; the step with the best validation accuracy is kept (the last,
    for a prompt tuned with DP-SGD)."""
    config = config or TransferConfig()
    config.check()
    if small.tokenizer.get_vocab() != large.tokenizer.get_vocab():
        raise InputError("the small and the large model have different vocabularies; POST "
                         "transfers between a model and one distilled from it")
    if config.init == "source" and (prompt.embeddings.shape[1] != large.d_model
                                    or config.tokens not in (None, prompt.length)):
        raise InputError("a transfer can start from the small prompt only when the two models "
                         "have the same width and the prompt keeps its length")
    texts = [task.template.format(t) for t in public]
    small_prompted, small_plain, large_plain = _fixed_outputs(small, large, prompt, texts)
    start = (prompt.embeddings.float().clone() if config.init == "source"
             else initial_prompt(large, config.tokens or prompt.length, config.seed))
    target = start.to(large.device).requires_grad_(True)
    opt = torch.optim.Adam([target], lr=config.lr)
    private = prompt.meta.get("dp") is not None
    keeper = Keeper(large, task, config.steps, config.eval_every, on_step, keep_last=private)
    draw = batches(len(texts), config.batch_size, config.seed)
    with large.frozen_weights():
        for step in range(1, config.steps + 1):
            idx = next(draw)
            prompted = last_logits(large, target, [texts[i] for i in idx])
            loss = transfer_loss(small_prompted[idx].to(prompted), small_plain[idx].to(prompted),
                                 prompted, large_plain[idx].to(prompted), alpha=config.alpha,
                                 temperature=config.temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
            keeper.after(step, loss, target.detach())
    meta = {**{k: v for k, v in prompt.meta.items() if k in ("task", "labels", "template")},
            "transferred_from": prompt.meta.get("model"), "transfer": asdict(config),
            **keeper.meta(), "source_dp": prompt.meta.get("dp"),
            "selection": "last step (DP source)" if private else "best validation accuracy"}
    return SoftPrompt(keeper.prompt.cpu(), meta)
