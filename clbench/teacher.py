"""Reading a network for distillation: a frozen teacher snapshot, named feature taps, and the base of the strategies
that distil outputs from a snapshot of the previous stage."""

from __future__ import annotations

import copy
from collections import deque
from typing import Any, Callable

import torch
from torch import nn

from clbench import ClbenchError
from clbench.accel import compiled_like
from clbench.incremental import select_classes
from clbench.strategy import StageContext, Strategy
from clbench.tasks import TaskSpec

HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks")


class FrozenTeacher(nn.Module):
    """A module that stays in eval mode: ``train()`` cannot move its BatchNorm statistics."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)

    def forward(self, x: torch.Tensor) -> Any:
        with torch.no_grad():
            return self.model(x)


def frozen_teacher(model: nn.Module) -> FrozenTeacher:
    """A deep copy of ``model`` in eval mode, without gradients, without the hooks the student carries
    (feature taps, gradient masks), whose BN statistics nothing can update."""
    twin = compiled_like(model, copy.deepcopy(model))
    for module in twin.modules():
        for table in HOOK_TABLES:
            getattr(module, table, {}).clear()
    return FrozenTeacher(twin.requires_grad_(False)).eval()


class FeatureTaps:
    """Named intermediate features of a UniHeadNet's forward passes: ``backbone.0`` … (the backbone's feature
    maps, shallow to deep) and ``neck`` (the fused map the head reads). ``taps.of(images)`` returns those of
    the forward pass whose input was ``images`` (the last few passes are kept), so other forwards in the same
    step (a buffer pass, a teacher) do not mix in. ``close()`` removes the hooks."""

    KEEP = 4

    def __init__(self, model: nn.Module) -> None:
        root = model.model if isinstance(model, FrozenTeacher) else model
        self._passes: deque[tuple[torch.Tensor, dict[str, torch.Tensor]]] = deque(maxlen=self.KEEP)
        self._current: dict[str, torch.Tensor] = {}
        self._handles = [root.register_forward_pre_hook(self._start),
                         root.backbone.register_forward_hook(self._backbone),
                         root.head.register_forward_pre_hook(self._neck)]

    def _start(self, module: nn.Module, args: tuple) -> None:
        self._current = {}
        self._passes.append((args[0], self._current))

    def _backbone(self, module: nn.Module, args: tuple, output: list[torch.Tensor]) -> None:
        self._current.update({f"backbone.{i}": feature for i, feature in enumerate(output)})

    def _neck(self, module: nn.Module, args: tuple) -> None:
        self._current["neck"] = args[0]

    def of(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        for seen, features in reversed(self._passes):
            if seen is images:
                return features
        raise ClbenchError("no forward pass of these images was tapped (taps keep the last "
                           f"{self.KEEP} passes; register them before the forward)")

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._passes.clear()


class SnapshotDistillation(Strategy):
    """Base of the strategies that learn from a frozen snapshot of the model taken before each stage (lwf, mib,
    had): the snapshot exists only where there is something to keep (``ctx.distilled``: earlier tasks, and a
    class-incremental task's earlier classes), and ``snapshot_pairs`` gives, per kept task, the student's and the
    snapshot's outputs on the current images, cut to the kept classes. Not registered itself."""

    shares_first_stage = True  # stage 1 has no earlier task or class: no snapshot, no term

    teacher: FrozenTeacher | None = None

    def before_stage(self, ctx: StageContext) -> None:
        self.teacher = frozen_teacher(ctx.model) if ctx.distilled else None

    def snapshot_pairs(self, ctx: StageContext, images: torch.Tensor, outputs: dict[str, torch.Tensor],
                       cut: Callable[[TaskSpec, tuple[int, ...] | None], tuple[int, ...] | None] | None = None
                       ) -> list[tuple[TaskSpec, tuple[int, ...] | None, torch.Tensor, torch.Tensor]]:
        """(task, kept classes or None, student output, snapshot output) for every kept task, both outputs cut to
        the kept classes (or to ``cut(task, kept)``); [] without a snapshot."""
        if self.teacher is None:
            return []
        targets, cut = self.teacher(images), cut or (lambda task, classes: classes)
        return [(t, classes, select_classes(outputs[t.name], t.kind, cut(t, classes)),
                 select_classes(targets[t.name], t.kind, cut(t, classes))) for t, classes in ctx.distilled]

    def after_stage(self, ctx: StageContext) -> None:
        self.teacher = None  # taken again from the current weights before the next stage
