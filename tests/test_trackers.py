"""TensorBoard and MLflow logging, read back with each tool's own reader and checked against metrics.csv."""

import json
import math
import sys
from pathlib import Path

import pandas as pd
import pytest

from clbench import ClbenchError
from clbench.cli import main
from clbench.config import resolve
from clbench.run import run
from clbench.trackers import check_installed

pytest.importorskip("tensorboard", reason="the test extra installs tensorboard")
pytest.importorskip("mlflow", reason="the test extra installs mlflow-skinny")

def same(a, b, rel):
    """Equal within ``rel``, where NaN (an undefined metric, e.g. AP of a size with no object) equals NaN."""
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=rel, abs=1e-7 if rel else 0)


STEPS = 9   # 3 stages x 1 epoch x ceil(12 images / batch 4)


def tensorboard_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events, {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def mlflow_client(run_dir):
    from mlflow.tracking import MlflowClient
    state = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    return MlflowClient(tracking_uri=state["tracking_uri"]), state["run_id"]


def test_every_metric_of_every_stage_reaches_tensorboard_and_mlflow(tiny_args, monkeypatch):
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    run_dir = run(resolve(None, {**tiny_args, "strategy": "lwf", "run_id": "tracked", "log": "tensorboard,mlflow"}))
    rows = pd.read_csv(run_dir / "metrics.csv")
    events, scalars = tensorboard_scalars(run_dir)
    client, run_id = mlflow_client(run_dir)
    for row in rows.itertuples():
        key = f"{row.eval_task}/{row.metric}"
        logged = dict(scalars[key])[row.stage]
        assert same(logged, row.value, rel=1e-6), key   # float32 in event files
        history = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        assert same(history[row.stage], row.value, rel=0), key
    assert [step for step, _ in scalars["train/loss"]] == list(range(1, STEPS + 1))
    assert [step for step, _ in scalars["train/term_lwf"]] == list(range(4, STEPS + 1))   # LwF has a term from stage 2
    assert len(client.get_metric_history(run_id, "train/loss_seg")) == 3
    assert len(events.Images("stage_task_matrix")) == 4
    artifacts = {a.path for a in client.list_artifacts(run_id, "stage_task_matrix")}
    assert artifacts == {f"stage_task_matrix/stage{k}.png" for k in range(4)}
    run_info = client.get_run(run_id)
    assert run_info.info.status == "FINISHED" and run_info.info.run_name == "tracked"
    assert run_info.data.params["strategy"] == "lwf" and run_info.data.params["lr.seg"] == "0.002"
    assert "git_commit" in run_info.data.tags
    assert [step for step, _ in scalars["resources/train_seconds"]] == [1, 2, 3]
    import os
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"   # MLflow's usage telemetry was turned off


def test_a_resumed_run_continues_its_tracker_runs(tiny_args):
    run_dir = run(resolve(None, {**tiny_args, "strategy": "naive", "run_id": "again", "log": "tensorboard,mlflow"}))
    client, run_id = mlflow_client(run_dir)
    (run_dir / "checkpoints" / "stage3.pt").unlink()   # as if killed during stage 3
    run(resolve(None, {**tiny_args, "strategy": "naive", "run_id": "again", "log": "tensorboard,mlflow"}), resume=True)
    assert mlflow_client(run_dir)[1] == run_id
    experiment = client.get_experiment_by_name("clbench")
    assert len(client.search_runs([experiment.experiment_id])) == 1
    assert client.get_run(run_id).info.status == "FINISHED"
    _, scalars = tensorboard_scalars(run_dir)
    steps = [step for step, _ in scalars["train/loss"]]
    assert steps == list(range(1, STEPS + 1))   # the redone stage's steps replace the interrupted ones


def test_a_comparison_is_one_experiment_with_a_run_per_cell(small_comparison):
    client, _ = mlflow_client(small_comparison / "runs" / "naive-seed0")
    experiment = client.get_experiment_by_name(small_comparison.name)
    names = {r.info.run_name for r in client.search_runs([experiment.experiment_id])}
    assert names == {"naive-seed0", "bn_per_task-seed0", "naive-seed1", "bn_per_task-seed1", "joint-seed0",
                     "joint-seed1"}
    assert (small_comparison / "mlruns").is_dir()   # the local store sits in the comparison folder
    assert all((small_comparison / ("bounds" if cell.startswith("joint") else "runs") / cell / "tensorboard").is_dir()
               for cell in names)


def test_a_missing_tracker_package_is_a_one_line_error_naming_the_extra(tiny_args, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)   # import mlflow now raises ImportError
    with pytest.raises(ClbenchError, match=r'pip install "clbench\[mlflow\]"'):
        check_installed(["mlflow"])
    args = ["run", *[f"--{k.replace('_', '-')}={v}" for k, v in tiny_args.items()], "--log", "mlflow",
            "--run-id", "never"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "clbench[mlflow]" in err
    assert not (Path(tiny_args["out"]) / "never").exists()   # refused before the run folder was claimed


def test_an_unknown_tracker_is_refused():
    with pytest.raises(ClbenchError, match="log"):
        resolve(None, {"log": "wandb"})


def test_the_curve_points_reach_tensorboard_at_their_global_steps(tiny_args):
    pytest.importorskip("tensorboard", reason="the test extra installs tensorboard")
    import pandas as pd
    run_dir = run(resolve(None, {**tiny_args, "run_id": "curve", "log": "tensorboard", "eval_every": "2",
                                 "probe": "4"}))
    _, scalars = tensorboard_scalars(run_dir)
    curve = pd.read_csv(run_dir / "curve.csv")
    for task, points in curve.groupby("eval_task"):
        logged = dict(scalars[f"curve/{task}/{points.metric.iloc[0]}"])
        assert sorted(logged) == sorted(points.global_step)
        assert all(same(logged[step], value, rel=1e-6) for step, value in zip(points.global_step, points.value))
