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
    """Does nothing, unless $CLBENCH_TEST_BLOCK is ``MARKER[:STAGE[:STEP]]``: then, at the start of STAGE
    (default 2; STEP 0, the default) or after its STEP-th training step, it writes MARKER and waits to be killed.
    Composed with another strategy (``ewc+…:Blocking``) it stops that strategy at a known point."""

    shares_first_stage = True

    def __init__(self) -> None:
        self.steps = 0

    def _block_if(self, stage: int, step: int) -> None:
        setting = os.environ.get("CLBENCH_TEST_BLOCK")
        if not setting:
            return
        marker, *where = setting.split(":")
        wanted = (int(where[0]) if where else 2, int(where[1]) if len(where) > 1 else 0)
        if (stage, step) == wanted:
            Path(marker).write_text(str(os.getpid()))
            while True:
                time.sleep(1)

    def before_stage(self, ctx: StageContext) -> None:
        self.steps = 0
        self._block_if(ctx.stage, 0)

    def after_step(self, ctx: StageContext) -> None:
        self.steps += 1
        self._block_if(ctx.stage, self.steps)
