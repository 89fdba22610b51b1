"""Reasoning–memorisation directions: one residual-stream direction that tells reasoning inputs
from memory recall, and what steering along it does to each.

After Hong, Zhou, Cao, Yu & Jin, "The Reasoning-Memorization Interplay in Language Models Is
Mediated by a Single Direction" (ACL Findings 2025). Their linear reasoning feature at layer l
is the difference of means of the residual stream at the last input token (the input of block
l) between reasoning-heavy and memory-heavy questions; its unit vector r̂ is then applied at
every layer — to each block's input and to each attention and MLP output, at every position —
as ``x ← x + α (x·r̂) r̂``. Amplifying (α > 0) helps reasoning tasks; α = −1 removes the
direction everywhere (directional ablation).

Here:

* **Inputs.** Reasoning tasks are generated with their answers: two-digit addition and
  subtraction, one-digit multiplication, a three-number chain (``7 + 5 - 3``) and one- and
  two-step word problems. Recall tasks are facts (the bundled ones, or any fact file; concept
  probes can be added). Every task is written ``Q: <question>\nA:`` after three solved examples
  of its own kind that are not tasks themselves, so both families share one format and end on
  the same token: the input of block 0 at the last position is the same for every task, and
  whatever separates the families later comes from the question, not from its last word.
* **No figure on what chose anything.** Each family is split (per kind, seeded) into a tuning
  half and a held-out half. The directions, the separation threshold and the steering layer
  are computed on the tuning half; separation (AUROC and threshold accuracy per layer) and every
  steered accuracy are read on the held-out half, with 95 % bootstrap intervals over tasks and,
  for each change, a paired interval over the same tasks unsteered.
* **Scoring.** A task is solved when every token of its answer is the teacher-forced arg-max
  (exact match of the greedy answer).
* **Steering.** ``mode="scale"`` is the paper's intervention with the chosen layer's direction.
  ``mode="add"`` adds α times the (unnormalised) difference of means at the chosen layer's input
  only, at every position: α = 1 moves a recall input's mean onto the reasoning mean there (the
  activation addition of Turner et al. 2023 / Arditi et al. 2024).

Deviations: the paper splits MMLU-Pro questions by an annotated reasoning/memory score and
evaluates on GSM8K, MGSM, PopQA and C-Eval with chain-of-thought generation; a 135M model
solves none of those, so the tasks here are short, generated and scored on the answer tokens.
The paper reports a layer sweep; here one layer is chosen on the tuning half (the largest
Fisher ratio of the projected tuning states, or ``layer=``), so the reported figures are not a
maximum over layers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..batching import encode_prompts, length_mask
from ..data.concepts import Concept
from ..data.records import Fact
from ..errors import SettingsError
from ..evaluate.bootstrap import bootstrap_interval
from ..evaluate.scoring import score_targets
from ..models.lm import LM
from ..trace import Trace, run_model

FAMILIES = ("reasoning", "recall")
MODES = ("scale", "add")
#: α values that neither leave the model untouched nor wreck it on SmolLM2 (the paper's default
#: scale is 0.1; for ``add``, α = ±1 already costs both families most of their accuracy there).
DEFAULT_ALPHAS = {"scale": (-1.0, -0.1, 0.0, 0.05, 0.1), "add": (-0.5, -0.25, 0.0, 0.25, 0.5)}
SHOTS = 3
_NAMES = ("Tom", "Anna", "Sam", "Maria", "Ben", "Lena", "Omar", "Yuki")
_ITEMS = ("apples", "books", "coins", "marbles", "stamps", "pencils")


@dataclass(frozen=True)
class Task:
    """A prompt whose answer is known, of one ``kind`` (a reasoning template or a recall
    source)."""

    prompt: str
    answer: str
    kind: str


def _add(r: random.Random) -> tuple[str, int]:
    a, b = r.randint(10, 49), r.randint(10, 49)
    return f"{a} + {b} =", a + b


def _subtract(r: random.Random) -> tuple[str, int]:
    a, b = r.randint(10, 49), r.randint(10, 49)
    return f"{a + b} - {b} =", a


def _multiply(r: random.Random) -> tuple[str, int]:
    a, b = r.randint(2, 9), r.randint(2, 9)
    return f"{a} * {b} =", a * b


def _chain(r: random.Random) -> tuple[str, int]:
    a, b, c = r.randint(2, 9), r.randint(2, 9), r.randint(1, 9)
    return f"{a} + {b} - {c} =", a + b - c


def _word(r: random.Random) -> tuple[str, int]:
    a, b, n, item = r.randint(2, 9), r.randint(2, 9), r.choice(_NAMES), r.choice(_ITEMS)
    return f"{n} had {a} {item} and got {b} more. Now {n} has", a + b


def _word2(r: random.Random) -> tuple[str, int]:
    a, b, c = r.randint(4, 9), r.randint(2, 9), r.randint(1, 3)
    n, item = r.choice(_NAMES), r.choice(_ITEMS)
    return f"{n} had {a} {item}, got {b} more and gave {c} away. Now {n} has", a + b - c


#: Reasoning templates: each draws a prompt and its integer answer.
REASONING_KINDS: dict[str, Callable[[random.Random], tuple[str, int]]] = {
    "add": _add, "subtract": _subtract, "multiply": _multiply, "chain": _chain,
    "word": _word, "word2": _word2,
}


def _with_shots(question: str, shots: Sequence[tuple[str, str]]) -> str:
    """``question`` as the last of a short list of solved ones, all in one Q/A format."""
    return "".join(f"Q: {q}\nA: {a}\n" for q, a in shots) + f"Q: {question}\nA:"


def reasoning_tasks(n_per_kind: int = 24, *, seed: int = 0,
                    kinds: Sequence[str] | None = None) -> list[Task]:
    """``n_per_kind`` distinct tasks of each reasoning template, each after :data:`SHOTS`
    solved examples of its template that are not among the tasks."""
    kinds = list(kinds or REASONING_KINDS)
    unknown = sorted(set(kinds) - set(REASONING_KINDS))
    if unknown:
        raise SettingsError(f"unknown reasoning kinds {unknown}; choose from "
                            f"{list(REASONING_KINDS)}")
    if n_per_kind < 1:
        raise SettingsError(f"n_per_kind must be at least 1, got {n_per_kind}")
    out = []
    for kind in kinds:
        r = random.Random(f"{kind}\x00{seed}")
        drawn: dict[str, str] = {}
        for _ in range(50 * (n_per_kind + SHOTS)):
            prompt, answer = REASONING_KINDS[kind](r)
            drawn.setdefault(prompt, str(answer))
            if len(drawn) == n_per_kind + SHOTS:
                break
        else:
            raise SettingsError(f"the {kind!r} template has fewer than {n_per_kind + SHOTS} "
                                "distinct tasks; ask for fewer")
        items = list(drawn.items())
        shots = items[:SHOTS]
        out += [Task(_with_shots(p, shots), a, kind) for p, a in items[SHOTS:]]
    return out


def recall_tasks(facts: Sequence[Fact] = (), concepts: Sequence[Concept] = ()) -> list[Task]:
    """Facts (kind ``facts``) and concept probes (kind ``concepts``) as recall tasks, each after
    the first :data:`SHOTS` of its source, which are not tasks themselves."""
    sources = {"facts": [(f.text, f.answer) for f in facts if f.answer],
               "concepts": [(p.prompt, p.answer) for c in concepts for p in c.probes]}
    out = []
    for kind, pairs in sources.items():
        if len(pairs) <= SHOTS:
            continue
        shots = [(p, a.strip()) for p, a in pairs[:SHOTS]]
        out += [Task(_with_shots(p, shots), a.strip(), kind) for p, a in pairs[SHOTS:]]
    return out


def split_tasks(tasks: Sequence[Task], seed: int = 0, tune_share: float = 0.5
                ) -> tuple[list[Task], list[Task]]:
    """A seeded ``tune_share`` of each kind for tuning, the rest held out (both in input
    order)."""
    tune_idx: set[int] = set()
    by_kind: dict[str, list[int]] = {}
    for i, t in enumerate(tasks):
        by_kind.setdefault(t.kind, []).append(i)
    for kind, idx in by_kind.items():
        if len(idx) < 2:
            raise SettingsError(f"kind {kind!r} has {len(idx)} task(s); splitting needs 2")
        order = idx[:]
        random.Random(f"{kind}\x00{seed}").shuffle(order)
        k = min(len(idx) - 1, max(1, round(len(idx) * tune_share)))
        tune_idx.update(order[:k])
    return ([t for i, t in enumerate(tasks) if i in tune_idx],
            [t for i, t in enumerate(tasks) if i not in tune_idx])


def _inputs(lm: LM) -> list[str]:
    """The hook points whose values enter blocks 0 .. n-1, then the last block's output."""
    return ["embed", *(f"resid.{i}" for i in range(lm.n_layers))]


