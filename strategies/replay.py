"""Experience replay with a tiny buffer (the assignment's rule: at most 10 images per task per step)."""

from __future__ import annotations

from typing import Any

import torch

from clbench.loop import to_device
from clbench.strategy import StageContext, Strategy, register


def take(targets: Any, index: torch.Tensor) -> Any:
    """Select items of a collated target batch: a list (detection dicts) or a stacked tensor."""
    return [targets[i] for i in index.tolist()] if isinstance(targets, list) else targets[index]


@register("replay")
class Replay(Strategy):
    """Keep at most N images per earlier task; each step adds that task's own loss on a few of them.

    Which images are stored and which are replayed is drawn from the run's seed (``ctx.generator``), so the
    spread over seeds includes the buffer's."""

    shares_first_stage = True  # stage 1 has no earlier task; the buffer is filled in after_stage

    def __init__(self, *, per_task: int = 10, batch: int = 4) -> None:
        if not 1 <= batch <= per_task:
            raise ValueError("need 1 <= batch <= per_task")
        self.per_task, self.batch = per_task, batch
        self.buffer: dict[str, dict[str, Any]] = {}  # task → {"images", "targets", "indices"}
        self._draws: torch.Generator | None = None

    def before_stage(self, ctx: StageContext) -> None:
        self._draws = ctx.generator(purpose=1)

    def loss_term(self, ctx: StageContext, images: torch.Tensor, outputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        terms = []
        for task in ctx.earlier_tasks:
            stored = self.buffer[task.name]
            pick = torch.randperm(len(stored["images"]), generator=self._draws)[: self.batch]
            x, y = to_device(stored["images"][pick], ctx.device), to_device(take(stored["targets"], pick), ctx.device)
            terms.append(ctx.task_loss(task, ctx.model(x), y))
        return torch.stack(terms).sum() if terms else None

    def after_stage(self, ctx: StageContext) -> None:
        dataset = ctx.train_loader.dataset
        indices = torch.randperm(len(dataset), generator=ctx.generator(purpose=2))[: self.per_task].sort().values
        images, targets, _ = dataset.collate_fn([dataset[i] for i in indices.tolist()])
        self.buffer[ctx.task.name] = {"images": images, "targets": targets, "indices": indices}

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer = dict(state["buffer"])
