"""Neuron atlas: for every MLP neuron of chosen layers, what makes it fire and what it writes.

Seeded by Pichat et al., "Intra-neuronal attention within language models: relationships
between activation and semantics" (2025), who read GPT-2 XL's first two layers neuron by
neuron: each neuron's most activating tokens, grouped into categories by the cosine similarity
of their embeddings, with the finding that categorical homogeneity is higher among the tokens
of very high activation, and that a layer-1 neuron regroups categories its layer-0 inputs kept
apart. For every neuron (an MLP "key": an input of the down projection) of each chosen layer
the atlas keeps

* its ``top_k`` highest activations over a corpus, with their exact positions (a running
  top-k over every token read, so these are the true arg-max contexts), the token there and a
  ``window`` of tokens before it;
* the tokens its value vector promotes: the top logits of the value vector read through the
  final norm and the unembedding (the logit lens of Geva et al. 2022);
* a category: every distinct corpus token is put in one of ``categories`` groups by spherical
  k-means on the model's input embeddings; the neuron's label is the most common group among
  its top tokens, with its purity (that group's share) and how many groups it spans;
* homogeneity by activation zone: the top-k contexts in four zones from the highest activations
  down, and the mean cosine of the input embeddings over each zone's pairs of different tokens
  (the paper's bottom-up analysis), beside the same mean over random corpus tokens;
* regrouping between consecutive chosen layers: how often two categories share a neuron's top
  tokens in one layer against the next, and the pairs brought together most.

It is stored as ``atlas.safetensors`` (every array) and ``atlas.json`` (settings, category
names, summaries and the text of every token it refers to), so a viewer can page through
neurons without the model. Deviations: the paper clusters each neuron's tokens on their own
and segments activations bottom-up; here the categories are shared by all neurons (so they can
be compared across layers) and the zones are fixed quarters of the top-k.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_dir
from ..data.corpus import TextCorpus
from ..errors import InputError, SettingsError
from ..evaluate.bootstrap import bootstrap_interval
from ..models.lm import LM
from ..trace import Trace, run_model

ZONES = 4
FILE_ARRAYS, FILE_INDEX = "atlas.safetensors", "atlas.json"


@dataclass(frozen=True)
class AtlasConfig:
    """Which neurons, over how much text, and how much of each is kept."""

    layers: tuple[int, ...] = (0, 1)
    tokens: int = 20_000  # corpus tokens read
    seq_len: int = 128
    top_k: int = 32  # contexts kept per neuron
    window: int = 8  # tokens shown before the activating one
    promoted: int = 10  # tokens kept per value vector
    categories: int = 32  # token groups
    batch_size: int = 8
    seed: int = 0

    def check(self, n_layers: int | None = None) -> None:
        if not self.layers:
            raise SettingsError("give at least one layer")
        if n_layers is not None:
            bad = [x for x in self.layers if not 0 <= x < n_layers]
            if bad:
                raise SettingsError(f"layer {bad[0]} out of range for a {n_layers}-layer model "
                                    f"(0..{n_layers - 1})")
        if min(self.tokens, self.seq_len, self.top_k, self.promoted, self.categories,
               self.batch_size) < 1 or self.window < 0:
            raise SettingsError("tokens, seq_len, top_k, promoted, categories and batch_size "
                                "must be at least 1, window at least 0")
        if self.top_k < ZONES:
            raise SettingsError(f"top_k must be at least {ZONES} (one context per zone)")


def _spherical_kmeans(x: torch.Tensor, k: int, *, iters: int = 25, seed: int = 0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the unit rows of ``x``: (assignment per row, unit centroids)."""
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    k = min(k, len(x))
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(len(x), generator=gen)[:k]].clone()
    assign = torch.zeros(len(x), dtype=torch.long)
    for _ in range(iters):
        assign = (x @ centroids.T).argmax(1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        empty = sums.norm(dim=1) == 0
        sums[empty] = centroids[empty]  # an empty cluster keeps its centre
        new = sums / sums.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if torch.equal(new, centroids):
            break
        centroids = new
    return (x @ centroids.T).argmax(1), centroids


def homogeneity(embed: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cosine of the embeddings over the pairs of *different* tokens in each set:
    ``ids`` ``[..., m]`` -> ``[...]`` (NaN for a set of one token repeated). A neuron that fires
    on one token again and again is not thereby homogeneous."""
    u = embed[ids]
    u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    differ = ids[..., :, None] != ids[..., None, :]
    gram = (u @ u.transpose(-1, -2)) * differ
    return gram.sum((-1, -2)) / differ.sum((-1, -2))


@dataclass
class Atlas:
    """The arrays (``arrays``: name -> tensor) and the index (``index``: JSON-able)."""

    arrays: dict[str, torch.Tensor]
    index: dict[str, Any]

    @property
    def layers(self) -> list[int]:
        return list(self.index["config"]["layers"])

    def _token(self, i: int) -> str:
        return self.index["tokens"][str(int(i))]

    def neuron(self, layer: int, i: int) -> dict[str, Any]:
        """One neuron's page: its contexts (highest first), promoted tokens and category."""
        if layer not in self.layers:
            raise SettingsError(f"layer {layer} is not in this atlas; it holds {self.layers}")
        n = self.arrays[f"L{layer}.top_act"].shape[1]
        if not 0 <= i < n:
            raise SettingsError(f"neuron {i} out of range for layer {layer} (0..{n - 1})")
        ids, seq = self.arrays["corpus_ids"], self.index["config"]["seq_len"]
        window = self.index["config"]["window"]
        contexts = []
        for act, pos in zip(self.arrays[f"L{layer}.top_act"][:, i].tolist(),
                            self.arrays[f"L{layer}.top_pos"][:, i].tolist(), strict=True):
            start = max(pos - window, pos - pos % seq)  # a context never crosses its row
            contexts.append({"activation": act, "position": pos,
                             "token": self._token(ids[pos]),
                             "before": "".join(self._token(t) for t in ids[start:pos].tolist())})
        cat = int(self.arrays[f"L{layer}.category"][i])
        return {"layer": layer, "neuron": i, "contexts": contexts,
                "promoted": [{"token": self._token(t), "logit": v} for t, v in
                             zip(self.arrays[f"L{layer}.promoted"][i].tolist(),
                                 self.arrays[f"L{layer}.promoted_logit"][i].tolist(),
                                 strict=True)],
                "category": cat, "category_name": self.index["categories"][cat],
                "purity": float(self.arrays[f"L{layer}.purity"][i]),
                "categories_spanned": int(self.arrays[f"L{layer}.spanned"][i])}

    def neuron_lines(self, layer: int, i: int) -> list[str]:
        page = self.neuron(layer, i)
        out = [f"layer {layer} neuron {i}: category {page['category']} "
               f"({page['category_name']}), purity {page['purity']:.2f}, spans "
               f"{page['categories_spanned']} categories",
               "promotes: " + " ".join(repr(p["token"]) for p in page["promoted"]),
               "top contexts:"]
        out += [f"{c['activation']:>8.3f}  …{c['before']!r} [{c['token']!r}]"
                for c in page["contexts"]]
        return out

    def lines(self) -> list[str]:
        idx = self.index
        out = [f"neuron atlas of {idx['model']}: layers {self.layers}, "
               f"{idx['corpus_tokens']} tokens of {idx['corpus']}, top {idx['config']['top_k']} "
               f"contexts per neuron, {len(idx['categories'])} token categories",
               f"{'layer':>5}{'purity':>8}{'spans':>7}  homogeneity by zone (top → 4th quarter)"
               f"; random tokens {idx['random_homogeneity']:.3f}"]
        for layer in self.layers:
            s = idx["summary"][str(layer)]
            gap = s["top_minus_bottom_zone"]
            ci = gap["interval"] or [math.nan, math.nan]
            out.append(f"{layer:>5}{s['mean_purity']:>8.3f}{s['mean_spanned']:>7.2f}  " +
                       "  ".join(f"{h:.3f}" for h in s["homogeneity_by_zone"]) +
                       f"   top − bottom {gap['mean']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]")
        for pair in idx.get("regrouping", []):
            top = ", ".join(f"{p['a']}+{p['b']} ({p['before']:.3f}→{p['after']:.3f})"
                            for p in pair["rising"][:3])
            out.append(f"layer {pair['from']} → {pair['to']}: categories sharing a neuron "
                       f"{pair['share_from']:.3f} → {pair['share_to']:.3f}; brought together "
                       f"most: {top}")
        return out

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        with atomic_dir(folder) as tmp:
            save_file({k: v.contiguous() for k, v in self.arrays.items()}, str(tmp / FILE_ARRAYS))
            (tmp / FILE_INDEX).write_text(json.dumps(self.index, indent=1) + "\n")
        return Path(folder)

    @classmethod
    def load(cls, folder: str | Path) -> Atlas:
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / FILE_ARRAYS).is_file() or not (folder / FILE_INDEX).is_file():
            raise InputError(f"{folder} is not an atlas folder (no {FILE_ARRAYS} and "
                             f"{FILE_INDEX}); make one with `engram atlas --out {folder}`")
        return cls(load_file(str(folder / FILE_ARRAYS)),
                   json.loads((folder / FILE_INDEX).read_text()))


def _category_names(assign: torch.Tensor, seen: torch.Tensor, counts: torch.Tensor,
                    k: int, decode: Any) -> list[str]:
    names = []
    for c in range(k):
        members = seen[assign == c]
        top = members[counts[assign == c].argsort(descending=True)[:3]]
        names.append(" ".join(repr(decode(int(t))) for t in top) or "(empty)")
    return names


@torch.no_grad()
def build_atlas(lm: LM, corpus: TextCorpus, config: AtlasConfig | None = None, *,
                progress: bool = False) -> Atlas:
    """Read ``config.tokens`` tokens of ``corpus`` through ``lm`` and index every neuron of
    ``config.layers`` (see the module docstring)."""
    from tqdm.auto import tqdm

    config = config or AtlasConfig()
    config.check(lm.n_layers)
    layers = sorted(set(config.layers))
    try:
        rows = corpus.token_rows(lm, seq_len=config.seq_len, max_tokens=config.tokens)
    except ValueError as e:
        raise InputError(f"{e}") from None
    n_rows, seq = rows.shape
    k = min(config.top_k, rows.numel())
    points = [f"mlp_key.{x}" for x in layers]
    top_act = {x: torch.full((k, lm.d_mlp), -math.inf) for x in layers}
    top_pos = {x: torch.zeros((k, lm.d_mlp), dtype=torch.long) for x in layers}
    for start in tqdm(range(0, n_rows, config.batch_size), desc="atlas: reading the corpus",
                      unit="batch", disable=not progress):
        ids = rows[start:start + config.batch_size].to(lm.device)
        with Trace(lm).capture(*points) as tr:
            run_model(lm, ids, torch.ones_like(ids), stop_after=layers[-1])
        positions = torch.arange(start * seq, start * seq + ids.numel())
        for x, p in zip(layers, points, strict=True):
            acts = tr[p].reshape(-1, lm.d_mlp).float().cpu()
            values = torch.cat([top_act[x], acts])
            where = torch.cat([top_pos[x], positions[:, None].expand(-1, lm.d_mlp)])
            top_act[x], order = values.topk(k, dim=0)
            top_pos[x] = where.gather(0, order)
    flat = rows.reshape(-1)
    seen, counts = flat.unique(return_counts=True)
    embed = lm.layout.embed.weight.detach().float().cpu()
    assign, _ = _spherical_kmeans(embed[seen], config.categories, seed=config.seed)
    n_cat = int(assign.max()) + 1
    token_category = torch.full((embed.shape[0],), -1, dtype=torch.long)
    token_category[seen] = assign
    arrays: dict[str, torch.Tensor] = {"corpus_ids": flat.to(torch.int32),
                                       "token_category": token_category.to(torch.int32)}
    summary: dict[str, Any] = {}
    co: dict[int, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(config.seed)
    sample = flat[torch.randint(len(flat), (4096,), generator=gen)]
    random_h = float(homogeneity(embed, sample.view(64, 64)).nanmean())
    for x in layers:
        tokens = flat[top_pos[x]]  # [k, n]
        cats = token_category[tokens]  # [k, n]
        hist = torch.zeros(lm.d_mlp, n_cat).scatter_add_(1, cats.T, torch.ones(cats.T.shape))
        purity, label = (hist / k).max(1)
        present = hist > 0
        spanned = present.sum(1)
        zone = k // ZONES  # zone z holds the contexts ranked z*zone .. (z+1)*zone - 1
        by_zone = homogeneity(embed, tokens[:zone * ZONES].view(ZONES, zone, -1)
                              .transpose(1, 2))  # [zones, n]
        w = lm.layout.value_weight(x).detach()
        promoted, promoted_logit = [], []
        for a in range(0, lm.d_mlp, 256):
            logits = lm.logits_from_hidden(w[:, a:a + 256].T).float().cpu()
            v, t = logits.topk(config.promoted, dim=1)
            promoted.append(t)
            promoted_logit.append(v)
        arrays |= {f"L{x}.top_act": top_act[x], f"L{x}.top_pos": top_pos[x].to(torch.int32),
                   f"L{x}.category": label.to(torch.int32), f"L{x}.purity": purity,
                   f"L{x}.spanned": spanned.to(torch.int32),
                   f"L{x}.homogeneity": by_zone.T.contiguous(),
                   f"L{x}.promoted": torch.cat(promoted).to(torch.int32),
                   f"L{x}.promoted_logit": torch.cat(promoted_logit)}
        gap = (by_zone[0] - by_zone[-1])
        gap = gap[~gap.isnan()].tolist()
        summary[str(x)] = {"mean_purity": float(purity.mean()),
                           "mean_spanned": float(spanned.float().mean()),
                           "homogeneity_by_zone": by_zone.nanmean(1).tolist(),
                           "top_minus_bottom_zone": {
                               "mean": sum(gap) / len(gap) if gap else math.nan,
                               "interval": bootstrap_interval(gap, seed=config.seed),
                               "neurons": len(gap)}}
        p = present.float()
        co[x] = (p.T @ p) / lm.d_mlp  # share of neurons holding both categories
    regrouping = []
    names = _category_names(assign, seen, counts, n_cat, lm.decode)
    upper = torch.ones(n_cat, n_cat, dtype=torch.bool).triu(1)  # each pair of categories once
    pairs = upper.nonzero().tolist()
    for a, b in itertools.pairwise(layers):
        before, after = co[a][upper], co[b][upper]
        rise = after - before
        order = [i for i in rise.argsort(descending=True)[:10].tolist() if rise[i] > 0]
        regrouping.append({
            "from": a, "to": b, "share_from": float(before.mean()),
            "share_to": float(after.mean()),
            "rising": [{"a": pairs[i][0], "b": pairs[i][1], "before": float(before[i]),
                        "after": float(after[i])} for i in order]})
    referenced = set(flat.tolist())
    for x in layers:
        referenced |= set(arrays[f"L{x}.promoted"].flatten().tolist())
    index = {"model": lm.name, "corpus": corpus.name, "corpus_tokens": int(flat.numel()),
             "config": asdict(config) | {"layers": layers, "top_k": k},
             "categories": names, "summary": summary, "random_homogeneity": random_h,
             "regrouping": regrouping,
             "tokens": {str(t): lm.decode(t) for t in sorted(referenced)}}
    return Atlas(arrays, index)


def plot_atlas(atlas: Atlas, out: str | Path, title: str = "") -> Path:
    """Left: homogeneity of each activation zone per layer, beside random tokens. Right: how
    many token categories a neuron's top contexts span, per layer."""
    from ..figures import figure

    with figure(out, ncols=2, figsize=(10, 4)) as (_, (left, right)):
        zones = list(range(1, ZONES + 1))
        for layer in atlas.layers:
            s = atlas.index["summary"][str(layer)]
            left.plot(zones, s["homogeneity_by_zone"], marker="o", label=f"layer {layer}")
            spanned = atlas.arrays[f"L{layer}.spanned"].float()
            right.hist(spanned.tolist(), bins=range(1, int(spanned.max()) + 2), alpha=0.5,
                       label=f"layer {layer}")
        left.axhline(atlas.index["random_homogeneity"], color="grey", ls="--", lw=0.8,
                     label="random tokens")
        left.set(xticks=zones, xlabel="activation zone (1 = highest quarter of the top-k)",
                 ylabel="mean cosine, pairs of different tokens",
                 title=title or "categorical homogeneity by activation")
        left.legend()
        right.set(xlabel="token categories among a neuron's top contexts", ylabel="neurons",
                  title="categories per neuron")
        right.legend()
    return Path(out)
