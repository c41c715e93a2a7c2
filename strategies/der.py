"""Dark Experience Replay++ (Buzzega et al., "Dark Experience for General Continual Learning: a Strong,
Simple Baseline", NeurIPS 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clbench.buffer import Rehearsal
from clbench.freezing import no_bn_update
from clbench.strategy import StageContext, register


@register("der")
class DER(Rehearsal):
    """Replay stored images of earlier tasks against their stored outputs and labels (DER++).

    A buffer of at most N images per earlier task with the outputs the network gave them when stored (the
    task's own slice: seg logits at head stride, the det grid, cls logits); each step adds
    α · MSE(outputs now, stored outputs) + β · the task's own loss on the stored labels (DER++, eq. 6).

    Outputs are stored at the end of the task's stage, in eval mode (as the network serves the task then);
    one draw of ``batch`` items per task serves both terms (DER++ draws twice; one draw halves the passes)."""

    def __init__(self, *, alpha: float = 0.5, beta: float = 0.5, per_task: int = 10, batch: int = 4,
                 update_bn: bool = False) -> None:
        if alpha < 0 or beta < 0:
            raise ValueError("need alpha >= 0 and beta >= 0")
        super().__init__(per_task=per_task, batch=batch, update_bn=update_bn)
        self.alpha, self.beta = alpha, beta

    def loss_term(self, ctx: StageContext, images: torch.Tensor, outputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        terms = []
        for task in ctx.earlier_tasks:
            stored, replayed = self.replay(ctx, task)
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
