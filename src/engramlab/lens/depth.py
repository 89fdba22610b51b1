"""How a model uses its depth: the "Guess-then-Refine" analysis (Gupta, Yeung, Anumanchipalli
& Ivanova 2025, "How Do LLMs Use Their Depth?").

Read through a lens (the paper uses the tuned lens), each layer has a top-1 guess for the next
token. The paper finds that (1) early layers' top-1 guesses are mostly very frequent tokens —
statistical guesses made before the context is processed — far more than the final
predictions are; (2) those guesses are then refined: even early high-frequency guesses are
changed by the last layer most of the time (> 70 %); (3) in fact recall, the first token of an
answer needs more depth than the later ones.

What is measured here, on held-out text:

* tokens are bucketed by their frequency rank in a reference corpus (the paper's buckets:
  ranks 1–10, 11–100, 101–1000, > 1000);
* per layer, the share of lens top-1 guesses falling in each bucket, against the share among
  the final predictions;
* per layer, the share of guesses in the top-10 bucket that differ from the final prediction
  ("refined"), and that share pooled over the first third of the layers;
* per frequency bucket of the *final* token, the first layer at which it is the lens' top-1
  and the layer from which it stays top-1 (its memorized layer);
* for fact prompts the model answers correctly (teacher-forced answer tokens), the first layer
  at which each answer token is the lens' top-1 — first token against the later ones — and the
  mean log-rank of the first answer token per layer.

Deviations: frequencies come from the analysis corpus itself unless another is given (the paper
counts a large pre-training sample), so ranks beyond a few thousand are noisy on small corpora;
"the final prediction" is the model's own top-1, as in the paper, not the corpus next token;
part-of-speech and multiple-choice case studies are not reproduced.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..batching import target_ids
from ..figures import figure
from ..models.lm import LM
from .base import Lens
from .readings import settled_from
from .states import layer_states

BUCKETS = ((0, 10, "1-10"), (10, 100, "11-100"), (100, 1000, "101-1000"),
           (1000, None, ">1000"))
EARLY_SHARE = 1 / 3  # "early layers": the first third


def frequency_ranks(batches: Iterable[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """[vocab] frequency rank of every token id over ``batches`` (0: most frequent; unseen
    tokens share the rank after the last seen one)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for ids in batches:
        counts += torch.bincount(ids.reshape(-1).cpu(), minlength=vocab_size)[:vocab_size]
    order = torch.argsort(counts, descending=True, stable=True)
    ranks = torch.empty(vocab_size, dtype=torch.long)
    ranks[order] = torch.arange(vocab_size)
    return torch.where(counts > 0, ranks, torch.full_like(ranks, int((counts > 0).sum())))


def bucket_of(ranks: torch.Tensor) -> torch.Tensor:
    """Bucket index (into :data:`BUCKETS`) of each frequency rank."""
    out = torch.zeros_like(ranks)
    for i, (lo, _, _) in enumerate(BUCKETS):
        out[ranks >= lo] = i
    return out


@dataclass
class DepthReadings:
    """``pred``: [L, N] lens top-1 per layer; ``final``: [N] the model's top-1."""

    pred: torch.Tensor
    final: torch.Tensor

    @property
    def n_layers(self) -> int:
        return int(self.pred.shape[0])

    def first_top1(self) -> torch.Tensor:
        """First layer at which the final token is the lens' top-1 (L: only at the output)."""
        hit = self.pred == self.final[None]
        return torch.where(hit.any(0), hit.float().argmax(0),
                           torch.full_like(self.final, self.n_layers)).long()

    def settled(self) -> torch.Tensor:
        """Layer from which the final token stays the lens' top-1 (L: only at the output)."""
        return settled_from(self.pred == self.final[None])


