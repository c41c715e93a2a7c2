"""A test plugin for the Ray executor: a cell that stalls or fails at the start of stage 2, at a known point."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from clbench.strategy import StageContext, Strategy, register


@register("stall")
class Stall(Strategy):
    """``mode=block``: after the first training step of stage 2 (a data-loader worker is alive with --workers 1)
    the first attempt of each seed writes ``<marker>/seed<N>`` (its pid and Ray node) and waits until
    ``<marker>/release`` exists (at most 120 s); later attempts go on. ``mode=raise``: at the start of stage 2,
    appends a line to ``<marker>/attempts`` and raises (an error that would recur)."""

    shares_first_stage = True

    def __init__(self, *, marker: str = "", mode: str = "block") -> None:
        self.marker, self.mode, self.steps = Path(marker), mode, 0

    def before_stage(self, ctx: StageContext) -> None:
        self.steps = 0
        if ctx.stage == 2 and str(self.marker) and self.mode == "raise":
            self.marker.mkdir(parents=True, exist_ok=True)
            with open(self.marker / "attempts", "a") as fh:
                fh.write(f"{os.getpid()}\n")
            raise RuntimeError("stall: a deliberate failure that would recur")

    def after_step(self, ctx: StageContext) -> None:
        self.steps += 1
        if ctx.stage != 2 or self.steps != 1 or not str(self.marker) or self.mode != "block":
            return
        self.marker.mkdir(parents=True, exist_ok=True)
        mine = self.marker / f"seed{ctx.seed}"
        if mine.exists():
            return
        try:
            import ray
            node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        except ImportError:
            node = ""
        mine.write_text(json.dumps({"pid": os.getpid(), "node": node}))
        deadline = time.time() + 120
        while not (self.marker / "release").exists() and time.time() < deadline:
            time.sleep(0.2)
