"""Reading a soft prompt: the vocabulary tokens nearest each of its vectors (by cosine)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.lm import LM


def nearest_ids(lm: LM, vectors: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``([P, k] token ids, [P, k] cosines)`` of the input embeddings nearest each vector."""
    emb = lm.model.get_input_embeddings().weight.detach().float()
    sims = F.normalize(vectors.detach().float().to(emb.device), dim=-1) @ F.normalize(emb, dim=-1).T
    top = sims.topk(k, dim=-1)
    return top.indices, top.values


def nearest_tokens(lm: LM, vectors: torch.Tensor, k: int = 3) -> list[list[tuple[str, float]]]:
    """Per vector, its ``k`` nearest tokens (decoded) with their cosine."""
    ids, cos = nearest_ids(lm, vectors, k)
    return [[(lm.decode(int(i)), float(c)) for i, c in zip(row_i, row_c, strict=True)]
            for row_i, row_c in zip(ids, cos, strict=True)]
