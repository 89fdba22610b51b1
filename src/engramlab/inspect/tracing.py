"""Causal tracing: which hidden states carry a fact from the subject to the answer.

Meng et al. 2022, "Locating and Editing Factual Associations in GPT" (ROME), §2.1 and fig. 1.
Three runs of a prompt whose next token is a fact's answer:

* **clean**: the model as it is; the answer's probability ``p_clean``;
* **corrupted**: Gaussian noise added to the subject tokens' embeddings (standard deviation
  ``noise`` × the standard deviation of subject-token embeddings, 3 in the paper), so the model
  no longer knows what the subject is; ``p_low``, averaged over ``samples`` noise draws;
* **restored**: the corrupted run with one state put back to its clean value: the residual
  stream after block ℓ at token t, or the MLP / attention outputs of a window of ``window``
  blocks centred on ℓ at token t (10 in the paper). How much of the answer's probability that
  one state brings back is its causal effect.

The paper finds, in GPT-2 XL, a peak of the MLP effect at the subject's last token in the middle
layers (where ROME then edits) and a peak of the attention effect at the prompt's last token in
late layers. :func:`trace_facts` averages the grids over facts on the paper's token groups.

Deviations: the grids are shares of the clean probability (``p_restored / p_clean``), per fact,
and averaged with each fact weighted alike (the paper plots raw probabilities and averages the
indirect effect ``p_restored − p_low``, which the report also gives); states at tokens before the
subject are not run, because the noise cannot reach them: their restored value is exactly the
corrupted one. The noise scale is measured on the subjects of the facts being traced rather
than on a fixed list. The MLP state is the output of the MLP's value projection (what the MLP
writes); the attention state is the attention module's output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..batching import target_ids
from ..data.records import Fact
from ..edit.prompts import encode_with_subject
from ..errors import SettingsError
from ..models.lm import LM
from ..trace import EditFn, Trace, run_model

# restorable states: their name in reports -> their hook point kind
STATES = {"resid": "resid", "mlp": "mlp_out", "attn": "attn_out"}
GROUPS = ("first subject", "middle subject", "last subject", "first after", "further", "last")


@dataclass
class TraceConfig:
    """Settings of a trace (defaults: the paper's)."""

    samples: int = 10  # noise draws per state
    noise: float = 3.0  # noise standard deviation, in standard deviations of subject embeddings
    window: int = 10  # MLP / attention blocks restored together, centred on the layer
    states: tuple[str, ...] = tuple(STATES)
    rows: int = 512  # rows per forward (states × samples)
    seed: int = 0

    def check(self) -> None:
        if self.samples < 1 or self.window < 1 or self.rows < 1:
            raise SettingsError("samples, window and rows must each be at least 1")
        if not self.noise >= 0:  # NaN fails too
            raise SettingsError(f"noise must be a number ≥ 0, got {self.noise}")
        unknown = set(self.states) - set(STATES)
        if unknown or not self.states:
            raise SettingsError(f"unknown states {sorted(unknown)}; choose from {list(STATES)}")


@dataclass
class FactTrace:
    """One fact's grids: ``grids[state]`` is ``[n_layers, n_tokens]``, the restored answer
    probability as a share of the clean one (``low`` where a state cannot matter)."""

    fact: Fact
    tokens: list[str]
    subject: tuple[int, int]  # token range [start, end)
    answer: str
    answer_id: int
    known: bool | None  # the model's answer is the fact's (None: the fact gives none)
    p_clean: float
    p_low: float
    grids: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def low(self) -> float:
        return self.p_low / self.p_clean

    def groups(self) -> dict[str, list[int]]:
        """The token positions of each of the paper's groups (empty when a prompt has none)."""
        start, end = self.subject
        last = len(self.tokens) - 1
        after = list(range(end, last))
        return {"first subject": [start], "middle subject": list(range(start + 1, end - 1)),
                "last subject": [end - 1], "first after": after[:1], "further": after[1:],
                "last": [last]}

    def grouped(self, state: str) -> torch.Tensor:
        """``[n_layers, 6]``: the grid averaged over each group's tokens (NaN: no such token)."""
        grid = self.grids[state]
        cols = [grid[:, pos].mean(1) if pos else torch.full((grid.shape[0],), torch.nan)
                for pos in self.groups().values()]
        return torch.stack(cols, 1)

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.fact.text, "subject": self.fact.subject, "tokens": self.tokens,
                "subject_range": list(self.subject), "answer": self.answer,
                "known": self.known, "p_clean": self.p_clean, "p_low": self.p_low,
                "grids": {s: g.tolist() for s, g in self.grids.items()}}


