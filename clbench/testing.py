"""A smoke test for strategy authors: real 3-stage runs on a tiny model and tiny data, in seconds.

    from clbench.testing import smoke_test
    rows = smoke_test("my_plugin.py:MyStrategy", options={"mystrategy.strength": 0.5})
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from clbench import ClbenchError
from clbench.benchmarks.synthetic import SynthSpec, generate
from clbench.config import resolve
from clbench.plugins import create
from clbench.recorder import read_rows
from clbench.run import run
from clbench.runtime import Session
from clbench.strategy import REGISTRY, Strategy, register

TINY_DATA = SynthSpec(seed=0, n_train=12, n_val=10, min_side=40, max_side=56)


def tiny_run_settings(data_root: Path, out: Path) -> dict[str, str]:
    """Settings of a 3-stage run that takes a few seconds on a CPU (timm's test_efficientnet, 48 px)."""
    return {"data_root": str(data_root), "out": str(out), "backbone": "test_efficientnet", "image_size": "48",
            "head_channels": "16", "epochs": "1", "batch_size": "4", "device": "cpu", "progress": "false",
            "latency_sizes": ""}


def smoke_test(strategy: str | type[Strategy], *, options: dict[str, Any] | None = None,
               workdir: Path | None = None, settings: dict[str, str] | None = None) -> pd.DataFrame:
    """Run ``strategy`` (a name, a reference ``file.py:Class``, or a Strategy subclass) through every stage
    and check that every task was evaluated after every stage with finite primary metrics. ``settings``: run
    settings on top of the tiny ones, e.g. ``{"device": "cuda", "amp": "fp16"}``. A strategy that
    declares ``shares_first_stage`` is run a second time from a stage-1 cache written by naive, as
    `clbench compare` would: both runs must give the same metrics, or the declaration is wrong."""
    if isinstance(strategy, type):
        name = strategy.__dict__.get("name") or strategy.__name__.lower()  # its own, not an inherited name
        if REGISTRY.get(name) is not strategy:
            register(name)(strategy)
        strategy = name
    session = Session()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = generate(Path(tmp) / "data", TINY_DATA)
        settings = {**tiny_run_settings(root, Path(tmp) / "results"), **(settings or {}), "strategy": strategy,
                    "set": options or {}}
        rows = read_rows(run(resolve(None, {**settings, "run_id": "smoke"}), session=session))
        if create(strategy, options or {})[0].shares_first_stage:
            cache = Path(tmp) / "stage1.pt"
            run(resolve(None, {**settings, "strategy": "naive", "set": {}, "run_id": "naive"}), stage1_cache=cache,
                session=session)
            cached = read_rows(run(resolve(None, {**settings, "run_id": "cached"}), stage1_cache=cache, session=session))
            _same_metrics(rows, cached)
    primary = rows[rows["metric"].isin(["mAP", "mIoU", "top1"])]
    assert sorted(primary["stage"].unique()) == [0, 1, 2, 3], "not every stage was evaluated"
    assert len(primary) == 12, "every task must be evaluated after every stage"
    assert all(math.isfinite(v) for v in primary["value"]), "a primary metric is not finite"
    return rows


def _same_metrics(trained: pd.DataFrame, cached: pd.DataFrame) -> None:
    columns = ["stage", "eval_task", "metric", "value"]
    if not trained[columns].equals(cached[columns]):
        raise ClbenchError("the strategy declares shares_first_stage, but a run from a stage-1 cache (as `clbench "
                           "compare` would serve it) gives other metrics than a run that trains stage 1: its hooks "
                           "change or record something in stage 1, so it must not declare shares_first_stage")
