"""Averaged Gradient Episodic Memory (Chaudhry et al., "Efficient Lifelong Learning with A-GEM", ICLR 2019)."""

from __future__ import annotations

import torch

from clbench.buffer import Rehearsal
from clbench.gradients import agem_project
from clbench.strategy import StageContext, register


@register("agem")
class AGEM(Rehearsal):
    """Project each step's gradient so that, to first order, it does not raise the stored images' loss (A-GEM).

    A buffer of at most N images per earlier task; each step a reference gradient from ``batch`` stored images
    per earlier task, each with its own task's loss; where the step's gradient points against it, the
    gradient is projected onto its normal plane (eq. 11). The "applied update" is the gradient the optimizer
    receives (clipping only rescales it); AdamW's moments then shape the step, as in any A-GEM with Adam."""

    def __init__(self, *, per_task: int = 10, batch: int = 4, update_bn: bool = False) -> None:
        super().__init__(per_task=per_task, batch=batch, update_bn=update_bn)
        self.reference: dict[str, torch.Tensor] = {}  # this step's reference gradient (not checkpointed)

    def after_backward(self, ctx: StageContext, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        if not ctx.earlier_tasks:
            return None
        params = dict(ctx.model.named_parameters())
        names = list(grads)
        loss = torch.stack([ctx.task_loss(task, replayed, stored["targets"])
                            for task in ctx.earlier_tasks for stored, replayed in [self.replay(ctx, task)]]).sum()
        reference = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        self.reference = {n: torch.zeros_like(grads[n]) if r is None else r for n, r in zip(names, reference)}
        return agem_project(grads, self.reference)

    def after_stage(self, ctx: StageContext) -> None:
        self.reference = {}
        if not ctx.is_last:
            self.buffer.store(ctx)