def subject_embedding_std(lm: LM, facts: Sequence[Fact]) -> float:
    """The standard deviation of the input embeddings over every subject token of ``facts``."""
    values = []
    with torch.no_grad(), Trace(lm).capture("embed") as tr:
        for fact in facts:
            enc = encode_with_subject(lm, "{}", fact.prompt, fact.subject, fact.fact_id)
            run_model(lm, torch.tensor([enc.ids], device=lm.device), stop_after=0)
            values.append(tr["embed"][0, enc.subject].float().flatten())
    return float(torch.cat(values).std())


def _window(layer: int, n_layers: int, window: int) -> range:
    """The paper's window of ``window`` blocks around ``layer`` (clipped at the ends)."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def _restore(clean: torch.Tensor, mask: torch.Tensor) -> EditFn:
    def fn(t: torch.Tensor) -> torch.Tensor:
        return torch.where(mask[..., None], clean.to(t.dtype).expand_as(t), t)

    return fn


def _corrupt(noise: torch.Tensor, start: int, end: int) -> EditFn:
    def fn(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        reps = t.shape[0] // noise.shape[0]
        t[:, start:end] += noise.repeat(reps, 1, 1).to(t.dtype)
        return t

    return fn


def _chunks(first: Sequence[int], size: int) -> list[list[int]]:
    """Jobs grouped by the first block they restore (at most ``size`` a group): a group's
    pass starts at that block, so the work falls with the layer instead of running every
    block for every state."""
    out: list[list[int]] = []
    for j in sorted(range(len(first)), key=first.__getitem__):
        if not out or first[out[-1][0]] != first[j] or len(out[-1]) == size:
            out.append([])
        out[-1].append(j)
    return out


def _answer_prob(lm: LM, final: torch.Tensor, answer_id: int) -> torch.Tensor:
    """The answer's probability after each row's last token, from the last block's output."""
    return torch.softmax(lm.logits_from_hidden(final[:, -1]).float(), -1)[:, answer_id]


def _restore_masks(jobs: Sequence[tuple[str, int, int]], rows: int, n_tok: int,
                   n_layers: int, config: TraceConfig, device: torch.device
                   ) -> dict[str, torch.Tensor]:
    """Per hook point, where (row, token) gets its clean value: job k owns rows
    ``k·samples … (k+1)·samples − 1``, and restores its token at its layer (``resid``) or at
    every layer of its window (``mlp``, ``attn``)."""
    masks: dict[str, torch.Tensor] = {}
    for k, (state, layer, t) in enumerate(jobs):
        layers = [layer] if state == "resid" else _window(layer, n_layers, config.window)
        for j in layers:
            point = f"{STATES[state]}.{j}"
            if point not in masks:
                masks[point] = torch.zeros(rows, n_tok, dtype=torch.bool, device=device)
            masks[point][k * config.samples:(k + 1) * config.samples, t] = True
    return masks


