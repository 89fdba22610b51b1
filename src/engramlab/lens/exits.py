"""One lens's early-exit evaluation, as the CLI and the benchmark report it.

Each exit rule — confidence threshold, ConsistentEE policies, the confidence head — is
chosen on the first half of the held-out tokens and reported on the second
(:func:`~engramlab.lens.early_exit.operating_point`), with the cost of its checks
(:class:`~engramlab.lens.early_exit.ExitCost`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..models.lm import LM
from .base import Lens
from .early_exit import ExitCost, exit_readings, operating_point, threshold_curve
from .exit_head import head_curve, train_head
from .learned_exit import exit_data, policy_check_flops, policy_curve

TARGET_AGREEMENTS = (0.95, 0.99)


def _rule(dev: list[dict[str, Any]], test: list[dict[str, Any]], cost: ExitCost
          ) -> dict[str, Any]:
    return {"curve": test,
            "operating_points": {str(a): operating_point(dev, test, a, key="net_compute_saved")
                                 for a in TARGET_AGREEMENTS},
            "cost": {"block_flops": cost.block, "check_flops": cost.check,
                     "check_in_blocks": cost.check / cost.block}}


def exit_report(lm: LM, lens: Lens, name: str, held: Iterable[torch.Tensor],
                train: Iterable[torch.Tensor] | None = None, *,
                progress: bool = False) -> dict[str, dict[str, Any]]:
    """``{name: threshold rule}``, plus ``name+policy`` and ``name+head`` when ``train``
    tokens (before the held-out slice) are given to fit them on."""
    cost = ExitCost.of(lm, lens)
    if train is None:
        dev, test = exit_readings(lm, lens, held).split()
        return {name: _rule(threshold_curve(dev, cost=cost), threshold_curve(test, cost=cost),
                            cost)}
    dev_data, test_data = exit_data(lm, lens, held).split()
    fit = exit_data(lm, lens, train)
    out = {name: _rule(threshold_curve(dev_data.readings(), cost=cost),
                       threshold_curve(test_data.readings(), cost=cost), cost)}
    policy_cost = ExitCost.of(lm, lens, extra_check=policy_check_flops(16, lm.d_model))
    dev_p, test_p = policy_curve(fit, [dev_data, test_data], cost=policy_cost,
                                 progress=progress)
    out[f"{name}+policy"] = _rule(dev_p, test_p, policy_cost)
    head = train_head(fit)
    head_cost = ExitCost.of(lm, lens, extra_check=head.check_flops(), check_reads_out=False)
    out[f"{name}+head"] = _rule(head_curve(head, dev_data, cost=head_cost),
                                head_curve(head, test_data, cost=head_cost), head_cost)
    return out


def exit_lines(rules: dict[str, dict[str, Any]], title: str) -> list[str]:
    """``exit_report``'s rules as text: each rule's check cost, its operating points (chosen on
    the first half of the held-out tokens, reported on the second) and its curve."""
    lines = [f"{title} (settings chosen on the first half, reported on the second)"]
    for name, rule in rules.items():
        lines.append(f"{name}: one exit check costs {rule['cost']['check_in_blocks']:.1f} "
                     "blocks")
        for target, p in rule["operating_points"].items():
            knob = f"τ={p['threshold']}" if "threshold" in p else f"α={p['alpha']}"
            lines.append(f"  for {float(target):.0%} agreement ({knob}"
                         f"{'' if p['reached_on_dev'] else ', not reached on dev'}): test "
                         f"agreement {p['test']['agreement']:.3f}, blocks saved "
                         f"{p['test']['compute_saved']:.1%}, net of checks "
                         f"{p['test']['net_compute_saved']:+.1%}")
        for p in rule["curve"]:
            knob = f"τ={p['threshold']:<5}" if "threshold" in p else f"α={p['alpha']:<5}"
            lines.append(f"    {knob} agreement {p['agreement']:.3f}  blocks saved "
                         f"{p['compute_saved']:.1%}  net {p['net_compute_saved']:+.1%}")
    return lines
