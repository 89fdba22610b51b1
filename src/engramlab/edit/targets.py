"""Target values: the vector an edited layer must write so the model says ``target_new``.

ROME (Meng et al. 2022, eq. 4) and MEMIT (Meng et al. 2023, eq. 16) find it by gradient descent
on a vector δ added at the subject's last token — to the MLP output of the edited layer (ROME)
or to the residual stream after the last edited layer (MEMIT, AlphaEdit) — minimising

    mean over context templates of  −mean_t log P(target token t | template + prompt + target<t)
    + kl_factor · KL(P_orig ‖ P_δ) on "{subject} is a"      (keeps the subject's "essence")
    + weight_decay · ‖δ‖ / ‖v_orig‖²

with ‖δ‖ clamped to ``clamp · ‖v_orig‖`` after every Adam step, and early stopping once a
request's loss drops below 0.05 (the reference code's rule).

All requests of a call are optimised **together**: one padded batch holds every request's
templates and KL prompt, each request has its own row of δ, and the loss is the sum of the
per-request losses. Adam is element-wise and the rows never mix, so each request follows exactly
the trajectory it would follow alone; a request that has converged is frozen while the others go on.

Deviations from the reference code: the KL term is read at the lookup position of the KL prompt
(as the code does), and the target's tokens are taken from the joint tokenisation of prompt and
target (see :func:`~engramlab.edit.prompts.target_ids`), which matters for SentencePiece models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.records import EditRequest
from ..models.lm import LM
from ..trace import Trace, parse_point, run_model
from .prompts import Batch, encode_with_subject, make_batch, pick_positions, target_ids

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
    subject_pos: str = "last"
    chunk: int = 32  # requests per padded batch


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


def build_rows(lm: LM, requests: Sequence[EditRequest], templates: Sequence[str],
               subject_pos: str, *, kl: bool = True) -> tuple[Batch, list[int], list[int]]:
    """Rows: every template × request (prompt + target[:-1], labelled) and one KL row each.

    Returns the batch, the index of each request's plain-prompt row (template ``"{}"``) and of
    its KL row.
    """
    rows: list[list[int]] = []
    owner: list[int] = []
    lookup: list[list[int]] = []
    labels: list[list[tuple[int, int]]] = []
    plain_row: list[int] = []
    kl_row: list[int] = []
    for r, req in enumerate(requests):
        plain = encode_with_subject(lm, "{}", req.prompt, req.subject, req.case_id)
        tids = target_ids(lm, plain.text, req.target_new)
        for template in templates:
            enc = plain if template == "{}" else encode_with_subject(
                lm, template, req.prompt, req.subject, req.case_id)
            if template == "{}":
                plain_row.append(len(rows))
            n = len(enc.ids)
            rows.append(enc.ids + tids[:-1])
            labels.append([(n - 1 + j, t) for j, t in enumerate(tids)])
            lookup.append(pick_positions(enc, subject_pos))
            owner.append(r)
        if kl:
            enc = encode_with_subject(lm, "{}", KL_PROMPT, req.subject, req.case_id)
            kl_row.append(len(rows))
            rows.append(enc.ids)
            labels.append([])
            lookup.append(pick_positions(enc, subject_pos))
            owner.append(r)
    if len(plain_row) != len(requests):
        raise ValueError("the context templates must include the plain template '{}'")
    return make_batch(lm, rows, owner, lookup, labels), plain_row, kl_row


def optimise_targets(lm: LM, requests: Sequence[EditRequest], point: str,
                     templates: Sequence[str], config: TargetConfig | None = None, *,
                     progress: bool = False) -> Targets:
    """Optimise δ for every request at ``point`` (``"mlp_out.{l}"`` or ``"resid.{l}"``)."""
    config = config or TargetConfig()
    parse_point(lm, point)
    parts = [_optimise_chunk(lm, list(requests[i:i + config.chunk]), point, templates, config,
                             progress=progress)
             for i in range(0, len(requests), config.chunk)]
    return Targets(point, torch.cat([p.delta for p in parts]), torch.cat([p.init for p in parts]),
                   torch.cat([p.nll for p in parts]), [s for p in parts for s in p.steps])


def _optimise_chunk(lm: LM, requests: list[EditRequest], point: str, templates: Sequence[str],
                    config: TargetConfig, *, progress: bool) -> Targets:
    from tqdm.auto import tqdm

    batch, plain_row, kl_row = build_rows(lm, requests, templates, config.subject_pos,
                                          kl=config.kl_factor > 0)
    n = len(requests)
    device = lm.device
    owner = torch.tensor(batch.owner, device=device)
    lookup = batch.lookup_mask().unsqueeze(-1)
    delta = torch.zeros(n, lm.d_model, device=device, requires_grad=True)
    init = torch.zeros(n, lm.d_model, device=device)
    first = [True]

    def add_delta(t: torch.Tensor) -> torch.Tensor:
        if first[0]:
            for r, row in enumerate(plain_row):
                init[r] = t[row, batch.lookup[row][-1]].detach().float()
            first[0] = False
        return t + lookup.to(t.dtype) * delta[owner].unsqueeze(1).to(t.dtype)

    # label positions, flattened: (row, position, token, owner)
    lab = [(row, pos, tok) for row, items in enumerate(batch.labels) for pos, tok in items]
    lab_row = torch.tensor([x[0] for x in lab], device=device)
    lab_pos = torch.tensor([x[1] for x in lab], device=device)
    lab_tok = torch.tensor([x[2] for x in lab], device=device)
    lab_owner = owner[lab_row]
    # each row's NLL is a mean over its target tokens; each request's a mean over its rows
    tokens_per_row = torch.zeros(len(batch.owner), device=device).index_add_(
        0, lab_row, torch.ones(len(lab), device=device))
    rows_per_req = torch.zeros(n, device=device).index_add_(
        0, owner, (tokens_per_row > 0).float())
    weight = 1.0 / (tokens_per_row[lab_row] * rows_per_req[lab_owner])
    kl_rows = torch.tensor(kl_row, device=device, dtype=torch.long)
    kl_pos = torch.tensor([batch.lookup[r][-1] for r in kl_row], device=device, dtype=torch.long)

    last = f"resid.{lm.n_layers - 1}"
    params = [p for p in lm.model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    opt = torch.optim.Adam([delta], lr=config.lr)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    steps = [config.steps] * n
    kl_init: torch.Tensor | None = None
    nll_r = torch.zeros(n, device=device)
    bar = tqdm(total=config.steps, desc=f"targets ×{n}", unit="step", disable=not progress)
    try:
        for it in range(config.steps):
            opt.zero_grad()
            with Trace(lm).edit(point, add_delta).capture(last, detach=False) as tr:
                run_model(lm, batch.input_ids, batch.attention_mask)
            hidden = tr[last]
            logp = F.log_softmax(lm.logits_from_hidden(hidden[lab_row, lab_pos]).float(), -1)
            tok_lp = logp.gather(1, lab_tok[:, None]).squeeze(1)
            nll_r = torch.zeros(n, device=device).index_add(0, lab_owner, -tok_lp * weight)
            loss_r = nll_r.clone()
            if len(kl_row):
                kl_lp = F.log_softmax(
                    lm.logits_from_hidden(hidden[kl_rows, kl_pos]).float(), -1)
                if kl_init is None:
                    kl_init = kl_lp.detach()
                kl = (kl_init.exp() * (kl_init - kl_lp)).sum(-1)
                loss_r = loss_r + config.kl_factor * kl
            norm0 = init.norm(dim=1).clamp_min(1e-8)
            loss_r = loss_r + config.weight_decay * delta.norm(dim=1) / norm0**2
            newly = (~done) & (loss_r.detach() < config.early_stop)
            for r in newly.nonzero().flatten().tolist():
                steps[r] = it
            done |= newly
            bar.set_postfix(loss=f"{float(loss_r.detach().mean()):.3f}",
                            done=f"{int(done.sum())}/{n}")
            bar.update(1)
            if bool(done.all()) or it == config.steps - 1:
                break
            frozen = delta.detach()[done].clone()
            loss_r.sum().backward()
            opt.step()
            with torch.no_grad():
                limit = config.clamp * norm0
                scale = (limit / delta.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
                delta.mul_(scale[:, None])
                delta[done] = frozen
    finally:
        bar.close()
        for p in params:
            p.requires_grad_(True)
    return Targets(point, delta.detach(), init, nll_r.detach(), steps)
