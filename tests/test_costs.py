"""What each strategy costs: the bytes it holds and the passes it makes, measured where they happen, and the cost
block that reports them beside the drop."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import torch
from conftest import flags

from clbench.config import resolve
from clbench.costs import StageCost, held_bytes
from clbench.model import UniHeadNet
from clbench.report import cost_table
from clbench.run import run


def test_held_bytes_counts_what_the_strategy_holds_not_the_live_model(specs):
    model = UniHeadNet(tasks=specs, backbone="test_efficientnet", head_channels=8)
    size = sum(t.untyped_storage().nbytes() for t in (*model.parameters(), *model.buffers()))

    class Holder:
        pass
    holder = Holder()
    holder.model = model                                   # a reference to the live network: not the strategy's
    assert held_bytes(holder, model) == 0
    holder.teacher = copy.deepcopy(model)                  # a frozen copy is
    holder.fisher = {"w": torch.zeros(100), "same": None}
    holder.again = [holder.fisher["w"][:10]]               # a view of a tensor already counted: once
    assert held_bytes(holder, model) == size + 400


def test_passes_are_counted_at_the_module_once_per_forward(specs):
    model = UniHeadNet(tasks=specs, backbone="test_efficientnet", head_channels=8)
    teacher = copy.deepcopy(model).eval()
    cost = StageCost()
    with cost.counted():
        out = model(torch.randn(2, 3, 32, 32))
        (out["seg"].mean() + out["cls"].mean()).backward()     # one backward through two outputs: one pass
        with torch.no_grad():
            teacher(torch.randn(2, 3, 32, 32))                 # a teacher pass: a forward, no backward
        with cost.paused():
            model(torch.randn(2, 3, 32, 32))                   # evaluation: not the strategy's
    model(torch.randn(2, 3, 32, 32))                           # outside: not counted
    assert (cost.forwards, cost.backwards) == (2, 1)


@pytest.mark.parametrize("strategy, extra_forward, extra_backward", [
    ("naive", [0, 0, 0], [0, 0, 0]),
    ("lwf", [0, 1, 1], [0, 0, 0]),                 # one teacher forward per step from stage 2
    ("agem", [0, 1, 2], [0, 1, 2]),                # a reference pass per earlier task
])
@pytest.mark.slow
def test_every_stage_records_its_passes_and_state(tiny_args, strategy, extra_forward, extra_backward):
    run_dir = run(resolve(None, {**tiny_args, "strategy": strategy, "run_id": strategy}))
    stages = json.loads((run_dir / "resources.json").read_text())["stages"]
    assert [s["forwards"] / s["steps"] - 1 for s in stages.values()] == extra_forward
    assert [s["backwards"] / s["steps"] - 1 for s in stages.values()] == extra_backward
    held = [s["strategy_bytes"] for s in stages.values()]
    assert (max(held) == 0) == (strategy == "naive")


def test_the_cost_block_pairs_time_with_naive_of_the_same_seed():
    costs = pd.DataFrame([
        {"strategy": "naive", "seed": 0, "train_seconds": 10.0, "state_mb": 0.0, "extra_forward": 0.0,
         "extra_backward": 0.0, "peak_mb": 900.0},
        {"strategy": "naive", "seed": 1, "train_seconds": 20.0, "state_mb": 0.0, "extra_forward": 0.0,
         "extra_backward": 0.0, "peak_mb": 900.0},
        {"strategy": "lwf", "seed": 0, "train_seconds": 15.0, "state_mb": 1.5, "extra_forward": 1.0,
         "extra_backward": 0.0, "peak_mb": 950.0},
        {"strategy": "lwf", "seed": 1, "train_seconds": 20.0, "state_mb": 2.5, "extra_forward": 1.0,
         "extra_backward": 0.0, "peak_mb": 1050.0}])
    table = cost_table(costs, ["naive", "lwf"]).set_index("Strategy")
    assert table.at["lwf", "training time vs naive"] == "1.25x ± 0.35"       # mean of 1.5 and 1.0, sample std
    assert table.at["naive", "training time vs naive"] == "1.00x ± 0.00"
    assert table.at["lwf", "strategy state (MB)"] == "2.00 ± 0.71" and table.at["lwf", "peak memory (MB)"] == "1000 ± 71"


@pytest.mark.slow
def test_the_cost_block_reaches_the_summary_and_clbench_table(tiny_args, capsys):
    from clbench.cli import main
    assert main(["compare", "--strategies", "naive,lwf", "--name", "cost", *flags(tiny_args, bounds="none")]) == 0
    assert "| training time vs naive |" in capsys.readouterr().out
    assert main(["table", tiny_args["out"] + "/cost", "--costs"]) == 0
    out = capsys.readouterr().out
    assert "| lwf " in out and "extra forward / step" in out and "measured, not declared" in out