@torch.no_grad()
def last_states(lm: LM, prompts: Sequence[str], *, batch_size: int = 32) -> torch.Tensor:
    """Residual stream at each prompt's last token, ``[n_layers + 1, n, d_model]`` (float32):
    row ``l < n_layers`` is the input of block ``l``, the last row the final block's output."""
    if not prompts:
        raise SettingsError("no prompts to read states from")
    points = _inputs(lm)
    out = []
    for start in range(0, len(prompts), batch_size):
        ids, lengths = encode_prompts(lm, prompts[start:start + batch_size])
        mask = length_mask(ids, lengths).long()
        with Trace(lm).capture(*points) as tr:
            run_model(lm, ids, mask)
        rows = torch.arange(ids.shape[0], device=ids.device)
        out.append(torch.stack([tr[p][rows, lengths - 1].float().cpu() for p in points]))
    return torch.cat(out, dim=1)


def mean_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per layer, mean of ``a`` minus mean of ``b`` over their examples (``[layers, n, d]``
    each), in float64 as the reference keeps it."""
    return a.double().mean(1) - b.double().mean(1)


def auroc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """Probability that a random ``pos`` scores above a random ``neg`` (ties count half)."""
    if not pos or not neg:
        return math.nan
    p, n = torch.tensor(pos, dtype=torch.float64), torch.tensor(neg, dtype=torch.float64)
    greater = (p[:, None] > n[None]).double().sum() + 0.5 * (p[:, None] == n[None]).double().sum()
    return float(greater / (len(pos) * len(neg)))


def fisher_ratio(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """(mean gap)² over the mean of the two variances: how far apart two 1-d samples lie
    (its square root is Cohen's d)."""
    spread = (pos.var() + neg.var()) / 2
    gap = (pos.mean() - neg.mean()) ** 2
    return float(gap / spread) if spread > 0 else math.inf


@contextmanager
def steered(lm: LM, direction: torch.Tensor, alpha: float, *, mode: str = "scale",
            layer: int = 0) -> Iterator[None]:
    """Steer every forward inside the block along ``direction`` (``[d_model]``).

    ``scale``: ``x ← x + α (x·r̂) r̂`` with r̂ the unit direction, at every block's input and
    every attention and MLP output, all positions (α = −1 ablates the direction).
    ``add``: ``x ← x + α · direction`` at the input of block ``layer``, all positions."""
    if not math.isfinite(alpha):
        raise SettingsError(f"alpha must be a finite number, got {alpha}")
    if mode not in MODES:
        raise SettingsError(f"unknown steering mode {mode!r}; choose from {list(MODES)}")
    if not 0 <= layer < lm.n_layers:
        raise SettingsError(f"layer {layer} out of range for a {lm.n_layers}-layer model "
                            f"(0..{lm.n_layers - 1})")
    tr = Trace(lm)
    if mode == "add":
        shift = alpha * direction.float()
        tr.edit(_inputs(lm)[layer], lambda t: t + shift.to(t.device, t.dtype))
    else:
        unit = direction.double() / direction.double().norm().clamp_min(1e-12)

        def scale(t: torch.Tensor) -> torch.Tensor:
            r = unit.to(t.device, t.dtype)
            return t + alpha * (t @ r).unsqueeze(-1) * r

        blocks = _inputs(lm)[:lm.n_layers]
        for point in [*blocks, *(f"{k}.{i}" for k in ("attn_out", "mlp_out")
                                  for i in range(lm.n_layers))]:
            tr.edit(point, scale)
    with tr:
        yield


def solved(lm: LM, tasks: Sequence[Task], *, batch_size: int = 32) -> list[bool]:
    """Whether each task's whole answer is the teacher-forced arg-max."""
    scores = score_targets(lm, [t.prompt for t in tasks], [t.answer for t in tasks],
                           batch_size=batch_size)
    return [all(s.correct) for s in scores]


def _interval(values: Sequence[float], seed: int) -> list[float] | None:
    ci = bootstrap_interval(values, seed=seed)
    return None if ci is None else [ci[0], ci[1]]


@dataclass(frozen=True)
class DirectionsConfig:
    """What :func:`reasoning_directions` measures: the split, the steering layer (``None``:
    chosen on the tuning half), the mode and the α values (α = 0, the unsteered base, is
    measured whether listed or not)."""

    split_seed: int = 0
    tune_share: float = 0.5
    layer: int | None = None
    mode: str = "scale"
    alphas: tuple[float, ...] = DEFAULT_ALPHAS["scale"]
    seed: int = 0  # bootstrap

    def check(self, n_layers: int | None = None) -> None:
        if self.mode not in MODES:
            raise SettingsError(f"unknown steering mode {self.mode!r}; choose from {list(MODES)}")
        bad = [a for a in self.alphas if not math.isfinite(a)]
        if bad or not self.alphas:
            raise SettingsError(f"alphas must be finite numbers (got {list(self.alphas)})")
        if not 0 < self.tune_share < 1:
            raise SettingsError(f"tune_share must lie strictly between 0 and 1, "
                                f"got {self.tune_share}")
        if n_layers is not None and self.layer is not None \
                and not 0 <= self.layer < n_layers:
            raise SettingsError(f"layer {self.layer} out of range for a {n_layers}-layer "
                                f"model (0..{n_layers - 1})")


@dataclass
class DirectionsReport:
    """Separation per layer (held-out), the steering layer (chosen on the tuning half) and
    accuracy on the held-out tasks at each α."""

    counts: dict[str, dict[str, int]]  # family -> {"tune": n, "held": n}
    separation: list[dict[str, float]]  # per layer: auroc, accuracy (held-out), fisher (tune)
    layer: int
    layer_chosen_on: str
    mode: str
    steering: list[dict[str, Any]]  # per alpha
    direction_norms: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"counts": self.counts, "separation": self.separation, "layer": self.layer,
                "layer_chosen_on": self.layer_chosen_on, "mode": self.mode,
                "steering": self.steering, "direction_norms": self.direction_norms,
                "splits": {"directions, threshold, layer": "tune",
                           "separation, steering accuracies": "held-out"}}

    def best_separation(self) -> dict[str, float]:
        return max(self.separation, key=lambda s: s["cohens_d"])

    def lines(self) -> list[str]:
        c = self.counts
        sep = self.separation[self.layer]
        best = self.best_separation()
        out = [f"reasoning vs recall: {c['reasoning']['tune']} + {c['recall']['tune']} tuning "
               f"tasks, {c['reasoning']['held']} + {c['recall']['held']} held out",
               f"held-out separation at the steering layer {self.layer} "
               f"({self.layer_chosen_on}): AUROC {sep['auroc']:.3f}, threshold accuracy "
               f"{sep['accuracy']:.3f}, Cohen's d {sep['cohens_d']:.1f}; largest d at layer "
               f"{int(best['layer'])}: {best['cohens_d']:.1f}",
               f"steering ({self.mode}), held-out accuracy [95 % interval]; change from α = 0 "
               "[paired interval]:",
               f"{'alpha':>7}  {'reasoning':<30}{'recall':<30}"]
        for row in self.steering:
            cells = []
            for fam in FAMILIES:
                r = row[fam]
                ci = r["interval"] or [math.nan, math.nan]
                ch = r["change_interval"] or [math.nan, math.nan]
                cells.append(f"{r['accuracy']:.3f} [{ci[0]:.2f}, {ci[1]:.2f}] "
                             f"{r['change']:+.3f}".ljust(24) + f"[{ch[0]:+.2f},{ch[1]:+.2f}]"
                             .ljust(6))
            out.append(f"{row['alpha']:>7g}  " + "  ".join(cells))
        return out


