"""What a strategy costs inside a stage, measured where it happens: the bytes it holds (teacher copies, Fisher and
importance tensors, buffers, stored outputs), and the forward and backward passes of any UniHeadNet per optimizer
step (a teacher, a buffer or a reference pass runs on a copy or on the model itself, so they are counted at the
module, through global module hooks, not in the loop)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from types import FunctionType, ModuleType
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from clbench.model import UniHeadNet

_SKIP = (type, ModuleType, FunctionType, Dataset, DataLoader, torch.Generator, str, bytes, int, float, bool)


def held_bytes(strategy: Any, model: nn.Module) -> int:
    """Bytes of every tensor ``strategy`` holds (through its attributes, containers and modules), each storage
    once; the live model's own parameters and buffers, and datasets it merely refers to, are not the strategy's."""
    live = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen_objects, seen_storage, total = {id(model)}, set(live), 0
    stack: list[Any] = [strategy]
    while stack:
        item = stack.pop()
        if id(item) in seen_objects or isinstance(item, _SKIP) or item is None:
            continue
        seen_objects.add(id(item))
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            if storage.data_ptr() not in seen_storage:
                seen_storage.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(item, nn.Module):
            stack += [*item.parameters(), *item.buffers()]
        elif isinstance(item, dict):
            stack += list(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack += list(item)
        elif hasattr(item, "__dict__"):
            stack += list(vars(item).values())
    return total


SAMPLE_EVERY = 50   # the strategy's bytes: at the stage's first forward pass, every 50th, and after its after_stage


@dataclass
class StageCost:
    """One stage's counts: optimizer steps, forward and backward passes of any UniHeadNet during training, and the
    most bytes the strategy held at any sampled point: the live model's first forward pass, every ``SAMPLE_EVERY``-th
    and after the stage's after_stage (state is built in before_stage, before_epoch and after_stage; walking it at
    every step would cost a fast GPU step a noticeable share). Nothing here touches the loop."""

    strategy: Any = field(default=None, repr=False)
    model: nn.Module | None = field(default=None, repr=False)
    steps: int = 0
    forwards: int = 0
    backwards: int = 0
    peak_state_bytes: int = 0
    counting: bool = field(default=True, repr=False)
    _live_forwards: int = field(default=0, repr=False)

    def sample(self) -> None:
        """The strategy's bytes now, kept if they are the most so far."""
        self.peak_state_bytes = max(self.peak_state_bytes, held_bytes(self.strategy, self.model))

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Passes inside (in-stage evaluation) are not the strategy's."""
        self.counting = False
        try:
            yield
        finally:
            self.counting = True

    @contextlib.contextmanager
    def counted(self) -> Iterator["StageCost"]:
        """Count every UniHeadNet forward pass while inside (a global forward hook, removed after), and every
        backward pass that reaches one: a gradient hook on that forward's outputs, counted once per forward."""
        def forward(module: nn.Module, args: Any, output: Any) -> None:
            if not (self.counting and isinstance(module, UniHeadNet)):
                return
            self.forwards += 1
            if module is self.model:
                self._live_forwards += 1
                if self._live_forwards % SAMPLE_EVERY == 1:
                    self.sample()
            outputs = [t for t in output.values() if t.requires_grad]
            reached = [False]

            def backward(grad: torch.Tensor) -> None:
                if not reached[0]:
                    reached[0] = True
                    self.backwards += 1
            for tensor in outputs:
                tensor.register_hook(backward)
        handle = nn.modules.module.register_module_forward_hook(forward)
        try:
            yield self
        finally:
            handle.remove()