@torch.no_grad()
def depth_readings(lm: LM, lens: Lens, batches: Iterable[torch.Tensor], *,
                   chunk: int = 256) -> DepthReadings:
    preds, finals = [], []
    for ids in batches:
        st = layer_states(lm, ids)
        for start in range(0, st.n_tokens, chunk):
            sl = slice(start, start + chunk)
            finals.append(lm.logits_from_hidden(st.final[sl]).argmax(-1).cpu())
            preds.append(torch.stack([lens.predict(lm, st.hidden[layer][sl], layer)
                                      .argmax(-1).cpu() for layer in range(lm.n_layers)]))
    if not finals:
        raise ValueError("no tokens to analyse")
    return DepthReadings(torch.cat(preds, 1), torch.cat(finals))


def guess_then_refine(r: DepthReadings, ranks: torch.Tensor) -> dict[str, Any]:
    """The frequency analysis of the paper, as plain numbers (see the module docstring)."""
    n_layers, n = r.pred.shape
    names = [b[2] for b in BUCKETS]
    pred_b = bucket_of(ranks[r.pred])  # [L, N]
    final_b = bucket_of(ranks[r.final])  # [N]
    share = {name: (pred_b == i).float().mean(1).tolist() for i, name in enumerate(names)}
    final_share = {name: float((final_b == i).float().mean()) for i, name in enumerate(names)}
    high = pred_b == 0
    changed = r.pred != r.final[None]
    refined = [float(changed[layer][high[layer]].float().mean()) if high[layer].any()
               else None for layer in range(n_layers)]
    early = max(1, round(n_layers * EARLY_SHARE))
    early_high = high[:early]
    first, settled = r.first_top1().float(), r.settled().float()

    def per_bucket(x: torch.Tensor) -> dict[str, float | None]:
        return {name: float(x[final_b == i].mean()) if (final_b == i).any() else None
                for i, name in enumerate(names)}

    return {
        "tokens": n, "n_layers": n_layers, "buckets": names,
        "top1_bucket_share": share, "final_bucket_share": final_share,
        "refined_share": refined,
        "early_layers": early,
        "early_high_freq_refined": float(changed[:early][early_high].float().mean())
        if early_high.any() else None,
        "first_top1_layer": per_bucket(first), "settled_layer": per_bucket(settled),
    }


