"""Prefix tuning (Li & Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation",
ACL 2021): P trainable key/value pairs in front of the input in **every** block's attention,
the model's weights left as they are. A soft prompt (:mod:`.soft`) only sets the first block's
input and lets the model compute the rest; a prefix sets what each block reads.

The prefix takes the first P positions, so a row's tokens start at position P (as PEFT runs
it). It is read and trained exactly as a soft prompt: the label whose token the model ranks
highest after the text, Adam on the label cross-entropy, the best validation step kept; with
DP-SGD each row reads its own copy of the prefix (one backward gives every row's gradient).

A prefix is saved as a PEFT prefix-tuning adapter folder (``peft_type: PREFIX_TUNING``,
``prompt_embeddings`` ``[P, 2 · blocks · kv_heads · head_dim]``: per position, block 0's key,
block 0's value, block 1's key, …, each heads × head width, which is PEFT's layout), which
``peft.PeftModel.from_pretrained`` loads as it is; ``engramlab.json`` beside it records the
model's signature, the task and its template.

Deviations from the paper: by default the prefix is trained directly, starting from the keys
and values of randomly drawn vocabulary tokens (the paper's §7.2 finds initialising from real
words' activations helps, notably with little data); the paper's reparameterisation through
an MLP (``reparam``: its hidden width, as PEFT's ``prefix_projection``; the paper uses 512 or
800) is available, starts from PEFT's random initialisation, and is saved as the prefix it
produces (not the MLP). The loss is restricted to the label tokens (the paper trains text
generation); the paper's GPT-2 / BART are replaced by any causal LM here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import InputError
from ..models.kv import cache_from, cache_layers, kv_geometry, last_hidden_after, prefill
from ..models.lm import LM
from .soft import (
    DPConfig,
    Keeper,
    LearnedPrompt,
    SoftPrompt,
    TuneConfig,
    batches,
    label_logits,
    label_loss,
    private_gradient,
    read_prompt_folder,
)
from .tasks import LabelTask


def split_blocks(lm: LM, states: torch.Tensor, batch: int) -> list[tuple[torch.Tensor,
                                                                        torch.Tensor]]:
    """Each block's (keys, values) ``[batch, kv_heads, P, head_dim]`` of a prefix in PEFT's
    layout, ``[P, width]`` (shared by every row) or ``[batch, P, width]`` (a copy per row)."""
    heads, dim = kv_geometry(lm)
    x = states if states.dim() == 3 else states[None].expand(batch, *states.shape)
    b, p, _ = x.shape
    x = x.reshape(b, p, 2 * lm.n_layers, heads, dim).permute(2, 0, 3, 1, 4)
    return [(x[2 * i], x[2 * i + 1]) for i in range(lm.n_layers)]


def join_blocks(layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The inverse of :func:`split_blocks` for one row: ``[P, width]`` in PEFT's layout."""
    parts = [t[0] for kv in layers for t in kv]  # [kv_heads, P, head_dim] each
    x = torch.stack(parts)  # [2 · blocks, kv_heads, P, head_dim]
    return x.permute(2, 0, 1, 3).reshape(x.shape[2], -1)


def prefix_logits(lm: LM, states: torch.Tensor | None, texts: Sequence[str],
                  labels: Sequence[int]) -> torch.Tensor:
    """``[len(texts), len(labels)]``: the label tokens' logits after each text, every block
    attending to the prefix first; differentiable in ``states``. Without a prefix (None or
    zero positions), the model's own."""
    if states is None or states.shape[-2] == 0:
        return label_logits(lm, None, texts, labels)
    enc = lm.tokenize(texts)
    dtype = lm.model.get_input_embeddings().weight.dtype
    cache = cache_from(lm, split_blocks(lm, states.to(lm.device, dtype), len(texts)))
    hidden = last_hidden_after(lm, cache, enc["attention_mask"], input_ids=enc["input_ids"])
    return lm.logits_from_hidden(hidden, labels).float()


@dataclass
class Prefix(LearnedPrompt):
    """``states``: ``[P, 2 · blocks · kv_heads · head_dim]`` in PEFT's layout."""

    peft_type: ClassVar[str] = "PREFIX_TUNING"
    kind: ClassVar[str] = "prefix"
    peft_name: ClassVar[str] = "PEFT prefix tuning"
    remedy: ClassVar[str] = "tune a prefix for {model}"
    states: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None

    @property
    def values(self) -> torch.Tensor:
        return self.states

    @staticmethod
    def width(lm: LM) -> int:
        heads, dim = kv_geometry(lm)
        return 2 * lm.n_layers * heads * dim

    @staticmethod
    def read(lm: LM, values: torch.Tensor | None, texts: Sequence[str],
             labels: Sequence[int]) -> torch.Tensor:
        return prefix_logits(lm, values, texts, labels)

    def peft_config(self, lm: LM) -> Any:
        from peft import PrefixTuningConfig, TaskType

        heads, dim = kv_geometry(lm)
        return PrefixTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=self.length,
            token_dim=heads * dim, num_layers=lm.n_layers, num_attention_heads=heads,
            prefix_projection=False, base_model_name_or_path=lm.label)


