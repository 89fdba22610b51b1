"""Soft prompts (Lester et al., "The Power of Scale for Parameter-Efficient Prompt Tuning",
EMNLP 2021): P trainable vectors in the input-embedding space placed before every input, the
model's weights left as they are.

A task row is shown as ``[soft prompt] + template(text)`` and answered by the label whose token
(the first token of ``" " + label``) the model ranks highest at the last position, among the
task's labels only; zero-shot accuracy is the same readout without a prompt. Tuning minimises
the cross-entropy of the right label over the label tokens with Adam, and keeps the prompt of
the step with the best validation accuracy; the test split is scored once, at the end.

A prompt is saved as a PEFT prompt-tuning adapter folder (``adapter_config.json`` with
``peft_type: PROMPT_TUNING`` and ``adapter_model.safetensors`` holding ``prompt_embeddings``),
which ``peft.PeftModel.from_pretrained`` loads as it is; ``engramlab.json`` beside them records
the model's signature, the task and its template.

Deviations from the paper: the prompt starts from the embeddings of randomly drawn vocabulary
tokens (the paper samples from the 5,000 most common tokens or uses the class labels' embeddings);
the loss is restricted to the label tokens (the paper trains the full-vocabulary loss of the
label text), which is what the accuracy reads; the paper's T5 models and Adafactor are replaced
by any causal LM here and Adam.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..models.lm import LM
from .tasks import LabelRow, LabelTask

META = "engramlab.json"

# (model, what is trained or None, texts, label tokens) -> [len(texts), len(labels)] logits,
# differentiable in what is trained: how a kind of prompt is read
Reader = Callable[[LM, "torch.Tensor | None", Sequence[str], Sequence[int]], torch.Tensor]


def label_ids(lm: LM, labels: Sequence[str]) -> list[int]:
    """Each label's token: the first token of ``" " + label``; labels that share it, or that
    give no token, cannot be told apart and are refused."""
    ids = []
    for label in labels:
        enc = lm.encode(" " + label)
        if not enc:
            raise InputError(f"label {label!r} gives no token in {lm.label}'s vocabulary")
        ids.append(enc[0])
    seen: dict[int, str] = {}
    for label, t in zip(labels, ids, strict=True):
        if t in seen:
            raise InputError(f"labels {seen[t]!r} and {label!r} start with the same token "
                             f"({lm.decode(t)!r}) in {lm.label}'s vocabulary; rename one so "
                             "their first tokens differ")
        seen[t] = label
    return ids


Kind = TypeVar("Kind", bound="LearnedPrompt")


class LearnedPrompt:
    """What a soft prompt and a prefix share: P trained rows (:attr:`values`) put before every
    input, kept in a PEFT adapter folder of their ``peft_type``, and refused by a model they
    were not made for. A kind says how wide its rows are for a model (:meth:`width`), how PEFT
    describes it (:meth:`peft_config`) and how the model reads it (:meth:`read`)."""

    peft_type: ClassVar[str]
    kind: ClassVar[str]  # what it is called in messages
    peft_name: ClassVar[str]  # PEFT's name for it
    remedy: ClassVar[str]  # what to do instead, with {model}
    meta: dict[str, Any]
    folder: Path | None

    @property
    def values(self) -> torch.Tensor:
        """What is trained, ``[P, width]``, as :data:`Reader` takes it."""
        raise NotImplementedError

    @property
    def length(self) -> int:
        return int(self.values.shape[0])

    @staticmethod
    def width(lm: LM) -> int:
        raise NotImplementedError

    def peft_config(self, lm: LM) -> Any:
        raise NotImplementedError

    def save(self, folder: str | os.PathLike[str], lm: LM) -> Path:
        """The PEFT adapter folder (written whole or not at all)."""
        return write_prompt_folder(folder, lm, self.peft_config(lm), self.values, self.meta)

    @classmethod
    def load(cls: type[Kind], folder: str | os.PathLike[str], lm: LM | None = None) -> Kind:
        """A saved adapter of this kind; with ``lm``, refused unless it was made for it."""
        return cls.from_folder(Path(folder), *read_prompt_folder(Path(folder)), lm)

    @classmethod
    def from_folder(cls: type[Kind], folder: Path, config: dict[str, Any],
                    tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                    lm: LM | None = None) -> Kind:
        """:meth:`load` of a folder already read (:func:`read_prompt_folder`)."""
        if config.get("peft_type") != cls.peft_type or "prompt_embeddings" not in tensors:
            raise InputError(f"{folder} is a {config.get('peft_type', 'unknown')} adapter, not "
                             f"a {cls.kind} ({cls.peft_name})")
        made = cls(tensors["prompt_embeddings"].float(), meta, folder)  # type: ignore[call-arg]
        if lm is not None:
            made.check(lm)
        return made

    def check(self, lm: LM) -> None:
        """Refuse rows made for another model than ``lm``."""
        made = self.meta.get("signature")
        width = int(self.values.shape[1])
        if width != self.width(lm) or (made is not None and made != lm.signature()):
            where = self.folder or f"this {self.kind}"
            raise InputError(f"{where} was made for another model "
                             f"({self.meta.get('model', f'width {width}')}); "
                             + self.remedy.format(model=lm.label))


@dataclass
class SoftPrompt(LearnedPrompt):
    """``embeddings``: ``[P, d_model]``, the vectors put before every input."""

    peft_type: ClassVar[str] = "PROMPT_TUNING"
    kind: ClassVar[str] = "soft prompt"
    peft_name: ClassVar[str] = "PEFT prompt tuning"
    remedy: ClassVar[str] = "tune a prompt for {model}, or transfer this one"
    embeddings: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None  # where it was loaded from

    @property
    def values(self) -> torch.Tensor:
        return self.embeddings

    @staticmethod
    def width(lm: LM) -> int:
        return lm.d_model

    @staticmethod
    def read(lm: LM, values: torch.Tensor | None, texts: Sequence[str],
             labels: Sequence[int]) -> torch.Tensor:
        return label_logits(lm, values, texts, labels)

    def peft_config(self, lm: LM) -> Any:
        from peft import PromptTuningConfig, TaskType

        return PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=self.length,
            token_dim=lm.d_model, num_layers=lm.n_layers,
            num_attention_heads=int(getattr(lm.config, "num_attention_heads", 0)
                                    or getattr(lm.config, "n_head", 0)) or None,
            base_model_name_or_path=lm.label)


def write_prompt_folder(folder: str | os.PathLike[str], lm: LM, config: Any,
                        values: torch.Tensor, meta: dict[str, Any]) -> Path:
    """A PEFT prompt-learning adapter folder (``config``, ``values`` as ``prompt_embeddings``)
    with ``engramlab.json`` (``meta``, the model and its signature), whole or not at all."""
    from safetensors.torch import save_file

    from .._io import atomic_dir
    from ..adapt.adapters import WEIGHTS

    with atomic_dir(Path(folder)) as tmp:
        config.save_pretrained(str(tmp))
        save_file({"prompt_embeddings": values.detach().float().cpu().contiguous()},
                  str(tmp / WEIGHTS))
        meta = {**meta, "model": lm.label, "signature": lm.signature(),
                "tokens": int(values.shape[0])}
        (tmp / META).write_text(json.dumps(meta, indent=1, default=str) + "\n")
    return Path(folder)


def read_prompt_folder(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor],
                                              dict[str, Any]]:
    """A saved prompt folder's PEFT config, tensors and ``engramlab.json``, or a one-line
    error naming the folder."""
    from ..adapt.adapters import read_adapter_folder

    config, tensors = read_adapter_folder(folder, "soft prompt or prefix",
                                          ", as `engram prompt tune --out` writes")
    try:
        meta = json.loads((folder / META).read_text()) if (folder / META).is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise InputError(f"{folder} holds an unreadable prompt ({e})") from None
    return config, tensors, meta


def _batch(lm: LM, prompt: torch.Tensor | None, texts: Sequence[str]
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input embeddings ``[prompt; text]`` and their mask.
    ``prompt`` is ``[P, d]`` (shared) or ``[len(texts), P, d]`` (a copy per row, whose
    gradients are then the rows' own: DP-SGD's per-example gradients in one backward)."""
    emb = lm.model.get_input_embeddings()
    ids = [lm.tokenizer(t)["input_ids"] for t in texts]
    p = 0 if prompt is None else prompt.shape[-2]
    width = p + max(len(x) for x in ids)
    dtype = emb.weight.dtype
    mask = torch.zeros(len(ids), width, dtype=torch.long, device=lm.device)
    flat = emb(torch.tensor([t for row in ids for t in row], device=lm.device))
    start = 0
    rows = []
    for i, row in enumerate(ids):
        piece = flat[start:start + len(row)]
        start += len(row)
        own = None if prompt is None else prompt[i] if prompt.dim() == 3 else prompt
        rows.append(piece if own is None else torch.cat([own.to(dtype), piece]))
        mask[i, :p + len(row)] = 1
    x = torch.stack([F.pad(r, (0, 0, 0, width - r.shape[0])) for r in rows])
    return x, mask


