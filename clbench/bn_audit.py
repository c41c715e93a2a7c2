"""BN-drift audit: how far BatchNorm running statistics moved, and how much of a drop they explain."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from clbench.freezing import batchnorm_state

STATS = ("running_mean", "running_var")


def bn_drift(current: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> list[tuple[str, str, float]]:
    """(layer, statistic, ‖s − s_ref‖₂ / ‖s_ref‖₂) for every BN layer's running mean and variance."""
    rows = []
    for key, ref in reference.items():
        layer, _, stat = key.rpartition(".")
        if stat in STATS:
            distance = (current[key].double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-12)
            rows.append((layer, stat, float(distance)))
    return rows


class BatchNormAudit:
    """The BN statistics at the end of every stage, and what they explain.

    After every stage: each BN layer's drift since the end of each earlier stage. After the last stage:
    each earlier task re-evaluated with the final weights but the BN statistics of its own stage
    (``<primary>_own_bn``), the part of its drop BN drift explains."""

    def __init__(self) -> None:
        self.stats: dict[int, dict[str, torch.Tensor]] = {}

    def record(self, model: nn.Module, stage: int) -> list[tuple[int, list[tuple[str, str, float]]]]:
        """Remember this stage's statistics; (reference stage, drift rows) for every earlier stage."""
        self.stats[stage] = current = batchnorm_state(model)
        return [(ref, bn_drift(current, stats)) for ref, stats in self.stats.items() if ref < stage]

    def own_bn_metric(self, model: nn.Module, own_stage: int, plain: tuple[float, int], served: dict[str, torch.Tensor],
                      evaluate: Callable[[dict[str, torch.Tensor]], tuple[float, int]]) -> tuple[float, int]:
        """The primary metric with ``own_stage``'s BN statistics, through ``evaluate(state)`` (the task's own
        evaluation, which loads ``state`` over the strategy's evaluation state). ``served``: the statistics
        the plain evaluation used; where they equal the own ones (bn_frozen, bn_per_task) the forward would
        be identical, so ``plain`` (this stage's value) is returned."""
        own = self.stats[own_stage]
        if all(torch.equal(own[key], served[key]) for key in own):
            return plain
        return evaluate(own)
