"""Token rows for teacher-forced forwards: targets as they continue a prompt, padded batches.

Shared by the editors (target optimisation, key collection) and the evaluators (scoring), so it
sits below both: neither package imports the other for these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .errors import RequestError
from .models.lm import LM


def target_ids(lm: LM, text: str, target: str) -> list[int]:
    """Token ids of ``" " + target`` as they continue ``text``.

    Tokenising prompt and target together and cutting at the prompt's tokens is exact for
    tokenizers that merge across the boundary (SentencePiece); if the prompt's tokens are not a
    prefix of the joint tokens, the target is tokenised alone.
    """
    target = target if target.startswith(" ") else " " + target
    head = lm.tokenizer(text, add_special_tokens=True)["input_ids"]
    joint = lm.tokenizer(text + target, add_special_tokens=True)["input_ids"]
    if len(joint) > len(head) and joint[:len(head)] == head:
        return list(joint[len(head):])
    ids = lm.encode(target)
    if not ids:
        raise RequestError(f"target {target!r} tokenises to nothing")
    return ids


@dataclass
class Batch:
    """Right-padded rows with, per row, the positions to intervene on and the labels to score."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    owner: list[int]  # which request (or case) each row belongs to
    lookup: list[list[int]]  # intervention positions per row
    labels: list[list[tuple[int, int]]] = field(default_factory=list)  # (position, token id)

    def lookup_mask(self) -> torch.Tensor:
        mask = torch.zeros(self.input_ids.shape, dtype=torch.bool)
        for r, positions in enumerate(self.lookup):
            mask[r, positions] = True
        return mask.to(self.input_ids.device)


def make_batch(lm: LM, rows: list[list[int]], owner: list[int], lookup: list[list[int]],
               labels: list[list[tuple[int, int]]] | None = None) -> Batch:
    pad = lm.tokenizer.pad_token_id
    pad = 0 if pad is None else pad
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return Batch(ids.to(lm.device), mask.to(lm.device), owner, lookup, labels or [])


def encode_prompts(lm: LM, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids of ``prompts`` and each one's length (its last real token is at
    ``length - 1``)."""
    return pad_rows(lm, [lm.tokenizer(p)["input_ids"] for p in prompts])


def pad_rows(lm: LM, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows right-padded into one tensor on the model's device, and each row's
    length."""
    pad = lm.tokenizer.pad_token_id or 0
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    lengths = torch.tensor([len(r) for r in rows])
    return ids.to(lm.device), lengths.to(lm.device)


def by_length(lengths: Sequence[int], size: int) -> list[list[int]]:
    """Row indices in batches of at most ``size``, shortest rows first.

    A batch pads every row to its longest, so batching rows of similar length wastes fewest
    padded positions (the bundled concepts' 178 control prompts: 1,896 positions instead of
    3,164 in their given order). Callers put each row's result back at its index.
    """
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[s:s + size] for s in range(0, len(order), size)]


def length_mask(ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``[rows, width]`` bool: True on each row's first ``lengths[row]`` (real) tokens."""
    return torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]