@torch.no_grad()
def trace_fact(lm: LM, fact: Fact, noise_std: float, config: TraceConfig | None = None, *,
               progress: bool = False) -> FactTrace:
    """Restore every state of every kind in ``config.states`` at every layer and every token
    from the subject on, and read the answer's probability (see the module docstring)."""
    config = config or TraceConfig()
    config.check()
    n_layers, last = lm.n_layers, f"resid.{lm.n_layers - 1}"
    enc = encode_with_subject(lm, "{}", fact.prompt, fact.subject, fact.fact_id)
    ids = torch.tensor([enc.ids], device=lm.device)
    n_tok, start, end = len(enc.ids), enc.subject[0], enc.subject[-1] + 1
    points = [f"{STATES[s]}.{i}" for s in config.states for i in range(n_layers)]
    with Trace(lm).capture(*dict.fromkeys([*points, last])) as tr:
        run_model(lm, ids)
    clean = dict(tr.cache)
    probs = torch.softmax(lm.logits_from_hidden(clean[last][0, -1]).float(), -1)
    answer_id = int(probs.argmax())
    known = None
    if fact.answer is not None:
        known = answer_id == target_ids(lm, fact.text, fact.answer)[0]
    gen = torch.Generator().manual_seed(config.seed)
    noise = torch.randn(config.samples, end - start, lm.d_model, generator=gen)
    noise = (noise * config.noise * noise_std).to(lm.device)
    corrupt = _corrupt(noise, start, end)
    # the corrupted run, each noise draw once; every block's output is kept, because a pass
    # that restores nothing below block ℓ is this run up to ℓ and can start there
    resid = [f"resid.{i}" for i in range(n_layers)]
    with Trace(lm).edit("embed", corrupt).capture(*resid) as bad:
        run_model(lm, ids.expand(config.samples, -1))
    p_low = float(_answer_prob(lm, bad[last], answer_id).mean())

    jobs = [(s, layer, t) for s in config.states for layer in range(n_layers)
            for t in range(start, n_tok)]
    first = [layer if s == "resid" else _window(layer, n_layers, config.window).start
             for s, layer, _ in jobs]
    from tqdm.auto import tqdm

    p_all = torch.empty(len(jobs))
    chunks = _chunks(first, max(1, config.rows // config.samples))
    for chunk in tqdm(chunks, desc="restored states", unit="pass", leave=False,
                      disable=not progress):
        rows = len(chunk) * config.samples
        run = Trace(lm).capture(last)
        for point, mask in _restore_masks([jobs[j] for j in chunk], rows, n_tok, n_layers,
                                          config, lm.device).items():
            run.edit(point, _restore(clean[point], mask))
        begin = first[chunk[0]]
        if begin == 0:
            run.edit("embed", corrupt)
            began = None
        else:
            began = (begin, bad[f"resid.{begin - 1}"].repeat(len(chunk), 1, 1))
        with run:
            run_model(lm, ids.expand(rows, -1), start=began)
        probs_k = _answer_prob(lm, run[last], answer_id).view(len(chunk), config.samples)
        p_all[chunk] = probs_k.mean(1).cpu()
    p_clean = float(probs[answer_id])
    grids = {}
    per_state = n_layers * (n_tok - start)
    for k, state in enumerate(config.states):
        grid = torch.full((n_layers, n_tok), p_low)
        grid[:, start:] = p_all[k * per_state:(k + 1) * per_state].view(n_layers, n_tok - start)
        grids[state] = grid / p_clean
    tokens = [lm.tokenizer.decode([i]) for i in enc.ids]
    return FactTrace(fact, tokens, (start, end), lm.tokenizer.decode([answer_id]), answer_id,
                     known, p_clean, p_low, grids)


@dataclass
class TraceReport:
    """The average over traced facts, on the paper's token groups."""

    model: str
    config: TraceConfig
    noise_std: float
    facts: list[FactTrace]
    n_given: int

    def average(self, state: str) -> torch.Tensor:
        """``[n_layers, 6]``: each group's share of the clean probability, mean over facts."""
        stacked = torch.stack([f.grouped(state) for f in self.facts])
        return stacked.nanmean(0)

    def peak_interval(self, state: str, group: int, *, n: int = 1000, seed: int = 0
                      ) -> list[int] | None:
        """95 % bootstrap interval of a group's peak layer, resampling the facts (None for a
        single fact)."""
        if len(self.facts) < 2:
            return None
        col = torch.stack([f.grouped(state)[:, group] for f in self.facts])  # [facts, layers]
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randint(len(self.facts), (n, len(self.facts)), generator=gen)
        means = torch.nan_to_num(col[idx].nanmean(1), nan=-torch.inf)
        peaks = means.argmax(1).float()
        return [int(peaks.quantile(0.025)), int(peaks.quantile(0.975))]

    def summary(self, state: str) -> dict[str, Any]:
        grid = self.average(state)
        low = sum(f.low for f in self.facts) / len(self.facts)
        effect = torch.nan_to_num(grid - low, nan=-torch.inf)
        flat = int(effect.argmax())
        layer, group = divmod(flat, grid.shape[1])
        by_group = {}
        for g, name in enumerate(GROUPS):
            col = effect[:, g]
            if torch.isfinite(col).any():
                by_group[name] = {"peak_layer": int(col.argmax()),
                                  "peak_recovery": float(grid[int(col.argmax()), g]),
                                  "peak_layer_ci95": self.peak_interval(state, g)}
        return {"grid": [[None if v != v else round(float(v), 4) for v in row]
                         for row in grid.tolist()],
                "low": low, "peak_layer": layer, "peak_position": GROUPS[group],
                "peak_recovery": float(grid[layer, group]),
                "peak_indirect_effect": float(grid[layer, group]) - low, "by_group": by_group}

    def to_json(self, *, per_fact: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.model, "n": len(self.facts), "given": self.n_given,
            "groups": list(GROUPS), "noise_std": self.noise_std,
            "config": {"samples": self.config.samples, "noise": self.config.noise,
                       "window": self.config.window, "seed": self.config.seed},
            "states": {s: self.summary(s) for s in self.config.states}}
        if per_fact:
            out["facts"] = [f.to_json() for f in self.facts]
        return out

    def lines(self) -> list[str]:
        """The peaks as text, one line per state and the two groups the paper discusses."""
        out = [f"{self.model}: causal tracing of {len(self.facts)} facts "
               f"({self.config.samples} noise draws, noise {self.config.noise} × "
               f"{self.noise_std:.4f})"]
        for s in self.config.states:
            sm = self.summary(s)
            out.append(f"{s:<6} corrupted {sm['low']:.2f} of the clean probability; peak "
                       f"{sm['peak_recovery']:.2f} at layer {sm['peak_layer']}, "
                       f"{sm['peak_position']}")
            for g in ("last subject", "last"):
                if g in sm["by_group"]:
                    b = sm["by_group"][g]
                    out.append(f"       {g:<13} peak {b['peak_recovery']:.2f} at layer "
                               f"{b['peak_layer']}")
        return out


def trace_facts(lm: LM, facts: Sequence[Fact], config: TraceConfig | None = None, *,
                known_only: bool = True, progress: bool = False) -> TraceReport:
    """Trace every fact (those the model answers as given, with ``known_only``) and average."""
    from tqdm.auto import tqdm

    config = config or TraceConfig()
    config.check()
    if not facts:
        raise SettingsError("no facts to trace; give a facts file with at least one fact")
    noise_std = subject_embedding_std(lm, facts)
    traces = []
    for fact in tqdm(facts, desc="causal tracing", unit="fact", disable=not progress):
        tr = trace_fact(lm, fact, noise_std, config, progress=progress)
        if tr.known is not False or not known_only:
            traces.append(tr)
    if not traces:
        raise SettingsError(f"the model answers none of the {len(facts)} facts as given; "
                            "trace them anyway with known_only=False (--all)")
    return TraceReport(lm.name, config, noise_std, traces, len(facts))


_CMAPS = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}


def _heatmap(fig: Any, ax: Any, grid: torch.Tensor, labels: Sequence[str], state: str,
             window: int, title: str) -> None:
    img = ax.imshow(grid.T.numpy(), aspect="auto", cmap=_CMAPS[state], vmin=0,
                    interpolation="nearest")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    what = "restored layer" if state == "resid" else f"centre of {window} restored layers"
    ax.set(xlabel=what, title=title)
    fig.colorbar(img, ax=ax, label="share of p(answer) restored")


def plot_trace(report: TraceReport, out: str | Path, title: str = "") -> Path:
    """One panel per state: the average over facts, layers × the paper's token groups."""
    from ..figures import figure

    states = report.config.states
    with figure(out, ncols=len(states), figsize=(4.6 * len(states), 3.2)) as (fig, axes):
        axes = axes if len(states) > 1 else [axes]
        for ax, state in zip(axes, states, strict=True):
            _heatmap(fig, ax, report.average(state), GROUPS, state, report.config.window,
                     f"{state} ({len(report.facts)} facts)")
        fig.suptitle(title or f"{report.model}: causal tracing")
    return Path(out)


def plot_fact(trace: FactTrace, out: str | Path, window: int, title: str = "") -> Path:
    """One panel per state for one fact, its tokens as rows (subject tokens starred)."""
    from ..figures import figure

    labels = [repr(t)[1:-1] + ("*" if trace.subject[0] <= i < trace.subject[1] else "")
              for i, t in enumerate(trace.tokens)]
    states = list(trace.grids)
    with figure(out, ncols=len(states), figsize=(4.6 * len(states), 0.3 * len(labels) + 1.6)
                ) as (fig, axes):
        axes = axes if len(states) > 1 else [axes]
        for ax, state in zip(axes, states, strict=True):
            _heatmap(fig, ax, trace.grids[state], labels, state, window, state)
        fig.suptitle(title or f"{trace.fact.text} → {trace.answer.strip()} "
                              f"(p = {trace.p_clean:.2f}, corrupted {trace.p_low:.2f})")
    return Path(out)