@torch.no_grad()
def fact_recall_depth(lm: LM, lens: Lens, facts: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Per answer token of the facts the model gets right (greedy, teacher-forced): the first
    layer whose lens top-1 is that token; and the first token's mean log-rank per layer."""
    firsts: list[list[int]] = []
    log_rank = torch.zeros(lm.n_layers + 1, dtype=torch.float64)
    for prompt, answer in facts:
        ans = target_ids(lm, prompt, answer)
        head = lm.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        ids = torch.tensor([head + ans[:-1]])
        st = layer_states(lm, ids)
        pos = torch.arange(len(head) - 1, len(head) - 1 + len(ans))
        want = torch.tensor(ans)
        final = lm.logits_from_hidden(st.final[pos]).float()
        if not bool((final.argmax(-1).cpu() == want).all()):
            continue  # the model does not know this answer: nothing to locate
        first = torch.full((len(ans),), lm.n_layers)
        ranks = []
        for layer in range(lm.n_layers):
            logits = lens.predict(lm, st.hidden[layer][pos], layer).float().cpu()
            rank = (logits > logits.gather(1, want[:, None])).sum(1)
            first = torch.where((rank == 0) & (first == lm.n_layers), layer, first)
            ranks.append(float(rank[0]))
        ranks.append(0.0)
        log_rank += torch.log1p(torch.tensor(ranks, dtype=torch.float64))
        firsts.append(first.tolist())
    n = len(firsts)
    later = [x for f in firsts for x in f[1:]]
    multi = [f for f in firsts if len(f) > 1]
    return {
        "facts": len(facts), "known": n, "multi_token": len(multi),
        "first_token_layer": sum(f[0] for f in firsts) / n if n else None,
        "later_token_layer": sum(later) / len(later) if later else None,
        # the paper's comparison: within the same multi-token answers
        "multi_first_token_layer": sum(f[0] for f in multi) / len(multi) if multi else None,
        "first_token_log_rank": (log_rank / n).tolist() if n else None,
    }


def depth_lines(summary: dict[str, Any], title: str) -> list[str]:
    """The headline numbers of ``guess_then_refine`` and ``fact_recall_depth`` as text."""
    g, f = summary["guess_then_refine"], summary["facts"]
    refined = g["early_high_freq_refined"]
    lines = [f"{title}, {g['tokens']:,} held-out tokens",
             f"top-1 guesses among the 10 most frequent tokens: layer 0 "
             f"{g['top1_bucket_share']['1-10'][0]:.0%}, last layer "
             f"{g['top1_bucket_share']['1-10'][-1]:.0%}, final predictions "
             f"{g['final_bucket_share']['1-10']:.0%}",
             f"early (layers < {g['early_layers']}) top-10-frequency guesses changed by the "
             "end: " + (f"{refined:.0%}" if refined is not None else "-"),
             "first layer at which the final token is top-1, by its frequency rank: "
             + ", ".join(f"{b} {v:.1f}" for b, v in g["first_top1_layer"].items()
                         if v is not None)]
    if f["known"]:
        lines.append(f"fact recall ({f['known']}/{f['facts']} known): first answer token "
                     f"top-1 at layer {f['first_token_layer']:.1f}"
                     + (f", later tokens {f['later_token_layer']:.1f}"
                        if f["later_token_layer"] is not None else ""))
    return lines


def plot_depth(summary: dict[str, Any], out: str | Path, title: str = "") -> Path:
    """Three panels: bucket shares of the top-1 guesses per layer; refined share per layer;
    first/settled layer per frequency bucket (and fact answers)."""
    g = summary["guess_then_refine"]
    layers = list(range(g["n_layers"]))
    with figure(out, ncols=3, figsize=(15, 4)) as (fig, axes):
        bottom = [0.0] * len(layers)
        for name in g["buckets"]:
            vals = g["top1_bucket_share"][name]
            axes[0].bar(layers, vals, bottom=bottom, label=f"rank {name} "
                        f"(final {g['final_bucket_share'][name]:.0%})")
            bottom = [a + b for a, b in zip(bottom, vals, strict=True)]
        axes[0].set(xlabel="layer (input of block)", ylabel="share of top-1 guesses",
                    title="guesses by token frequency", ylim=(0, 1))
        axes[0].legend(fontsize=7)
        refined = [math.nan if v is None else v for v in g["refined_share"]]
        axes[1].plot(layers, refined, marker=".")
        axes[1].axhline(0.7, color="grey", ls="--", lw=0.8)
        axes[1].set(xlabel="layer (input of block)", ylim=(0, 1.02),
                    ylabel="share changed by the final layer",
                    title="top-10-frequency guesses later refined")
        names = g["buckets"]
        first = [g["first_top1_layer"][b] or math.nan for b in names]
        settled = [g["settled_layer"][b] or math.nan for b in names]
        x = list(range(len(names)))
        axes[2].bar([i - 0.2 for i in x], first, width=0.4, label="first top-1")
        axes[2].bar([i + 0.2 for i in x], settled, width=0.4, label="settled")
        labels = [f"rank {b}" for b in names]
        facts = summary.get("facts")
        if facts and facts.get("known"):
            x += [len(names), len(names) + 1]
            labels += ["answer tok 1", "answer tok 2+"]
            axes[2].bar([len(names) - 0.2, len(names) + 0.8],
                        [facts["first_token_layer"], facts["later_token_layer"] or math.nan],
                        width=0.4, color="C3", label="fact answers (first top-1)")
        axes[2].set_xticks(x, labels, rotation=20, fontsize=8)
        axes[2].set(ylabel="layer", title="depth needed per final token")
        axes[2].legend(fontsize=7)
        fig.suptitle(title or "Guess-then-Refine")
    return Path(out)
