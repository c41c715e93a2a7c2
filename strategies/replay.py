"""Experience replay with a tiny buffer (the assignment's rule: at most 10 images per task per step)."""

from __future__ import annotations

from typing import Any

import torch

from clbench.buffer import DRAW_PURPOSE, Buffer
from clbench.freezing import no_bn_update
from clbench.strategy import StageContext, Strategy, register


@register("replay")
class Replay(Strategy):
    """Keep at most N images per earlier task; each step adds that task's own loss on a few of them.

    Which images are stored and which are replayed is drawn from the run's seed (``ctx.generator``), so the
    spread over seeds includes the buffer's. The replayed batches are normalised with their own batch
    statistics but do not update BN running statistics (``no_bn_update``), like every buffer pass."""

    shares_first_stage = True  # stage 1 has no earlier task; the buffer is filled in after_stage

    def __init__(self, *, per_task: int = 10, batch: int = 4) -> None:
        if not 1 <= batch <= per_task:
            raise ValueError("need 1 <= batch <= per_task")
        self.batch = batch
        self.buffer = Buffer(per_task)
        self._draws: torch.Generator | None = None

    def before_stage(self, ctx: StageContext) -> None:
        self._draws = ctx.generator(purpose=DRAW_PURPOSE)

    def loss_term(self, ctx: StageContext, images: torch.Tensor, outputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        terms = []
        for task in ctx.earlier_tasks:
            stored = self.buffer.draw(task.name, self.batch, self._draws, ctx.device)
            with no_bn_update(ctx.model):
                replayed = ctx.model(stored["images"])
            terms.append(ctx.task_loss(task, replayed, stored["targets"]))
        return torch.stack(terms).sum() if terms else None

    def after_stage(self, ctx: StageContext) -> None:
        self.buffer.store(ctx)

    def state_dict(self) -> dict[str, Any]:
        return self.buffer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state)
