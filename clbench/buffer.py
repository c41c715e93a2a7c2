"""A rehearsal buffer: at most N training images per task (the assignment's rule), drawn from the run's seed."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from clbench.freezing import no_bn_update
from clbench.strategy import StageContext, Strategy
from clbench.tasks import TaskSpec
from clbench.tensors import to_device

STORE_PURPOSE, DRAW_PURPOSE = 2, 1  # ctx.generator purposes: which images are stored / replayed


def take(targets: Any, index: torch.Tensor) -> Any:
    """Select items of a collated target batch: a list (detection dicts) or a stacked tensor."""
    return [targets[i] for i in index.tolist()] if isinstance(targets, list) else targets[index]


class Buffer:
    """Per task: ``images``, ``targets``, the dataset ``indices`` they came from, and whatever else a
    strategy stores with them (DER's outputs), all on the CPU and in ``state_dict``."""

    def __init__(self, per_task: int) -> None:
        self.per_task = per_task
        self.tasks: dict[str, dict[str, Any]] = {}

    def store(self, ctx: StageContext, extra: Callable[[torch.Tensor], dict[str, Any]] | None = None) -> None:
        """Draw at most ``per_task`` images of the stage's training set (training transforms applied);
        ``extra(images)`` adds per-image entries computed from them (e.g. the network's outputs now)."""
        dataset = ctx.train_loader.dataset
        generator = ctx.generator(purpose=STORE_PURPOSE)
        indices = torch.randperm(len(dataset), generator=generator)[: self.per_task].sort().values
        images, targets, _ = dataset.collate_fn([dataset[i] for i in indices.tolist()])
        entry = {"images": images, "targets": targets, "indices": indices}
        self.tasks[ctx.task.name] = {**entry, **(extra(images) if extra else {})}

    def draw(self, task: str, count: int, generator: torch.Generator, device: torch.device) -> dict[str, Any]:
        """``count`` stored items of ``task`` (without repetition), every entry sliced alike, on ``device``."""
        stored = self.tasks[task]
        pick = torch.randperm(len(stored["images"]), generator=generator)[:count]
        return {key: to_device(take(value, pick), device) for key, value in stored.items() if key != "indices"}

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.tasks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tasks = dict(state["buffer"])


class Rehearsal(Strategy):
    """Base of the buffer strategies (replay, der, agem): a ``Buffer`` of ``per_task`` images per task, filled
    at the end of each task's stage, ``batch`` of them replayed per earlier task and step, every draw from
    the run's seed, the buffer in the checkpoint. Not registered itself."""

    shares_first_stage = True  # stage 1 has no earlier task; the buffer is filled in after_stage
    protects = "tasks"   # the buffer holds earlier tasks' images, not a class-incremental task's earlier steps

    def __init__(self, *, per_task: int = 10, batch: int = 4, update_bn: bool = False) -> None:
        if not 1 <= batch <= per_task:
            raise ValueError("need 1 <= batch <= per_task")
        self.batch, self.update_bn = batch, update_bn
        self.buffer = Buffer(per_task)
        self._draws: torch.Generator | None = None

    def before_stage(self, ctx: StageContext) -> None:
        self._draws = ctx.generator(purpose=DRAW_PURPOSE)

    def replay(self, ctx: StageContext, task: TaskSpec) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """A draw of ``batch`` stored items of ``task`` and the model's outputs on its images, computed with
        batch statistics; BN running statistics are left alone (``no_bn_update``) unless ``update_bn``, which
        mixes the earlier tasks' statistics into the running ones, as a joint batch would."""
        stored = self.buffer.draw(task.name, self.batch, self._draws, ctx.device)
        with contextlib.nullcontext() if self.update_bn else no_bn_update(ctx.model):
            return stored, ctx.model(stored["images"])

    def state_dict(self) -> dict[str, Any]:
        return self.buffer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state)