def _separation(direction: torch.Tensor, tune: tuple[torch.Tensor, torch.Tensor],
                held: tuple[torch.Tensor, torch.Tensor], layer: int) -> dict[str, float]:
    unit = direction / direction.norm().clamp_min(1e-12)
    tr, tm = (s.double() @ unit for s in tune)
    hr, hm = (s.double() @ unit for s in held)
    threshold = float((tr.mean() + tm.mean()) / 2)
    right = int((hr > threshold).sum()) + int((hm <= threshold).sum())
    return {"layer": layer, "auroc": auroc(hr.tolist(), hm.tolist()),
            "accuracy": right / (len(hr) + len(hm)), "fisher_tune": fisher_ratio(tr, tm),
            "cohens_d": math.copysign(math.sqrt(fisher_ratio(hr, hm)),
                                      float(hr.mean() - hm.mean()))}


def reasoning_directions(lm: LM, reasoning: Sequence[Task], recall: Sequence[Task],
                         config: DirectionsConfig | None = None, *, batch_size: int = 32,
                         progress: bool = False) -> DirectionsReport:
    """Directions on the tuning half, separation and steering on the held-out half (see the
    module docstring)."""
    from tqdm.auto import tqdm

    config = config or DirectionsConfig()
    config.check(lm.n_layers)
    if not reasoning or not recall:
        raise SettingsError("need both reasoning and recall tasks")
    parts = {"reasoning": split_tasks(reasoning, config.split_seed, config.tune_share),
             "recall": split_tasks(recall, config.split_seed, config.tune_share)}
    states = {}
    # one step per pass over one family's tasks: states of each half, then each α
    # α = 0 is always run, first: every change is read against it
    alphas = sorted({0.0, *config.alphas}, key=lambda a: (a != 0, a))
    bar = tqdm(total=2 * (2 + len(alphas)), desc="reasoning directions", unit="pass",
               disable=not progress)
    for which, i in (("tune", 0), ("held", 1)):
        for fam in FAMILIES:
            states[fam, which] = last_states(lm, [t.prompt for t in parts[fam][i]],
                                             batch_size=batch_size)
            bar.update()
    dirs = mean_difference(states["reasoning", "tune"], states["recall", "tune"])
    separation = [_separation(dirs[lay], (states["reasoning", "tune"][lay],
                                          states["recall", "tune"][lay]),
                              (states["reasoning", "held"][lay], states["recall", "held"][lay]),
                              lay)
                  for lay in range(lm.n_layers)]
    if config.layer is None:
        # block 0's input is the token embeddings: what the words are, not what answering takes
        layer = max(range(1, lm.n_layers), key=lambda k: separation[k]["fisher_tune"])
        chosen_on = "largest tuning-half Fisher ratio"
    else:
        layer, chosen_on = config.layer, "given"
    base: dict[str, list[bool]] = {}
    steering = []
    for alpha in alphas:
        row: dict[str, Any] = {"alpha": alpha}
        with steered(lm, dirs[layer], alpha, mode=config.mode, layer=layer):
            for fam in FAMILIES:
                hits = solved(lm, parts[fam][1], batch_size=batch_size)
                if alpha == 0:
                    base[fam] = hits
                diffs = [float(h) - float(b) for h, b in zip(hits, base[fam], strict=True)]
                row[fam] = {"accuracy": sum(hits) / len(hits),
                            "interval": _interval([float(h) for h in hits], config.seed),
                            "change": sum(diffs) / len(diffs),
                            "change_interval": _interval(diffs, config.seed),
                            "by_kind": _by_kind(parts[fam][1], hits)}
                bar.update()
        steering.append(row)
    bar.close()
    steering.sort(key=lambda r: r["alpha"])
    counts = {fam: {"tune": len(parts[fam][0]), "held": len(parts[fam][1])} for fam in FAMILIES}
    return DirectionsReport(counts, separation, layer, chosen_on, config.mode, steering,
                            [float(d.norm()) for d in dirs[:lm.n_layers]])


