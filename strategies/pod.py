"""Pooled local feature distillation: PLOP's Local POD (Douillard et al., "PLOP: Learning without Forgetting
for Continual Semantic Segmentation", CVPR 2021), on the backbone and neck features of UniHeadNet."""

from __future__ import annotations

import torch

from clbench import ClbenchError
from clbench.distill import pod_loss
from clbench.strategy import StageContext, Strategy, register
from clbench.teacher import FeatureTaps, FrozenTeacher, frozen_teacher


@register("pod")
class POD(Strategy):
    """Distil pooled backbone and neck features from a snapshot taken before the stage (Local POD).

    Distil the width- and height-pooled features of every backbone stage and the neck (``layers``; empty =
    all of them) at several scales (``scales``: 1 = whole map, 2 = 2×2 regions, ...) from a frozen snapshot
    taken before the stage, on the current task's images: λ · pod_loss."""

    shares_first_stage = True  # stage 1 has no earlier task or class: no teacher, no term

    def __init__(self, *, lam: float = 1.0, scales: tuple[int, ...] = (1, 2, 4), layers: tuple[str, ...] = ()) -> None:
        if lam < 0 or not scales or min(scales) < 1:
            raise ValueError("need lam >= 0 and scales of whole numbers >= 1")
        self.lam, self.scales, self.layers = lam, scales, layers
        self.teacher: FrozenTeacher | None = None
        self._taps: tuple[FeatureTaps, FeatureTaps] | None = None

    def before_stage(self, ctx: StageContext) -> None:
        if ctx.distilled:   # an earlier task, or (class-incremental) earlier classes of this stage's task
            self.teacher = frozen_teacher(ctx.model)
            self._taps = (FeatureTaps(ctx.model), FeatureTaps(self.teacher))

    def loss_term(self, ctx: StageContext, images: torch.Tensor, outputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if self.teacher is None or self._taps is None:
            return None
        self.teacher(images)
        student, teacher = (taps.of(images) for taps in self._taps)
        names = self.layers or tuple(student)
        missing = [n for n in names if n not in student]
        if missing:
            raise ClbenchError(f"pod.layers: {missing[0]!r} is not a feature tap (taps: {', '.join(student)})")
        return self.lam * pod_loss([student[n] for n in names], [teacher[n] for n in names], self.scales)

    def after_stage(self, ctx: StageContext) -> None:
        for taps in self._taps or ():
            taps.close()
        self.teacher, self._taps = None, None
