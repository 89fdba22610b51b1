"""Residual states of every layer, read in one forward: what all lenses are fitted and run on.

Convention (one for the whole package, for training and use alike): lens layer ``ℓ`` reads the
residual stream **entering block ℓ** — ``embed`` for ℓ = 0, ``resid.{ℓ-1}`` (the output of block
ℓ−1) otherwise — for ℓ = 0 … L−1, and every lens maps it towards the **output of the last block**
(``resid.{L-1}``), which the model's final norm and unembedding turn into its logits. This is the
tuned-lens code's convention. Reading Hugging Face's ``output_hidden_states`` instead is the
known off-by-one: its last entry is already normalised for Llama-style models, so a "last layer"
lens applied to it normalises twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..data.corpus import TextCorpus, get_corpus
from ..models.lm import LM
from ..trace import Trace, run_model


def lens_points(lm: LM) -> list[str]:
    """Hook points read by lens layers 0 … L−1 (inputs of the blocks)."""
    return ["embed", *(f"resid.{i}" for i in range(lm.n_layers - 1))]


@dataclass
class LayerStates:
    """``hidden[ℓ]``: ``[tokens, d]`` states entering block ℓ; ``final``: the last block's output;
    ``next_ids``: the token that follows each position (−1 where the row ends)."""

    hidden: list[torch.Tensor]
    final: torch.Tensor
    next_ids: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return int(self.final.shape[0])


@torch.no_grad()
def layer_states(lm: LM, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> LayerStates:
    """One forward of ``input_ids`` ``[rows, seq]``; real (unpadded) positions, flattened."""
    input_ids = input_ids.to(lm.device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(lm.device)
    points = lens_points(lm)
    last = f"resid.{lm.n_layers - 1}"
    with Trace(lm).capture(*points, last) as tr:
        run_model(lm, input_ids, attention_mask)
    keep = attention_mask.bool()
    nxt = torch.full_like(input_ids, -1)
    nxt[:, :-1] = torch.where(keep[:, 1:], input_ids[:, 1:], -1)
    return LayerStates([tr[p][keep] for p in points], tr[last][keep], nxt[keep])


def corpus_batches(lm: LM, corpus: TextCorpus | None, *, n_tokens: int, seq_len: int = 128,
                   batch_size: int = 8, skip_tokens: int = 0,
                   progress: bool = False) -> Iterator[torch.Tensor]:
    """Packed token rows for lens work; ``skip_tokens`` holds out a disjoint later slice (the
    evaluation split), so training and evaluation never share text."""
    if corpus is None:
        corpus = get_corpus(lm, n_tokens=n_tokens + skip_tokens, progress=progress)
    rows = corpus.token_rows(lm, seq_len=seq_len, max_tokens=n_tokens + skip_tokens)
    first = skip_tokens // seq_len
    rows = rows[first:first + max(1, -(-n_tokens // seq_len))]
    if len(rows) == 0:
        raise ValueError(f"corpus has no tokens left after skipping {skip_tokens}; "
                         "use a larger corpus or a smaller split")
    for start in range(0, len(rows), batch_size):
        yield rows[start:start + batch_size]


# with --corpus sampled: how much text the model writes, and where its evaluation part starts
SAMPLED_TOKENS = 24_000
EVAL_SKIP = 20_000


def lens_corpus(lm: LM, spec: str | None = None, *, skip: int | None = None,
                progress: bool = False) -> TextCorpus:
    """The corpus named by ``spec`` (default: the Wikipedia text) with its evaluation split:
    ``eval_start`` is where held-out text begins — the named corpora's own split, or ``skip``
    for a user's path (``None``: the path has no split)."""
    corpus = get_corpus(lm, spec, n_tokens=SAMPLED_TOKENS, progress=progress)
    if spec == "sampled":
        corpus.eval_start = EVAL_SKIP
    elif corpus.eval_start is None:
        corpus.eval_start = skip
    return corpus
