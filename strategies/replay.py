"""Experience replay with a tiny buffer (the assignment's rule: at most 10 images per task per step)."""

from __future__ import annotations

import torch

from clbench.buffer import Rehearsal
from clbench.strategy import StageContext, register


@register("replay")
class Replay(Rehearsal):
    """Keep at most N images per earlier task; each step adds that task's own loss on a few of them.

    Which images are stored and which are replayed is drawn from the run's seed (``ctx.generator``), so the
    spread over seeds includes the buffer's. The replayed batches are normalised with their own batch
    statistics but do not update BN running statistics (``no_bn_update``), like every buffer pass, unless
    ``update_bn`` (this strategy's behaviour before that contract: it kept much more of the earlier tasks
    on the synthetic benchmark, see docs/results.md)."""

    def __init__(self, *, per_task: int = 10, batch: int = 4, update_bn: bool = False) -> None:
        super().__init__(per_task=per_task, batch=batch, update_bn=update_bn)

    def loss_term(self, ctx: StageContext, images: torch.Tensor, outputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        terms = []
        for task in ctx.earlier_tasks:
            stored, replayed = self.replay(ctx, task)
            terms.append(ctx.task_loss(task, replayed, stored["targets"]))
        return torch.stack(terms).sum() if terms else None

    def after_stage(self, ctx: StageContext) -> None:
        self.buffer.store(ctx)
