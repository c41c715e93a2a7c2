"""Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017)."""

from __future__ import annotations

import torch

from clbench.distill import distillation_loss
from clbench.incremental import select_classes
from clbench.strategy import StageContext, Strategy, register
from clbench.teacher import FrozenTeacher, frozen_teacher


@register("lwf")
class LwF(Strategy):
    """Distil earlier tasks' output slices from a frozen snapshot, on the current task's images.

    With a class-incremental task (DESIGN.md §8), also its earlier classes' logits (the ILT/MiB "LwF" baseline:
    the softmax over the old classes only), and an earlier task's logits over the classes it had seen."""

    shares_first_stage = True  # stage 1 has no earlier task or class: no teacher, no term

    def __init__(self, *, lam: float = 1.0, temperature: float = 2.0) -> None:
        if lam < 0 or temperature <= 0:
            raise ValueError("lam must be >= 0 and temperature > 0")
        self.lam = lam                  # λ_o in Li & Hoiem's eq. 1
        self.temperature = temperature  # T in their eq. 2 (they use 2)
        self.teacher: FrozenTeacher | None = None

    def before_stage(self, ctx: StageContext) -> None:
        self.teacher = frozen_teacher(ctx.model) if ctx.distilled else None

    def loss_term(self, ctx: StageContext, images: torch.Tensor, outputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if self.teacher is None:
            return None
        targets = self.teacher(images)
        terms = [distillation_loss(t.kind, select_classes(outputs[t.name], t.kind, classes),
                                   select_classes(targets[t.name], t.kind, classes), self.temperature)
                 for t, classes in ctx.distilled]
        return self.lam * torch.stack(terms).sum()

    def after_stage(self, ctx: StageContext) -> None:
        self.teacher = None  # rebuilt from the current weights before the next stage
