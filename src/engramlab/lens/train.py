"""One entry point to fit any lens kind on a corpus (what ``engram lens train`` calls)."""

from __future__ import annotations

from ..data.corpus import TextCorpus
from ..models.lm import LM
from .base import Lens
from .logit import LogitLens
from .shortcut import OneJump, RegressionMoments, Shortcut
from .states import corpus_batches
from .tuned import TunedLens, train_tuned

KINDS = ("logit", "tuned", "shortcut", "onejump")


def fit_lens(lm: LM, kind: str, corpus: TextCorpus, *, n_tokens: int = 20_000,
             rank: int | None = None, steps: int = 50, lr: float = 1e-3,
             warm_start: bool = True, seq_len: int = 128, batch_size: int = 8,
             step_tokens: int = 256, progress: bool = False) -> Lens:
    """Fit a lens of ``kind`` on the first ``n_tokens`` of ``corpus``.

    ``shortcut``/``onejump`` are closed-form (one pass); ``onejump`` keeps its last tenth of the
    tokens to choose among candidate maps; ``tuned`` starts from the per-layer least-squares
    shortcut (``warm_start``) and then runs ``steps`` Adam steps of ``step_tokens`` tokens each,
    cycling over the ``n_tokens``; its loss per step is kept in ``config['losses']``. A step
    reads every layer through the unembedding and back: on 2 CPU cores about 12 s per 256
    tokens for SmolLM2, so ``step_tokens`` and ``steps`` are what trade time for quality.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown lens kind {kind!r}; choose one of {KINDS}")

    def batches(n: int, skip: int = 0):
        return corpus_batches(lm, corpus, n_tokens=n, seq_len=seq_len, batch_size=batch_size,
                              skip_tokens=skip)

    if kind == "logit":
        return LogitLens(lm)
    if kind == "shortcut":
        return Shortcut(lm, rank=rank).fit(RegressionMoments.collect(lm, batches(n_tokens),
                                                           progress=progress))
    if kind == "onejump":
        held = max(seq_len, n_tokens // 10)
        train = RegressionMoments.collect(lm, batches(n_tokens - held), progress=progress)
        held_out = RegressionMoments.collect(lm, batches(held, n_tokens - held))
        return OneJump(lm, rank=rank or 64).fit(train, held_out)
    lens = TunedLens(lm, warm_start=warm_start, lr=lr, train_tokens=n_tokens,
                     step_tokens=step_tokens, steps=steps)
    if warm_start:
        sc = Shortcut(lm).fit(RegressionMoments.collect(lm, batches(n_tokens), progress=progress))
        lens.warm_start({layer: sc.affine(layer) for layer in range(lm.n_layers)})

    def cycle():
        while True:
            yield from batches(n_tokens)

    losses = train_tuned(lm, lens, cycle(), steps=steps, lr=lr, progress=progress,
                         max_tokens_per_step=step_tokens)
    lens.config["losses"] = [round(x, 5) for x in losses]
    return lens