def last_logits(lm: LM, prompt: torch.Tensor | None, texts: Sequence[str],
                labels: Sequence[int] | None = None) -> torch.Tensor:
    """The logits after each text's last token (with the soft prompt before it, when given):
    ``[len(texts), len(labels)]`` for the label tokens, or the whole vocabulary without
    ``labels``; differentiable in ``prompt``. Only the last positions are unembedded."""
    x, mask = _batch(lm, prompt, texts)
    return lm.logits_from_hidden(lm.last_hidden(mask, inputs_embeds=x), labels).float()


def label_logits(lm: LM, prompt: torch.Tensor | None, texts: Sequence[str],
                 labels: Sequence[int]) -> torch.Tensor:
    """``[len(texts), len(labels)]``: the logits of the label tokens after each text."""
    return last_logits(lm, prompt, texts, labels)


@torch.no_grad()
def accuracy(lm: LM, prompt: Any, task: LabelTask, rows: Sequence[LabelRow], *,
             batch_size: int = 32, read: Reader | None = None) -> float:
    """Share of ``rows`` whose label is ranked first among the task's labels. ``prompt``: a
    saved kind (:class:`SoftPrompt`, :class:`~.prefix.Prefix`: read its own way), None (no
    prompt), or a tensor read by ``read`` (default: as a soft prompt)."""
    if not rows:
        raise InputError("no rows to score")
    ids = label_ids(lm, task.labels)
    index = {label: i for i, label in enumerate(task.labels)}
    if prompt is not None and not isinstance(prompt, torch.Tensor):
        values, read = prompt.values.to(lm.device), prompt.read
    else:
        values = prompt
    read = read or label_logits
    right = 0
    for s in range(0, len(rows), batch_size):
        part = rows[s:s + batch_size]
        logits = read(lm, values, [task.template.format(r.text) for r in part], ids)
        want = torch.tensor([index[r.label] for r in part], device=logits.device)
        right += int((logits.argmax(-1) == want).sum())
    return right / len(rows)


