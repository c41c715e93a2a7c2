"""Per-task BatchNorm statistics: each task served with the running statistics of its own stage.

The remedy for BN drift in the task-incremental setting (the task id is known at test time: each task has
its own head slice), as in task-specific normalisation (e.g. Xie et al., "Task-incremental learning with
task-specific batch normalization"; Pham et al., "Continual Normalization", ICLR 2022, discuss why the
statistics drift). Not usable where the task must be inferred from the image (class-incremental).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from clbench.freezing import batchnorm_layers, batchnorm_state
from clbench.strategy import StageContext, Strategy, register
from clbench.tasks import TaskSpec


@register("bn_per_task")
class BNPerTask(Strategy):
    """Serve each task with the BatchNorm statistics of its own stage; train naively.

    A bank of BN running statistics (optionally affine parameters) per task, saved at the end of the task's
    stage and swapped in when that task is evaluated or served; training is naive fine-tuning."""

    shares_first_stage = True  # the bank is filled in after_stage
    protects = "tasks"   # per earlier task; a class-incremental task's earlier classes are not served (DESIGN §8)

    def __init__(self, *, affine: bool = False) -> None:
        self.affine = affine
        self.bank: dict[str, dict[str, torch.Tensor]] = {}  # task → BN tensors at the end of its stage

    def after_stage(self, ctx: StageContext) -> None:
        state = batchnorm_state(ctx.model)
        if self.affine:
            state.update(affine_state(ctx.model))
        self.bank[ctx.task.name] = state

    def evaluation_state(self, model: nn.Module, task: TaskSpec) -> dict[str, torch.Tensor] | None:
        return self.bank.get(task.name)  # a task not trained yet is served with the live statistics

    def state_dict(self) -> dict[str, Any]:
        return {"bank": self.bank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bank = dict(state["bank"])


def affine_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every BN layer's weight and bias (state_dict names), cloned."""
    layers = set(map(id, batchnorm_layers(model)))
    return {f"{name}.{p}": getattr(module, p).detach().clone() for name, module in model.named_modules()
            if id(module) in layers for p in ("weight", "bias") if getattr(module, p, None) is not None}
