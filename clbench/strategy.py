"""The plugin base class and the strategy registry.

The training loop, per stage k that trains task T (``clbench.loop``)::

    strategy.before_stage(ctx)              # freeze parameters, snapshot a teacher, ...
    optimizer = AdamW(p for p in model.parameters() if p.requires_grad)   # built AFTER before_stage
    for epoch in range(epochs[T]):
        model.train()
        strategy.before_epoch(ctx)          # e.g. put BatchNorm layers back into eval mode
        for images, targets, task_labels in ctx.train_loader:
            outputs = model(images)
            loss = ctx.task_loss(T, outputs, targets)
            term = strategy.loss_term(ctx, images, outputs)   # a value: the loop adds it (None = nothing)
            (loss + term).backward(); clip; optimizer.step()
            strategy.after_step(ctx)
    strategy.after_stage(ctx)               # restore slices, compute a Fisher, fill a buffer, ...
    evaluate every task; save checkpoint {model, strategy.state_dict()}

Hooks return values; they never reach into the loop's variables. A strategy that changes how the
first stage trains sets ``changes_first_stage = True`` (so a cached stage 1 is never reused for it).
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader

from clbench import ClbenchError
from clbench.tasks import TaskSpec


@dataclass(frozen=True)
class StageContext:
    """What a hook may read about the current stage."""

    model: nn.Module
    stage: int                      # 1-based; stage k trains tasks[k - 1]
    task: TaskSpec
    tasks: tuple[TaskSpec, ...]     # every task, in stream order
    train_loader: DataLoader
    device: torch.device
    task_loss: Callable[[TaskSpec, dict[str, torch.Tensor], Any], torch.Tensor]

    @property
    def earlier_tasks(self) -> tuple[TaskSpec, ...]:
        return self.tasks[: self.stage - 1]


class Strategy:
    """A forgetting strategy. Subclass, register with ``@register("name")``, override hooks you need."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    changes_first_stage: ClassVar[bool] = False

    def before_stage(self, ctx: StageContext) -> None:
        """Before the optimizer is built: freezing here keeps parameters out of it."""

    def before_epoch(self, ctx: StageContext) -> None:
        """Right after the loop's ``model.train()``."""

    def loss_term(self, ctx: StageContext, images: torch.Tensor,
                  outputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """An extra loss term for this step, or None."""
        return None

    def after_step(self, ctx: StageContext) -> None:
        """After ``optimizer.step()``."""

    def after_stage(self, ctx: StageContext) -> None:
        """After the last epoch, before evaluation and the checkpoint."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ClbenchError(f"strategy {self.name!r} keeps no state but the checkpoint has {sorted(state)}")


REGISTRY: dict[str, type[Strategy]] = {}


def register(name: str) -> Callable[[type[Strategy]], type[Strategy]]:
    """Class decorator: add a strategy under ``name``; a second class under the same name is an error."""
    def add(cls: type[Strategy]) -> type[Strategy]:
        if name in REGISTRY and REGISTRY[name] is not cls:
            raise ClbenchError(f"strategy name {name!r} registered twice: {REGISTRY[name].__module__} and "
                               f"{cls.__module__}")
        cls.name = name
        cls.description = cls.description or (cls.__doc__ or "").strip().split("\n")[0]
        REGISTRY[name] = cls
        return cls
    return add


def load_builtins() -> dict[str, type[Strategy]]:
    """Import every module of ``clbench.strategies`` so their ``@register`` calls run."""
    package = importlib.import_module("clbench.strategies")
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"clbench.strategies.{module.name}")
    return REGISTRY


def create_strategy(name: str) -> Strategy:
    registry = load_builtins()
    if name not in registry:
        hint = difflib.get_close_matches(name, registry, n=1)
        raise ClbenchError(f"strategy {name!r} not found" + (f"; did you mean {hint[0]!r}?" if hint else "") +
                           f" (available: {', '.join(sorted(registry))})")
    return registry[name]()
