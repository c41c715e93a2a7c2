"""Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017)."""

from __future__ import annotations

import torch

from clbench.distill import distillation_loss
from clbench.strategy import StageContext, register
from clbench.teacher import SnapshotDistillation


@register("lwf")
class LwF(SnapshotDistillation):
    """Distil earlier tasks' output slices from a frozen snapshot, on the current task's images.

    With a class-incremental task (DESIGN.md §8), also its earlier classes' logits (the ILT/MiB "LwF" baseline:
    the softmax over the old classes only), and an earlier task's logits over the classes it had seen."""

    def __init__(self, *, lam: float = 1.0, temperature: float = 2.0) -> None:
        if lam < 0 or temperature <= 0:
            raise ValueError("lam must be >= 0 and temperature > 0")
        self.lam = lam                  # λ_o in Li & Hoiem's eq. 1
        self.temperature = temperature  # T in their eq. 2 (they use 2)

    def loss_term(self, ctx: StageContext, images: torch.Tensor, outputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        pairs = self.snapshot_pairs(ctx, images, outputs)
        if not pairs:
            return None
        return self.lam * torch.stack([distillation_loss(t.kind, student, teacher, self.temperature)
                                       for t, _, student, teacher in pairs]).sum()
