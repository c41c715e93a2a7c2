"""Dark Experience Replay++ (Buzzega et al., "Dark Experience for General Continual Learning: a Strong,
Simple Baseline", NeurIPS 2020)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from clbench.buffer import DRAW_PURPOSE, Buffer
from clbench.freezing import no_bn_update
from clbench.strategy import StageContext, Strategy, register


@register("der")
class DER(Strategy):
    """A buffer of at most N images per earlier task with the outputs the network gave them when stored (the
    task's own slice: seg logits at head stride, the det grid, cls logits); each step adds
    α · MSE(outputs now, stored outputs) + β · the task's own loss on the stored labels (DER++, eq. 6).

    Outputs are stored at the end of the task's stage, in eval mode (as the network serves the task then);
    one draw of ``batch`` items per task serves both terms (DER++ draws twice; one draw halves the passes)."""

    shares_first_stage = True  # stage 1 has no earlier task; the buffer is filled in after_stage

    def __init__(self, *, alpha: float = 0.5, beta: float = 0.5, per_task: int = 10, batch: int = 4) -> None:
        if alpha < 0 or beta < 0 or not 1 <= batch <= per_task:
            raise ValueError("need alpha >= 0, beta >= 0 and 1 <= batch <= per_task")
        self.alpha, self.beta, self.batch = alpha, beta, batch
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
            logits = F.mse_loss(replayed[task.name].float(), stored["outputs"].float())
            terms.append(self.alpha * logits + self.beta * ctx.task_loss(task, replayed, stored["targets"]))
        return torch.stack(terms).sum() if terms else None

    def after_stage(self, ctx: StageContext) -> None:
        if not ctx.is_last:
            self.buffer.store(ctx, lambda images: {"outputs": self._outputs(ctx, images)})

    @staticmethod
    def _outputs(ctx: StageContext, images: torch.Tensor) -> torch.Tensor:
        ctx.model.eval()
        with torch.no_grad(), no_bn_update(ctx.model):
            return ctx.model(images.to(ctx.device))[ctx.task.name].float().cpu()

    def state_dict(self) -> dict[str, Any]:
        return self.buffer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state)
