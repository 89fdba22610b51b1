"""Target values: the vector an edited layer must write so the model says ``target_new``.

ROME (Meng et al. 2022, eq. 4) and MEMIT (Meng et al. 2023, eq. 16) find it by gradient descent
on a vector δ added at the subject's last token — to the MLP output of the edited layer (ROME)
or to the residual stream after the last edited layer (MEMIT, AlphaEdit) — minimising

    mean over context templates of  −mean_t log P(target token t | template + prompt + target<t)
    + kl_factor · KL(P_orig ‖ P_δ) on "{subject} is a"      (keeps the subject's "essence")
    + weight_decay · ‖δ‖ / ‖v_orig‖²

with ‖δ‖ clamped to ``clamp · ‖v_orig‖`` after every Adam step, and early stopping once a
request's target NLL + KL term drops below 0.05.

All requests of a call are optimised **together**: one padded batch holds every request's
templates and KL prompt, each request has its own row of δ, and the loss is the sum of the
per-request losses. Adam is element-wise and the rows never mix, so each request follows exactly
the trajectory it would follow alone; a request that has converged is frozen while the others go
on, and once a quarter of the rows in the forward belong to finished requests they are dropped
from it (the cached prefixes are sliced, not recomputed), so the cost follows the hard
requests, not the batch size.

Deviations from the reference code: the early stop tests NLL + KL without the weight-decay
term (the code tests the full loss; with SmolLM2's small ‖v_orig‖ the decay term alone exceeds
0.05, so the stop never fired and every request ran all its steps), the KL term is read at the
lookup position of the KL prompt (as the code does), and the target's tokens are taken from
the joint tokenisation of prompt and target (see :func:`~engramlab.batching.target_ids`),
which matters for SentencePiece models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F

from ..batching import target_ids
from ..data.records import EditRequest
from ..models.lm import LM
from ..trace import Trace, parse_point
from .memory import (
    KL_SCORED,
    Costs,
    budget_bytes,
    costs,
    plan_chunks,
    release_freed_memory,
    split_rows,
)
from .prefix import PrefixBatch, length_groups
from .prompts import encode_with_subject, pick_positions

KL_PROMPT = "{} is a"


@dataclass
class TargetConfig:
    """Hyper-parameters of the δ optimisation (defaults: the papers' GPT-2 XL values)."""

    steps: int = 20
    lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp: float = 4.0
    early_stop: float = 5e-2
    chunk: int = 32  # requests per padded batch
    prefix_cache: bool = True  # run tokens before the lookup once (exact; see .prefix)
    length_groups: int = 3  # suffixes of similar length share a forward (less padding)
    # rows per forward at most (None: a whole length group). Each group is backpropagated
    # alone, so this caps the activation memory of the optimisation.
    group_rows: int | None = None
    # bytes the optimisation may hold, as a fraction of the model's parameter bytes (None: no
    # limit); sizes chunks and forwards to it (see .memory)
    memory_budget: float | None = None


@dataclass
class Targets:
    """Per request: the optimised change ``delta`` and the original value ``init`` at the point
    (read on the plain prompt), the final target NLL, and how many steps were taken."""

    point: str
    delta: torch.Tensor
    init: torch.Tensor
    nll: torch.Tensor
    steps: list[int]

    @property
    def value(self) -> torch.Tensor:
        return self.init + self.delta


@dataclass
class Anchor:
    """A reading δ must move toward a goal: request r's ``weight · ‖h − goal[r]‖₂``, h the
    residual at ``point`` on its plain prompt's last token (the one that predicts the target),
    joins its loss, and the target NLL + KL are weighted by ``target_weight``. TOP's second
    stage (:mod:`.relation`) is an anchor with ``target_weight`` 0."""

    point: str
    goal: torch.Tensor  # [n_requests, d_model]
    weight: float
    target_weight: float = 1.0


class TargetMemo:
    """Optimised targets kept under everything that determines them: the weights (their
    fingerprint), the point, the templates, the optimisation's settings and the requests.

    Shared by the editors of a sweep over a setting that does not enter the optimisation
    (MEMIT's λ, AlphaEdit's null-space threshold), it lets each request be optimised once.
    """

    def __init__(self) -> None:
        self._store: dict[tuple, Targets] = {}
        self.hits = 0

    def get(self, lm: LM, requests: Sequence[EditRequest], point: str,
            templates: Sequence[str], setting: tuple, subject_pos: str,
            compute: Callable[[], Targets]) -> Targets:
        """``setting``: every other value the optimisation reads (its configs, as tuples)."""
        key = (lm.fingerprint(), point, tuple(templates), setting, subject_pos,
               tuple(requests))
        if key in self._store:
            self.hits += 1
        else:
            self._store[key] = compute()
        return self._store[key]


@dataclass
class Rows:
    """Unpadded rows: every template × request (prompt + target[:-1], labelled) and one KL row
    per request; ``plain_row[r]`` / ``kl_row[r]`` index request r's plain-prompt and KL rows."""

    ids: list[list[int]]
    owner: list[int]
    lookup: list[list[int]]
    labels: list[list[tuple[int, int]]]
    plain_row: list[int]
    kl_row: list[int]


def build_rows(lm: LM, requests: Sequence[EditRequest], templates: Sequence[str],
               subject_pos: str, *, kl: bool = True) -> Rows:
    if "{}" not in templates:
        raise ValueError("the context templates must include the plain template '{}'")
    out = Rows([], [], [], [], [], [])
    for r, req in enumerate(requests):
        plain = encode_with_subject(lm, "{}", req.prompt, req.subject, req.case_id)
        tids = target_ids(lm, plain.text, req.target_new)
        for template in templates:
            enc = plain if template == "{}" else encode_with_subject(
                lm, template, req.prompt, req.subject, req.case_id)
            if template == "{}":
                out.plain_row.append(len(out.ids))
            n = len(enc.ids)
            out.ids.append(enc.ids + tids[:-1])
            out.labels.append([(n - 1 + j, t) for j, t in enumerate(tids)])
            out.lookup.append(pick_positions(enc, subject_pos))
            out.owner.append(r)
        if kl:
            enc = encode_with_subject(lm, "{}", KL_PROMPT, req.subject, req.case_id)
            look = pick_positions(enc, subject_pos)
            out.kl_row.append(len(out.ids))
            # the KL term is read at the lookup position; causal attention makes the tokens
            # after it irrelevant, so they are not run at all
            out.ids.append(enc.ids[:max(look) + 1])
            out.labels.append([])
            out.lookup.append(look)
            out.owner.append(r)
    return out


def optimise_targets(lm: LM, requests: Sequence[EditRequest], point: str,
                     templates: Sequence[str], config: TargetConfig | None = None, *,
                     subject_pos: str = "last", row_scale: torch.Tensor | None = None,
                     avoid: Sequence[torch.Tensor | None] | None = None,
                     anchor: Anchor | None = None, progress: bool = False) -> Targets:
    """Optimise δ for every request at ``point`` (``"mlp_out.{l}"`` or ``"resid.{l}"``), read
    at each prompt's ``subject_pos`` token (:func:`.prompts.pick_positions`).

    ``row_scale`` (``[n_requests, n_templates + 1]``, the last column for the KL prompt)
    multiplies δ per prompt: ROME passes the share of δ its rank-one update will actually write
    at each prompt's key, so the optimised objective is the edited model's.
    ``avoid[r]``, an orthonormal basis ``[d_model, m]`` or None, keeps request r's δ orthogonal
    to its span: after every step δ loses its component there (DeltaEdit).
    ``anchor`` adds a pull on a later reading of the plain prompt (:class:`Anchor`).
    """
    config = config or TargetConfig()
    parse_point(lm, point)
    budget = budget_bytes(lm, config.memory_budget)
    cost = costs(lm, point) if budget is not None else None
    if cost is None:
        sizes = [config.chunk] * -(-len(requests) // config.chunk)
    else:
        rows = build_rows(lm, requests, templates, subject_pos, kl=config.kl_factor > 0)
        prefix: list[list[int]] = [[] for _ in requests]
        for owner, look in zip(rows.owner, rows.lookup, strict=True):
            prefix[owner].append(min(look) if config.prefix_cache else 0)
        sizes = plan_chunks(prefix, config.chunk, cost, budget)
    starts = [0, *accumulate(sizes)][:-1]
    parts = []
    for i, size in zip(starts, sizes, strict=True):
        parts.append(_optimise_chunk(lm, list(requests[i:i + size]), point, templates, config,
                                     subject_pos,
                                     None if row_scale is None else row_scale[i:i + size],
                                     None if avoid is None else list(avoid[i:i + size]),
                                     None if anchor is None else dataclasses.replace(
                                         anchor, goal=anchor.goal[i:i + size]),
                                     cost=cost,
                                     act_budget=None if budget is None else budget / 2,
                                     progress=progress))
        if budget is not None:  # the next chunk (or the caller) starts from a lean process
            release_freed_memory()
    return Targets(point, torch.cat([p.delta for p in parts]), torch.cat([p.init for p in parts]),
                   torch.cat([p.nll for p in parts]), [s for p in parts for s in p.steps])


@dataclass
class Group:
    """Rows of similar suffix length run together; indices map back to the chunk's rows."""

    rows: list[int]
    prefix: PrefixBatch
    owner: torch.Tensor
    scale: torch.Tensor  # [rows, 1] share of δ each row receives
    lookup: torch.Tensor
    lab_row: torch.Tensor  # local row of each label
    lab_pos: torch.Tensor
    lab_index: torch.Tensor  # position of each label in the chunk's flat label list
    kl_local: torch.Tensor  # local rows that are KL rows
    kl_pos: torch.Tensor
    kl_owner: torch.Tensor
    plain: list[tuple[int, int, int]]  # (request, local row, position)
    # (request, local row, position of the prompt's last token) of the plain rows: an anchor's
    # reading, the position of the row's first label
    plain_last: list[tuple[int, int, int]]


def _flat_labels(rows: Rows) -> list[tuple[int, int, int]]:
    return [(row, p, t) for row, items in enumerate(rows.labels) for p, t in items]


def _groups(lm: LM, rows: Rows, config: TargetConfig, scale: list[float],
            cost: Costs | None = None, act_budget: float | None = None) -> list[Group]:
    """All rows in padded groups of similar suffix length, each within the budget."""
    splits = [min(look) if config.prefix_cache else 0 for look in rows.lookup]
    suffix_len = [len(ids) - s for ids, s in zip(rows.ids, splits, strict=True)]
    # a few rows fit one forward; splitting them only adds per-call overhead
    n_groups = config.length_groups if len(rows.ids) >= 32 else 1
    groups = []
    cap = len(rows.ids) if config.group_rows is None else config.group_rows
    if cap < 1:
        raise ValueError(f"group_rows must be at least 1, got {config.group_rows}")
    kl_rows = set(rows.kl_row)
    # a KL row's position keeps twice a label's vocabulary-sized tensors: its logits and
    # log-softmax, the reference's probabilities, their difference and product, the gradient
    scored = [len(lab) + KL_SCORED * (i in kl_rows) for i, lab in enumerate(rows.labels)]
    pieces = [piece for idx in length_groups(suffix_len, n_groups)
              for piece in split_rows(idx, suffix_len, scored, cap, cost, act_budget)]
    for idx in pieces:
        pb = PrefixBatch.build(lm, [rows.ids[i] for i in idx], [rows.owner[i] for i in idx],
                               [rows.lookup[i] for i in idx], [rows.labels[i] for i in idx],
                               use_cache=config.prefix_cache)
        groups.append(make_group(lm, rows, idx, pb, scale))
    return groups


def _prune(lm: LM, rows: Rows, groups: list[Group], done: torch.Tensor,
           scale: list[float]) -> list[Group]:
    """Drop the rows of finished requests from every group (prefix caches sliced in place)."""
    out = []
    for g in groups:
        local = [k for k, i in enumerate(g.rows) if not bool(done[rows.owner[i]])]
        if not local:
            continue
        if len(local) < len(g.rows):
            g.prefix.keep(local)
            g = make_group(lm, rows, [g.rows[k] for k in local], g.prefix, scale)
        out.append(g)
    return out


def make_group(lm: LM, rows: Rows, idx: list[int], pb: PrefixBatch,
               scale: list[float]) -> Group:
    device = lm.device
    label_at = {(row, p): k for k, (row, p, _) in enumerate(_flat_labels(rows))}
    kl_rows = {row: r for r, row in enumerate(rows.kl_row)}
    plain_rows = {row: r for r, row in enumerate(rows.plain_row)}
    b = pb.batch
    lab = [(local, p, label_at[(i, p + pb.splits[local])])
           for local, i in enumerate(idx) for p, _ in b.labels[local]]
    kls = [(local, b.lookup[local][-1], kl_rows[i]) for local, i in enumerate(idx)
           if i in kl_rows]
    return Group(
        rows=idx, prefix=pb, owner=torch.tensor(b.owner, device=device),
        scale=torch.tensor([scale[i] for i in idx], device=device)[:, None],
        lookup=b.lookup_mask().unsqueeze(-1),
        lab_row=torch.tensor([x[0] for x in lab], device=device, dtype=torch.long),
        lab_pos=torch.tensor([x[1] for x in lab], device=device, dtype=torch.long),
        lab_index=torch.tensor([x[2] for x in lab], device=device, dtype=torch.long),
        kl_local=torch.tensor([x[0] for x in kls], device=device, dtype=torch.long),
        kl_pos=torch.tensor([x[1] for x in kls], device=device, dtype=torch.long),
        kl_owner=torch.tensor([x[2] for x in kls], device=device, dtype=torch.long),
        plain=[(plain_rows[i], local, b.lookup[local][-1]) for local, i in enumerate(idx)
               if i in plain_rows],
        plain_last=[(plain_rows[i], local, b.labels[local][0][0]) for local, i in enumerate(idx)
                    if i in plain_rows])


class _Objective:
    """The target loss of one chunk, read group by group: each request's mean over its rows of
    the rows' mean target-token NLL, plus ``kl_factor`` × the KL of its "{} is a" prompt to the
    unedited distribution (recorded on the first step, where δ = 0); with an anchor, those
    weighted by its ``target_weight``, plus its pull."""

    def __init__(self, lm: LM, rows: Rows, flat: list[tuple[int, int, int]], n: int,
                 config: TargetConfig, anchor: Anchor | None = None) -> None:
        device = lm.device
        self.n, self.config, self.device, self.anchor = n, config, device, anchor
        self.lab_tok = torch.tensor([t for _, _, t in flat], device=device)
        lab_row = torch.tensor([row for row, _, _ in flat], device=device)
        self.owner = torch.tensor(rows.owner, device=device)
        self.lab_owner = self.owner[lab_row]
        tokens_per_row = torch.zeros(len(rows.ids), device=device).index_add_(
            0, lab_row, torch.ones(len(flat), device=device))
        rows_per_req = torch.zeros(n, device=device).index_add_(
            0, self.owner, (tokens_per_row > 0).float())
        self.weight = 1.0 / (tokens_per_row[lab_row] * rows_per_req[self.lab_owner])
        self.kl_init: torch.Tensor | None = None
        self.start_step()

    def start_step(self) -> None:
        self.tok_lp = torch.zeros(len(self.lab_tok), device=self.device)
        self.kl_now = torch.zeros(self.n, device=self.device)
        self.anchor_now = torch.zeros(self.n, device=self.device)

    def goal(self, nll: torch.Tensor) -> torch.Tensor:
        """What the early stop tests per request: the target NLL + KL (weighted, with the
        anchor's pull when there is one), without the weight decay."""
        reached = nll + self.config.kl_factor * self.kl_now
        if self.anchor is None:
            return reached
        return self.anchor.target_weight * reached + self.anchor.weight * self.anchor_now

    def group_loss(self, lm: LM, g: Group, hidden: torch.Tensor, *, first: bool,
                   anchor_hidden: torch.Tensor | None = None) -> torch.Tensor:
        """This group's share of the loss (recording its token log-probs, KL terms and
        anchor distances)."""
        part = self._target_loss(lm, g, hidden, first=first)
        if self.anchor is None:
            return part
        part = self.anchor.target_weight * part
        if anchor_hidden is not None and g.plain_last:
            req, local, pos = (torch.tensor(c, device=self.device)
                               for c in zip(*g.plain_last, strict=True))
            h = anchor_hidden[local, pos].float()
            dist = (h - self.anchor.goal[req].to(h)).norm(dim=1)
            self.anchor_now[req] = dist.detach()
            part = part + self.anchor.weight * dist.sum()
        return part

    def _target_loss(self, lm: LM, g: Group, hidden: torch.Tensor, *, first: bool
                     ) -> torch.Tensor:
        part = hidden.new_zeros((), dtype=torch.float32)
        kl = self.config.kl_factor > 0 and len(g.kl_local) > 0
        n_lab = len(g.lab_row)
        if not n_lab and not kl:
            return part
        # one unembedding for the label and KL positions: reading the vocabulary matrix is
        # most of its cost (SmolLM2: 113 MB per read, forward and backward, every step)
        rows, pos = (torch.cat([g.lab_row, g.kl_local]), torch.cat([g.lab_pos, g.kl_pos])) \
            if kl else (g.lab_row, g.lab_pos)
        logp_all = F.log_softmax(lm.logits_from_hidden(hidden[rows, pos]).float(), -1)
        if n_lab:
            logp = logp_all[:n_lab]
            got = logp.gather(1, self.lab_tok[g.lab_index][:, None]).squeeze(1)
            self.tok_lp[g.lab_index] = got.detach()
            part = part - (got * self.weight[g.lab_index]).sum()
        if kl:
            lp = logp_all[n_lab:]
            if self.kl_init is None:
                self.kl_init = torch.zeros(self.n, lp.shape[-1], device=self.device)
            if first:  # δ = 0: the unedited distribution, the KL's reference
                self.kl_init[g.kl_owner] = lp.detach()
            ref = self.kl_init[g.kl_owner]
            kl_g = (ref.exp() * (ref - lp)).sum(-1)
            self.kl_now[g.kl_owner] = kl_g.detach()
            part = part + self.config.kl_factor * kl_g.sum()
        return part

    def step_nll(self) -> torch.Tensor:
        """Each request's target NLL on this step (rows not run this step count as 0)."""
        return torch.zeros(self.n, device=self.device).index_add(
            0, self.lab_owner, -self.tok_lp * self.weight)


def _decay_and_step(delta: torch.Tensor, opt: torch.optim.Optimizer, done: torch.Tensor,
                    norm0: torch.Tensor, config: TargetConfig,
                    avoid: Sequence[torch.Tensor | None] | None = None) -> None:
    """Add the weight decay's gradient, take the Adam step, remove each δ's component in the
    span it must avoid, clamp each δ to ``clamp`` × the norm of its original value, and keep
    finished requests' δ where they were."""
    frozen = delta.detach()[done].clone()
    (config.weight_decay * delta.norm(dim=1) / norm0**2).sum().backward()
    opt.step()
    with torch.no_grad():
        for r, basis in enumerate(avoid or ()):
            if basis is not None:
                basis = basis.to(delta)
                delta[r] -= basis @ (basis.T @ delta[r])
        shrink = (config.clamp * norm0 / delta.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
        delta.mul_(shrink[:, None])
        delta[done] = frozen


def _optimise_chunk(lm: LM, requests: list[EditRequest], point: str, templates: Sequence[str],
                    config: TargetConfig, subject_pos: str, row_scale: torch.Tensor | None,
                    avoid: list[torch.Tensor | None] | None = None,
                    anchor: Anchor | None = None, *,
                    cost: Costs | None = None, act_budget: float | None = None,
                    progress: bool) -> Targets:
    from tqdm.auto import tqdm

    kl = config.kl_factor > 0
    rows = build_rows(lm, requests, templates, subject_pos, kl=kl)
    if row_scale is None:
        scale = [1.0] * len(rows.ids)
    else:  # rows are request-major: the templates, then the KL prompt
        scale = row_scale[:, :len(templates) + int(kl)].reshape(-1).float().tolist()
    flat = _flat_labels(rows)
    groups = _groups(lm, rows, config, scale, cost, act_budget)
    live = len(rows.ids)
    n = len(requests)
    device = lm.device
    delta = torch.zeros(n, lm.d_model, device=device, requires_grad=True)
    init = torch.zeros(n, lm.d_model, device=device)

    objective = _Objective(lm, rows, flat, n, config, anchor)
    owner = objective.owner

    last = f"resid.{lm.n_layers - 1}"
    opt = torch.optim.Adam([delta], lr=config.lr)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    steps = [config.steps] * n
    nll_r = torch.zeros(n, device=device)
    bar = tqdm(total=config.steps, desc=f"targets ×{n}", unit="step", disable=not progress)
    with bar, lm.frozen_weights():
        for it in range(config.steps):
            # finished requests leave the forward once they free a good share of its rows
            if int((~done[owner]).sum()) < 0.75 * live:
                groups = _prune(lm, rows, groups, done, scale)
                live = sum(len(g.rows) for g in groups)
            opt.zero_grad()
            backprop = it < config.steps - 1  # nothing follows the last step
            nll_now, pending = _forward_backward(lm, groups, objective, point, last,
                                                 delta, init if it == 0 else None, backprop)
            nll_r = torch.where(done, nll_r, nll_now)  # finished rows are not rerun
            # stop on what the edit must achieve (target NLL + KL), not on the weight decay:
            # the paper's stop on the full loss never fires when |value| is small (SmolLM2)
            goal = objective.goal(nll_now)
            norm0 = init.norm(dim=1).clamp_min(1e-8)
            newly = (~done) & (goal < config.early_stop)
            for r in newly.nonzero().flatten().tolist():
                steps[r] = it
            done |= newly
            bar.set_postfix(loss=f"{float(goal.mean()):.3f}",
                            done=f"{int(done.sum())}/{n}")
            bar.update(1)
            if bool(done.all()) or not backprop:
                break
            if pending is not None:
                pending.backward()
            del pending
            _decay_and_step(delta, opt, done, norm0, config, avoid)
    return Targets(point, delta.detach(), init, nll_r.detach(), steps)


def _forward_backward(lm: LM, groups: list[Group], objective: _Objective, point: str,
                      last: str, delta: torch.Tensor, record_init: torch.Tensor | None,
                      backprop: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step's loss, group by group: the loss is a sum of per-row terms, so each group is
    backpropagated as soon as it has run and its graph freed; peak memory follows the largest
    group, not the chunk, with the same gradient. Returns the step's NLL per request (the KL
    and anchor terms stay on ``objective``) and the last group's loss, not yet
    backpropagated: when this step's forward shows every request finished, that backward (for
    a single edit, the whole step's) is never needed."""
    objective.start_step()
    pending: torch.Tensor | None = None
    anchor_point = None if objective.anchor is None else objective.anchor.point
    for k, g in enumerate(groups):
        hidden, anchor_hidden = run_group(lm, g, point, last, delta, record_init, anchor_point)
        part = objective.group_loss(lm, g, hidden, first=record_init is not None,
                                    anchor_hidden=anchor_hidden)
        if backprop and part.requires_grad:
            if k < len(groups) - 1:
                part.backward()
            else:
                pending = part
        del hidden, anchor_hidden, part
    return objective.step_nll(), pending


def run_group(lm: LM, g: Group, point: str, last: str, delta: torch.Tensor,
              record_init: torch.Tensor | None, anchor_point: str | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward one group with δ added at its lookup positions; returns the last block's output
    (and the reading at ``anchor_point``). On the first step (``record_init``) the unmodified
    value at each plain row is stored."""

    def add_delta(t: torch.Tensor) -> torch.Tensor:
        if record_init is not None:
            for r, local, pos in g.plain:
                record_init[r] = t[local, pos].detach().float().to(record_init.device)
        shift = (delta[g.owner] * g.scale).unsqueeze(1)
        return t + (g.lookup * shift).to(device=t.device, dtype=t.dtype)

    # δ enters at its point's block: the blocks before it are the same on every step
    reads = (last,) if anchor_point is None else (last, anchor_point)
    with Trace(lm).edit(point, add_delta).capture(*reads, detach=False) as tr:
        g.prefix.run(lm, start=parse_point(lm, point)[1])
    return tr[last], None if anchor_point is None else tr[anchor_point]