def load_prompt(folder: str | os.PathLike[str], lm: LM | None = None) -> SoftPrompt | Prefix:
    """A saved soft prompt or prefix, whichever the folder holds."""
    read = read_prompt_folder(Path(folder))
    kind = Prefix if read[0].get("peft_type") == "PREFIX_TUNING" else SoftPrompt
    return kind.from_folder(Path(folder), *read, lm)


@torch.no_grad()
def initial_prefix(lm: LM, tokens: int, seed: int) -> torch.Tensor:
    """The keys and values every block computes for ``tokens`` vocabulary tokens drawn at
    random (seeded; the same draw as the soft prompt's first embeddings), in PEFT's layout."""
    vocab = lm.model.get_input_embeddings().weight.shape[0]
    pick = torch.randint(vocab, (tokens,), generator=torch.Generator().manual_seed(seed))
    ids = pick[None].to(lm.device)
    pos = torch.arange(tokens, device=lm.device)[None]
    cache = prefill(lm, ids, torch.ones_like(ids), pos)
    return join_blocks(cache_layers(cache)).float().clone()


class Reparam(nn.Module):
    """Li & Liang's §4.3 reparameterisation, in PEFT's shape: P vectors of the key/value
    width through Linear → tanh → Linear to every block's keys and values."""

    def __init__(self, tokens: int, width: int, hidden: int, out: int, seed: int) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embedding = nn.Parameter(torch.randn(tokens, width))
            self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(),
                                     nn.Linear(hidden, out))

    def forward(self) -> torch.Tensor:
        return self.mlp(self.embedding)


@dataclass
class PrefixConfig(TuneConfig):
    """:class:`~.soft.TuneConfig` plus ``reparam``: the hidden width of the paper's MLP
    reparameterisation (0: the prefix itself is trained)."""

    reparam: int = 0

    def check(self) -> None:
        super().check()
        if self.reparam < 0:
            raise InputError(f"--reparam must be at least 0, got {self.reparam}")


def tune_prefix(lm: LM, task: LabelTask, config: PrefixConfig | None = None, *,
                dp: DPConfig | None = None,
                on_step: Callable[[dict[str, Any]], None] | None = None) -> Prefix:
    """A prefix for ``task``: Adam on the label cross-entropy over ``task.train``, the prefix
    of the best validation accuracy kept (with ``dp``: DP-SGD and the last prefix, as
    :func:`~.soft.tune` does). ``on_step`` as there."""
    config = config or PrefixConfig()
    config.check()
    sigma = delta = None
    if dp is not None:
        dp.check()
        if config.reparam:
            raise InputError("DP-SGD clips each example's gradient of the prefix itself; "
                             "drop --reparam or --dp-epsilon")
        sigma, delta = dp.noise(len(task.train), config.batch_size, config.steps)
    noise = torch.Generator().manual_seed(config.seed + 1)
    heads, dim = kv_geometry(lm)
    reparam: Reparam | None = None
    if config.reparam:
        reparam = Reparam(config.tokens, heads * dim, config.reparam,
                          2 * lm.n_layers * heads * dim, config.seed).to(lm.device)
        params = list(reparam.parameters())
    else:
        states = initial_prefix(lm, config.tokens, config.seed).requires_grad_(True)
        params = [states]

    def current() -> torch.Tensor:
        return reparam() if reparam is not None else states

    def loss_of(p: torch.Tensor, rows: Sequence[Any]) -> torch.Tensor:
        return label_loss(lm, task, p, rows, read=prefix_logits)

    opt = torch.optim.Adam(params, lr=config.lr)
    keeper = Keeper(lm, task, config.steps, config.eval_every, on_step,
                    keep_last=dp is not None, read=prefix_logits)
    draw = batches(len(task.train), config.batch_size, config.seed)
    with lm.frozen_weights():
        for step in range(1, config.steps + 1):
            rows = [task.train[i] for i in next(draw)]
            opt.zero_grad()
            if dp is None:
                loss = loss_of(current(), rows)
                loss.backward()
            else:
                loss = private_gradient(states, rows, loss_of, dp.clip, sigma, noise)
            opt.step()
            with torch.no_grad():
                keeper.after(step, loss, current().detach())
    meta = {"kind": "prefix", "task": task.name, "labels": task.labels,
            "template": task.template, "config": asdict(config), **keeper.meta(),
            "dp": None if dp is None else {**asdict(dp), "delta": delta, "noise_multiplier": sigma,
                                           "accountant": "rdp (opacus)"}}
    return Prefix(keeper.prompt.cpu(), meta)