# RDP orders: Opacus's default grid to 63, then sparser up to 511, since large ε are tightest
# at high orders. Each integer order is a sum of that many terms at every step of the search
# for σ, so every order to 511 makes the search 7-15x slower for the same σ (docs/prompt.md).
RDP_ORDERS = ([1 + x / 10 for x in range(1, 100)] + list(range(11, 64))
              + [64, 72, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 511])


@dataclass
class DPConfig:
    """DP-SGD on the prompt (Abadi et al., "Deep Learning with Differential Privacy", 2016):
    every example's gradient is clipped to ``clip`` in L2 norm and Gaussian noise of standard
    deviation σ·``clip`` is added to their sum, σ the smallest that keeps the whole run
    (ε, δ)-private by Opacus's RDP accountant at sampling rate batch / training rows.
    ``delta`` defaults to the smaller of 1e-5 and 1 / training rows."""

    epsilon: float
    delta: float | None = None
    clip: float = 1.0

    def check(self) -> None:
        if not self.epsilon > 0 or not math.isfinite(self.epsilon):
            raise InputError(f"--dp-epsilon must be a finite number above 0, got {self.epsilon}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise InputError(f"--dp-delta must lie in (0, 1), got {self.delta}")
        if not self.clip > 0:
            raise InputError(f"the clipping norm must be above 0, got {self.clip}")

    def noise(self, n_rows: int, batch_size: int, steps: int) -> tuple[float, float]:
        """(σ, δ) for ``steps`` steps of ``batch_size`` rows drawn from ``n_rows``."""
        from opacus.accountants.utils import get_noise_multiplier

        delta = self.delta if self.delta is not None else min(1e-5, 1.0 / n_rows)
        sigma = get_noise_multiplier(target_epsilon=self.epsilon, target_delta=delta,
                                     sample_rate=min(1.0, batch_size / n_rows), steps=steps,
                                     accountant="rdp", alphas=RDP_ORDERS)
        return float(sigma), delta


@dataclass
class TuneConfig:
    tokens: int = 20
    steps: int = 150
    lr: float = 0.003
    batch_size: int = 16
    eval_every: int = 25
    seed: int = 0

    def check(self) -> None:
        for name in ("tokens", "steps", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1, got "
                                 f"{getattr(self, name)}")
        if not self.lr > 0:
            raise InputError(f"--lr must be positive, got {self.lr}")


def label_loss(lm: LM, task: LabelTask, prompt: torch.Tensor, rows: Sequence[LabelRow], *,
               read: Reader | None = None) -> torch.Tensor:
    """Cross-entropy of each row's label among the task's labels, averaged over ``rows``
    (``prompt`` read by ``read``, default as a soft prompt)."""
    index = {label: i for i, label in enumerate(task.labels)}
    logits = (read or label_logits)(lm, prompt, [task.template.format(r.text) for r in rows],
                                    label_ids(lm, task.labels))
    want = torch.tensor([index[r.label] for r in rows], device=logits.device)
    return F.cross_entropy(logits, want)


def batches(n: int, size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of ``size`` indices into ``n`` rows: seeded shuffles, one after another."""
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        while len(order) < size:
            fresh = list(range(n))
            rng.shuffle(fresh)
            order += fresh
        yield order[:size]
        del order[:size]


class Keeper:
    """What every prompt-training loop does after its step: refuse a loss that is no longer
    finite, report progress, score the prompt on the validation split every ``eval_every``
    steps (and at the last) and keep the best one (the last one with ``keep_last``)."""

    def __init__(self, lm: LM, task: LabelTask, steps: int, eval_every: int,
                 on_step: Callable[[dict[str, Any]], None] | None = None, *,
                 keep_last: bool = False, read: Reader | None = None) -> None:
        self.lm, self.task, self.steps, self.eval_every = lm, task, steps, eval_every
        self.on_step, self.keep_last, self.read = on_step, keep_last, read
        self.best: tuple[float, torch.Tensor | None, int] = (-1.0, None, 0)
        self.history: list[dict[str, Any]] = []

    def after(self, step: int, loss: torch.Tensor, prompt: torch.Tensor,
              **extra: Any) -> None:
        value = float(loss.detach())
        if not math.isfinite(value):
            raise InputError(f"the loss became {value} at step {step}; lower --lr")
        if self.on_step:
            self.on_step({"step": step, "loss": value})
        if step % self.eval_every == 0 or step == self.steps:
            val = accuracy(self.lm, prompt, self.task, self.task.val, read=self.read)
            self.history.append({"step": step, "loss": value, "val_accuracy": val, **extra})
            if self.on_step:
                self.on_step({"step": step, "val_accuracy": val})
            if val > self.best[0] or self.keep_last:
                self.best = (val, prompt.detach().clone(), step)

    def meta(self) -> dict[str, Any]:
        return {"val_accuracy": self.best[0], "chosen_step": self.best[2],
                "history": self.history}

    @property
    def prompt(self) -> torch.Tensor:
        assert self.best[1] is not None, "no evaluation yet"
        return self.best[1]


def initial_prompt(lm: LM, tokens: int, seed: int) -> torch.Tensor:
    """The embeddings of ``tokens`` vocabulary tokens drawn at random (seeded)."""
    emb = lm.model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(emb.shape[0], (tokens,), generator=g)
    return emb[pick.to(emb.device)].detach().float().clone()


def tune(lm: LM, task: LabelTask, config: TuneConfig | None = None, *,
         dp: DPConfig | None = None,
         on_step: Callable[[dict[str, Any]], None] | None = None,
         loss_fn: Callable[[torch.Tensor, Sequence[LabelRow]], torch.Tensor] | None = None
         ) -> SoftPrompt:
    """A soft prompt for ``task``: Adam on the label cross-entropy over ``task.train``, the
    prompt of the best validation accuracy kept (with ``dp``: DP-SGD, and the last prompt,
    since choosing among steps by a score on private data would spend privacy the stated ε
    does not count). ``on_step`` receives ``{"step", "loss"}`` each step and ``{"step",
    "val_accuracy"}`` at each evaluation. ``loss_fn(prompt, rows)`` replaces the loss (the
    interpretable variants build on this loop)."""
    config = config or TuneConfig()
    config.check()
    sigma = delta = None
    if dp is not None:
        dp.check()
        if loss_fn is not None:
            raise ValueError("DP-SGD tuning uses the label loss; no loss_fn with dp")
        sigma, delta = dp.noise(len(task.train), config.batch_size, config.steps)
    noise = torch.Generator().manual_seed(config.seed + 1)
    prompt = initial_prompt(lm, config.tokens, config.seed).requires_grad_(True)
    opt = torch.optim.Adam([prompt], lr=config.lr)
    keeper = Keeper(lm, task, config.steps, config.eval_every, on_step, keep_last=dp is not None)

    def loss_of(p: torch.Tensor, rows: Sequence[LabelRow]) -> torch.Tensor:
        return loss_fn(p, rows) if loss_fn is not None else label_loss(lm, task, p, rows)

    draw = batches(len(task.train), config.batch_size, config.seed)
    with lm.frozen_weights():
        for step in range(1, config.steps + 1):
            rows = [task.train[i] for i in next(draw)]
            opt.zero_grad()
            if dp is None:
                loss = loss_of(prompt, rows)
                loss.backward()
            else:
                loss = private_gradient(prompt, rows, loss_of, dp.clip, sigma, noise)
            opt.step()
            keeper.after(step, loss, prompt.detach())
    meta = {"task": task.name, "labels": task.labels, "template": task.template,
            "config": asdict(config), **keeper.meta(),
            "dp": None if dp is None else {**asdict(dp), "delta": delta, "noise_multiplier": sigma,
                                           "accountant": "rdp (opacus)"}}
    return SoftPrompt(keeper.prompt.cpu(), meta)


def private_gradient(prompt: torch.Tensor, rows: Sequence[LabelRow],
                     loss_of: Callable[[torch.Tensor, Sequence[LabelRow]], torch.Tensor],
                     clip: float, sigma: float | None, noise: torch.Generator) -> torch.Tensor:
    """Set ``prompt.grad`` to the DP-SGD gradient of the batch and return its mean loss. Each
    row reads its own copy of the prompt, so one backward of the summed loss gives every row's
    gradient exactly (rows never interact)."""
    copies = prompt.detach().expand(len(rows), *prompt.shape).clone().requires_grad_(True)
    loss = loss_of(copies, rows)
    (grads,) = torch.autograd.grad(loss * len(rows), copies)
    norms = grads.flatten(1).norm(dim=1)
    clipped = grads * (clip / norms.clamp_min(1e-12)).clamp(max=1.0)[:, None, None]
    total = clipped.sum(0)
    if sigma:
        total = total + sigma * clip * torch.randn(total.shape, generator=noise).to(total)
    prompt.grad = total / len(rows)
    return loss.detach()
