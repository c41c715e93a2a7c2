"""Freeze + weight-slice restore: the original UniHeadNet report's method (its §2)."""

from __future__ import annotations

from typing import Any

import torch

from clbench.freezing import freeze_matching, keep_gradient_in_slice, restore_slice, snapshot_slice
from clbench.strategy import StageContext, Strategy, register


@register("freeze_restore")
class FreezeRestore(Strategy):
    """From stage 2 freeze name patterns; last stage trains only its output slice; earlier slices restored."""

    shares_first_stage = True  # everything it does in stage 1 happens in after_stage
    protects = "tasks"   # per earlier task; a class-incremental task's earlier classes are not served (DESIGN §8)

    def __init__(self, *, patterns: tuple[str, ...] = ("blocks.0", "blocks.1"), last_stage_slice_only: bool = True) -> None:
        self.patterns = patterns
        self.last_stage_slice_only = last_stage_slice_only
        self.saved: dict[str, dict[str, torch.Tensor]] = {}  # task → its output-conv slice at the end of its stage
        self._hooks: list[Any] = []

    def before_stage(self, ctx: StageContext) -> None:
        if ctx.stage >= 2:
            freeze_matching(ctx.model, self.patterns)
        if ctx.stage >= 2 and ctx.is_last and self.last_stage_slice_only:
            head_out, channels = ctx.model.head_out, ctx.model.slices[ctx.task.name]
            for param in ctx.model.parameters():
                param.requires_grad_(False)
            for param in (head_out.weight, head_out.bias):
                param.requires_grad_(True)
                self._hooks.append(keep_gradient_in_slice(param, channels))

    def after_stage(self, ctx: StageContext) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        head_out = ctx.model.head_out
        self.saved[ctx.task.name] = snapshot_slice(head_out, ctx.model.slices[ctx.task.name])
        for task in ctx.earlier_tasks:
            restore_slice(head_out, ctx.model.slices[task.name], self.saved[task.name])

    def state_dict(self) -> dict[str, Any]:
        return {"saved": self.saved}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.saved = dict(state["saved"])
