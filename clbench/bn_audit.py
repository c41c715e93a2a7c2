"""BN-drift audit: how far BatchNorm running statistics moved, and how much of a drop they explain."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

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


@contextmanager
def batchnorm_stats_from(model: nn.Module, stats: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily give the model other BN running statistics (weights untouched); restored on exit."""
    saved = batchnorm_state(model)
    model.load_state_dict(stats, strict=False)
    try:
        yield
    finally:
        model.load_state_dict(saved, strict=False)


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

    def own_bn_metric(self, model: nn.Module, own_stage: int, plain: tuple[float, int],
                      evaluate: Callable[[], tuple[float, int]]) -> tuple[float, int]:
        """The primary metric with ``own_stage``'s BN statistics. Where they equal the current ones (e.g.
        bn_frozen) the forward would be identical, so ``plain`` (this stage's value) is returned."""
        own, current = self.stats[own_stage], batchnorm_state(model)
        if all(torch.equal(own[key], current[key]) for key in own):
            return plain
        with batchnorm_stats_from(model, own):
            return evaluate()
