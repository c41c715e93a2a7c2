"""Evaluation inside a stage (``--eval-every K``, ``--probe N``): when it is due and which test images it uses (the
guarantee that it leaves training untouched is ``clbench.runtime.untouched``). The evaluation itself is
``clbench.evaluate.evaluate_task``, the same code the stage-end rows come from (``clbench.stage`` calls it).

Schedule: every step for the first K optimizer steps of a stage, then every K-th step. The first steps of a stage are
where forgetting collapses and often recovers (the stability gap, De Lange et al., ICLR 2023); a uniform K would see
at most one point there, and evaluating every step throughout would cost more than training.
"""

from __future__ import annotations

import torch

PROBE_SEED = 0   # one probe for every strategy, seed and point: the same images everywhere


def due(step: int, every: int) -> bool:
    """Whether the curve is evaluated after optimizer step ``step`` (counted from 1 in each stage)."""
    return every > 0 and (step <= every or step % every == 0)


def probe_indices(n: int, size: int) -> list[int]:
    """A fixed subset of a test set's ``n`` items (``size`` 0 or >= n: all of them), sorted."""
    if size <= 0 or size >= n:
        return list(range(n))
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(PROBE_SEED))[:size].tolist())
