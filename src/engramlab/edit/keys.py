"""Read activations at the subject's lookup token, averaged over context templates.

The key k* of ROME (§3.1, eq. 3) and MEMIT (eq. 19) is the MLP key at the subject's last token
averaged over the context templates; the "current value" of MEMIT's residual (eq. 17) is read on
the plain prompt. One no-grad pass serves every requested point, and the pass stops after the
deepest block needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..batching import make_batch
from ..data.records import EditRequest
from ..models.lm import LM
from ..trace import Trace, parse_point, run_model
from .prompts import encode_with_subject, pick_positions


@torch.no_grad()
def at_subject(lm: LM, requests: Sequence[EditRequest], points: Sequence[str],
               templates: Sequence[str] = ("{}",), subject_pos: str = "last",
               batch_size: int = 64, *, reduce: bool = True) -> dict[str, torch.Tensor]:
    """``{point: [n_requests, dim]}`` (float32): each request's activation at its lookup
    token(s), averaged over lookup tokens and then over templates (``reduce=False``: kept per
    template, ``[n_requests, n_templates, dim]``)."""
    rows, owner, lookup = [], [], []
    for r, req in enumerate(requests):
        for template in templates:
            enc = encode_with_subject(lm, template, req.prompt, req.subject, req.case_id)
            rows.append(enc.ids)
            lookup.append(pick_positions(enc, subject_pos))
            owner.append(r)
    deepest = max(parse_point(lm, p)[1] for p in points)
    per_row: dict[str, list[torch.Tensor]] = {p: [] for p in points}
    for start in range(0, len(rows), batch_size):
        sl = slice(start, start + batch_size)
        batch = make_batch(lm, rows[sl], owner[sl], lookup[sl])
        with Trace(lm).capture(*points) as tr:
            run_model(lm, batch.input_ids, batch.attention_mask, stop_after=deepest)
        mask = batch.lookup_mask().float().unsqueeze(-1)  # mean over each row's lookup tokens
        for point in points:
            per_row[point].append((mask * tr[point].float()).sum(1) / mask.sum(1))
    # rows are request-major, one per template
    out = {p: torch.cat(v).view(len(requests), len(templates), -1) for p, v in per_row.items()}
    return out if not reduce else {p: v.mean(1) for p, v in out.items()}