def _by_kind(tasks: Sequence[Task], hits: Sequence[bool]) -> dict[str, float]:
    tally: dict[str, list[int]] = {}
    for t, h in zip(tasks, hits, strict=True):
        tally.setdefault(t.kind, []).append(int(h))
    return {k: sum(v) / len(v) for k, v in tally.items()}


def plot_directions(report: DirectionsReport, out: str | Path, title: str = "") -> Path:
    """Left: held-out separation per layer, as Cohen's d of the projections (AUROC saturates
    at 1 once the families are apart at all), the steering layer marked. Right: held-out
    accuracy of each family against α, with 95 % intervals."""
    from ..figures import figure

    with figure(out, ncols=2, figsize=(10, 4)) as (_, (left, right)):
        layers = [s["layer"] for s in report.separation]
        left.plot(layers, [s["cohens_d"] for s in report.separation], marker=".")
        left.axvline(report.layer, color="grey", ls="--", lw=0.8)
        left.set(xlabel="layer (block input)", ylabel="held-out Cohen's d",
                 title="reasoning vs recall along the direction")
        alphas = [r["alpha"] for r in report.steering]
        for fam in FAMILIES:
            acc = [r[fam]["accuracy"] for r in report.steering]
            lo = [a - (r[fam]["interval"] or [a, a])[0] for a, r in zip(acc, report.steering,
                                                                       strict=True)]
            hi = [(r[fam]["interval"] or [a, a])[1] - a for a, r in zip(acc, report.steering,
                                                                       strict=True)]
            right.errorbar(alphas, acc, yerr=[lo, hi], marker="o", capsize=3, label=fam)
        right.set(xlabel=f"α ({report.mode}, layer {report.layer})",
                  ylabel="held-out accuracy", title=title or "steering")
        right.legend()
    return Path(out)
