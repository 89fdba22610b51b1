"""The logit-lens picture: for one prompt, each layer's top tokens at each position.

Only the top-k ids and probabilities per (layer, position) leave this module — never the
``[layers × tokens × vocab]`` array — plus the probability each layer gives the model's final
top-1 token, which is what the heatmap colours, and that token's rank under each layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import RequestError
from ..figures import figure
from ..models.lm import LM
from .base import Lens
from .logit import LogitLens
from .states import layer_states

#: A view draws one column per token; longer prompts are refused rather than drawn unreadably.
MAX_VIEW_TOKENS = 256


@dataclass
class LayerView:
    tokens: list[str]  # the prompt's tokens
    top: list[list[list[tuple[str, float]]]]  # [layer][position] -> k (token, prob)
    final_prob: list[list[float]]  # [layer][position]: P_layer(final top-1 token)
    final_top: list[str]  # the model's own top-1 at each position
    lens_kind: str
    final_rank: list[list[int]]  # [layer][position]: rank of the final top-1 (0 = top)
    output_top: list[list[tuple[str, float]]]  # [position] -> the model's own top k

    def to_json(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "lens": self.lens_kind, "final_top": self.final_top,
                "layers": [{"layer": i, "top": [[{"token": t, "prob": p} for t, p in pos]
                                                for pos in row],
                            "final_token_prob": self.final_prob[i],
                            "final_token_rank": self.final_rank[i]}
                           for i, row in enumerate(self.top)]}

    def table(self, position: int = -1) -> list[str]:
        """Text rows: each layer's top tokens at one position (default: the last)."""
        pos = position % len(self.tokens)
        lines = [f"{self.lens_kind} lens at position {pos} ({self.tokens[pos]!r}); "
                 f"final top-1: {self.final_top[pos]!r}",
                 f"{'layer':>5}  {'P(final)':>8}  top tokens"]
        for i, row in enumerate(self.top):
            tops = "  ".join(f"{t!r} {p:.2f}" for t, p in row[pos])
            lines.append(f"{i:>5}  {self.final_prob[i][pos]:>8.3f}  {tops}")
        return lines


@torch.no_grad()
def layer_view(lm: LM, prompt: str, lens: Lens | None = None, *, k: int = 3) -> LayerView:
    """Each layer's top ``k`` tokens at every position of ``prompt`` under ``lens``."""
    lens = lens or LogitLens(lm)
    if not prompt.strip():
        raise RequestError("the prompt is empty; give the text whose next tokens to read")
    enc = lm.tokenize(prompt)
    n = enc["input_ids"].shape[1]
    if n > MAX_VIEW_TOKENS:
        raise RequestError(f"the prompt has {n} tokens; a layer view draws one column per token "
                           f"and reads at most {MAX_VIEW_TOKENS}: shorten it")
    st = layer_states(lm, enc["input_ids"], enc["attention_mask"])
    final = F.softmax(lm.logits_from_hidden(st.final).float(), -1)
    final_top = final.argmax(-1)

    def topk(p: torch.Tensor) -> list[list[tuple[str, float]]]:
        vals, ids = p.topk(k, -1)
        return [[(lm.decode(int(i)), float(v)) for v, i in zip(vr, ir, strict=True)]
                for vr, ir in zip(vals, ids, strict=True)]

    top: list[list[list[tuple[str, float]]]] = []
    fprob: list[list[float]] = []
    frank: list[list[int]] = []
    for layer in range(lm.n_layers):
        p = F.softmax(lens.predict(lm, st.hidden[layer], layer).float(), -1)
        top.append(topk(p))
        at = p.gather(1, final_top[:, None])
        fprob.append(at.squeeze(1).tolist())
        frank.append((p > at).sum(-1).tolist())
    tokens = [lm.decode(int(t)) for t in enc["input_ids"][0]]
    return LayerView(tokens, top, fprob, [lm.decode(int(t)) for t in final_top], lens.kind,
                     frank, topk(final))


def plot_view(view: LayerView, out: str | Path, *, title: str = "") -> Path:
    """Heatmap: layers × positions, coloured by P(final top-1), labelled with each top-1 token."""
    n_layers, n_pos = len(view.top), len(view.tokens)
    grid = torch.tensor(view.final_prob)
    with figure(out, figsize=(1.1 * n_pos + 2, 0.32 * n_layers + 1.5)) as (fig, ax):
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1)
        for i in range(n_layers):
            for j in range(n_pos):
                ax.text(j, i, view.top[i][j][0][0].strip()[:8] or "␣", ha="center", va="center",
                        fontsize=6, color="white" if grid[i, j] < 0.5 else "black")
        ax.set_xticks(range(n_pos), [t.strip()[:10] or "␣" for t in view.tokens], rotation=45,
                      ha="right", fontsize=7)
        ax.set_ylabel("layer (input of block)")
        ax.set_title(title or f"{view.lens_kind} lens: top-1 token per layer", fontsize=9)
        fig.colorbar(im, ax=ax, label="P(model's final top-1)")
    return Path(out)
