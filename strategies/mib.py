"""MiB: Modeling the Background (Cermelli, Mancini, Rota Bulò, Ricci, Caputo: "Modeling the Background for
Incremental Learning in Semantic Segmentation", CVPR 2020)."""

from __future__ import annotations

import math
from typing import Any

import torch

from clbench.distill import distillation_loss, unbiased_cross_entropy, unbiased_distillation
from clbench.incremental import restrict_logits
from clbench.losses import upsample
from clbench.strategy import StageContext, register
from clbench.teacher import SnapshotDistillation


@register("mib")
class MiB(SnapshotDistillation):
    """Unbiased cross-entropy and distillation for the background shift of class-incremental segmentation.

    On a segmentation stage that adds classes (DESIGN.md §8): the task loss is replaced by the unbiased
    cross-entropy (a background pixel may be any old class), the unbiased distillation from a frozen snapshot of the
    previous stage is added (``kd`` × it; MiB uses 10 on VOC), and the new classes' output channels start as the
    background's with its bias lowered by log(new classes + 1), the background's too (MiB's initialisation).
    MiB is defined for segmentation; carried over to the rest, it distils every other earlier task (and a detection
    or classification task's earlier classes) as LwF does (``lwf`` × the KL at temperature 2, Li & Hoiem)."""

    def __init__(self, *, kd: float = 10.0, lwf: float = 1.0, init: bool = True) -> None:
        if kd < 0 or lwf < 0:
            raise ValueError("kd and lwf must be >= 0")
        self.kd, self.lwf, self.init = kd, lwf, init

    def _background_shift(self, ctx: StageContext) -> bool:
        return ctx.task.kind == "seg" and bool(ctx.old_classes)

    def before_stage(self, ctx: StageContext) -> None:
        super().before_stage(ctx)   # the snapshot first: it keeps the channels as the last stage left them
        if self._background_shift(ctx) and self.init:
            start = ctx.model.slices[ctx.task.name].start
            conv = ctx.model.head_out
            with torch.no_grad():
                bias = conv.bias[start] - math.log(len(ctx.new_classes) + 1)
                for c in ctx.new_classes:
                    conv.weight[start + c] = conv.weight[start]
                    conv.bias[start + c] = bias
                conv.bias[start] = bias

    def task_loss(self, ctx: StageContext, images: torch.Tensor, outputs: dict[str, torch.Tensor],
                  targets: Any) -> torch.Tensor | None:
        if not self._background_shift(ctx):
            return None
        logits = restrict_logits(outputs[ctx.task.name], "seg", (ctx.seen or {}).get(ctx.task.name))
        return unbiased_cross_entropy(upsample(logits.float(), tuple(targets.shape[-2:])), targets, ctx.old_classes)

    def loss_term(self, ctx: StageContext, images: torch.Tensor, outputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        shifted = self._background_shift(ctx)
        seen = ctx.task.class_steps.seen(ctx.step)
        pairs = self.snapshot_pairs(ctx, images, outputs, cut=lambda task, classes: seen if shifted and
                                    task.name == ctx.task.name else classes)   # the student over every seen class
        if not pairs:
            return None
        old = [seen.index(c) for c in ctx.old_classes]   # the old classes' positions among the seen ones
        return torch.stack([self.kd * unbiased_distillation(student, teacher, old)
                            if shifted and task.name == ctx.task.name else
                            self.lwf * distillation_loss(task.kind, student, teacher, 2.0)
                            for task, _, student, teacher in pairs]).sum()
