"""Averaged Gradient Episodic Memory (Chaudhry et al., "Efficient Lifelong Learning with A-GEM", ICLR 2019)."""

from __future__ import annotations

from typing import Any

import torch

from clbench.buffer import DRAW_PURPOSE, Buffer
from clbench.freezing import no_bn_update
from clbench.gradients import agem_project
from clbench.strategy import StageContext, Strategy, register


@register("agem")
class AGEM(Strategy):
    """A buffer of at most N images per earlier task; each step a reference gradient from ``batch`` stored images
    per earlier task, each with its own task's loss; where the step's gradient points against it, the
    gradient is projected onto its normal plane (eq. 11). The "applied update" is the gradient the optimizer
    receives (clipping only rescales it); AdamW's moments then shape the step, as in any A-GEM with Adam."""

    shares_first_stage = True  # stage 1 has no earlier task; the buffer is filled in after_stage

    def __init__(self, *, per_task: int = 10, batch: int = 4) -> None:
        if not 1 <= batch <= per_task:
            raise ValueError("need 1 <= batch <= per_task")
        self.batch = batch
        self.buffer = Buffer(per_task)
        self.reference: dict[str, torch.Tensor] = {}  # this step's reference gradient (not checkpointed)
        self._draws: torch.Generator | None = None

    def before_stage(self, ctx: StageContext) -> None:
        self._draws = ctx.generator(purpose=DRAW_PURPOSE)

    def after_backward(self, ctx: StageContext, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        if not ctx.earlier_tasks:
            return None
        params = dict(ctx.model.named_parameters())
        names = list(grads)
        loss = torch.stack([self._buffer_loss(ctx, task) for task in ctx.earlier_tasks]).sum()
        reference = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        self.reference = {n: torch.zeros_like(grads[n]) if r is None else r for n, r in zip(names, reference)}
        return agem_project(grads, self.reference)

    def _buffer_loss(self, ctx: StageContext, task: Any) -> torch.Tensor:
        stored = self.buffer.draw(task.name, self.batch, self._draws, ctx.device)
        with no_bn_update(ctx.model):
            return ctx.task_loss(task, ctx.model(stored["images"]), stored["targets"])

    def after_stage(self, ctx: StageContext) -> None:
        self.reference = {}
        if not ctx.is_last:
            self.buffer.store(ctx)

    def state_dict(self) -> dict[str, Any]:
        return self.buffer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state)
