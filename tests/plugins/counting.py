"""Test plugins for the seams: a strategy that records something in stage 1 without declaring it, and one
that blocks in stage 2 (so a test can kill a comparison at a known point)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from clbench.strategy import StageContext, Strategy, register


@register("counting")
class Counting(Strategy):
    """Counts its stage-1 steps and adds a tiny loss term that depends on the count: a cached stage 1 would
    change its numbers. Declares nothing about stage 1, so it must never be served from the cache."""

    def __init__(self) -> None:
        self.steps = 0

    def loss_term(self, ctx: StageContext, images: torch.Tensor, outputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if ctx.stage == 1:
            self.steps += 1
            return 0.01 * self.steps * outputs[ctx.task.name].float().mean()
        return None

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])


@register("blocking")
class Blocking(Strategy):
    """Plain fine-tuning that, when $CLBENCH_TEST_BLOCK names a file, writes it at the start of stage 2 and
    then waits to be killed."""

    shares_first_stage = True

    def before_stage(self, ctx: StageContext) -> None:
        marker = os.environ.get("CLBENCH_TEST_BLOCK")
        if marker and ctx.stage == 2:
            Path(marker).write_text(str(os.getpid()))
            while True:
                time.sleep(1)
