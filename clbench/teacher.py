"""Reading a network for distillation: a frozen teacher snapshot and named feature taps."""

from __future__ import annotations

import copy
from collections import deque
from typing import Any

import torch
from torch import nn

from clbench import ClbenchError
from clbench.accel import compiled_like

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
