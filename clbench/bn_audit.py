"""BN-drift audit: how far BatchNorm running statistics moved, and how much of a drop they explain."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

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
