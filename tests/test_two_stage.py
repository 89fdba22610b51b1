"""TOP's two-stage targets: the relation feature first, then the subject's change that reaches
it through the relation's token."""

from __future__ import annotations

import pytest
import torch

from engramlab import EditRequest
from engramlab.edit import MEMIT, ROME
from engramlab.edit.base import EditHParams
from engramlab.edit.prompts import encode_with_subject
from engramlab.edit.relation import RelationConfig, relation_point, two_stage_targets
from engramlab.edit.targets import TargetConfig, TargetMemo, optimise_targets
from engramlab.errors import RequestError
from engramlab.stats import KeyStats
from engramlab.trace import Trace
from tests.conftest import make_tiny

REQUESTS = [
    EditRequest(prompt="w1 {} w2 w3", subject="w5 w6", target_new="w40", target_true="w41"),
    EditRequest(prompt="{} w2 w3 w4", subject="w7", target_new="w42", target_true="w41"),
    EditRequest(prompt="w2 {} w1", subject="w12", target_new="w46", target_true="w41"),
]
TEMPLATES = ["{}", "w9 w3. {}", "w11 w10 w13. {}"]
CONFIG = TargetConfig(steps=12, lr=0.5, early_stop=0.0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_without_its_relation_term_the_second_stage_is_the_one_stage_target(family):
    lm = make_tiny(family)
    one = optimise_targets(lm, REQUESTS, "mlp_out.0", TEMPLATES, CONFIG)
    two = two_stage_targets(lm, REQUESTS, "mlp_out.0", TEMPLATES, CONFIG,
                            RelationConfig(offset=1, weight=0.0, target_weight=1.0))
    assert float(one.delta.norm()) > 0
    assert torch.allclose(two.init, one.init, atol=1e-6)
    assert torch.allclose(two.delta, one.delta, atol=1e-6)


def _relation_reading(lm, req, point, read, delta):
    """The plain prompt's last-token residual at ``read`` with ``delta`` added at ``point`` on
    the subject's last token."""
    enc = encode_with_subject(lm, "{}", req.prompt, req.subject, req.case_id)
    ids = torch.tensor([enc.ids])
    with Trace(lm).add(point, delta, positions=[enc.subject[-1]]).capture(read, detach=False) as tr:
        lm.model(input_ids=ids)
    return tr[read][0, -1]


def _closest(lm, req, point, read, goal, steps=150):
    """The nearest the relation reading gets to ``goal`` by a change at the subject alone: a
    plain Adam descent on the distance, the reference the second stage is held to."""
    d = torch.zeros(lm.d_model, requires_grad=True)
    opt = torch.optim.Adam([d], lr=0.2)
    with lm.frozen_weights():
        for _ in range(steps):
            opt.zero_grad()
            dist = (_relation_reading(lm, req, point, read, d) - goal).norm()
            dist.backward()
            opt.step()
    return float(dist.detach())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_second_stage_moves_the_relation_reading_to_the_first_stages_feature(family):
    lm = make_tiny(family)
    relation = RelationConfig(offset=1, weight=1.0, target_weight=0.0)
    point = "mlp_out.0"
    read = relation_point(lm, point, relation.offset)
    assert read == "resid.1"
    config = TargetConfig(steps=40, lr=0.2, early_stop=0.0, weight_decay=0.0, clamp=50.0)
    feature = optimise_targets(lm, REQUESTS, read, TEMPLATES, config, subject_pos="prompt_last")
    two = two_stage_targets(lm, REQUESTS, point, TEMPLATES, config, relation)
    for r, req in enumerate(REQUESTS):
        goal = feature.value[r]
        with torch.no_grad():
            start = float((_relation_reading(lm, req, point, read, torch.zeros(lm.d_model))
                           - goal).norm())
            end = float((_relation_reading(lm, req, point, read, two.delta[r]) - goal).norm())
        best = _closest(lm, req, point, read, goal)
        # a random tiny model's relation token reads little from the subject through one
        # normalised attention layer, so the reachable gain is small, but it is reached
        assert start - best > 1e-3
        assert start - end > 0.8 * (start - best)


def test_two_stage_rome_writes_a_different_edit_and_the_setting_is_checked(isolated_cache):
    lm = make_tiny("llama")
    stats = {0: KeyStats(0, torch.eye(lm.d_mlp, dtype=torch.float64) * 10, 10)}
    common = dict(layers=[0], key_stats=stats, templates=[[3, 1]], target={"steps": 6})
    plain = ROME(**common).edit(lm, REQUESTS[:1])
    aware = ROME(**common, targets="two_stage", relation={"offset": 2}).edit(lm, REQUESTS[:1])
    name = lm.layout.value_param_name(0)
    a, b = plain.entries[name].to_dense(), aware.entries[name].to_dense()
    assert float(b.abs().max()) > 0 and not torch.allclose(a, b, atol=1e-4)
    assert aware.meta["hparams"]["targets"] == "two_stage"
    with pytest.raises(RequestError, match="targets='three_stage'"):
        EditHParams().replace(targets="three_stage")
    with pytest.raises(RequestError, match="offset from 1 to 2"):
        ROME(**common, targets="two_stage", relation={"offset": 3}).edit(lm, REQUESTS[:1])


def test_a_shared_target_memo_keeps_one_and_two_stage_targets_apart(isolated_cache):
    lm = make_tiny("llama")
    stats = {layer: KeyStats(layer, torch.eye(lm.d_mlp, dtype=torch.float64) * 10, 10)
             for layer in (0, 1)}
    memo = TargetMemo()
    out = []
    for mode in ("one_stage", "two_stage"):
        editor = MEMIT(layers=[0, 1], key_stats=stats, templates=[[3, 1]], target={"steps": 4},
                       targets=mode)
        editor.target_memo = memo
        editor.edit(lm, REQUESTS[:2])
        out.append(editor.last_targets)
    assert memo.hits == 0
    assert not torch.allclose(out[0].delta, out[1].delta, atol=1e-4)
