"""Optional experiment trackers (TensorBoard, MLflow): a copy of what a run records, where users already look.

Offline by default: TensorBoard writes event files into the run folder; MLflow writes to a local file store
(``mlruns/`` beside the runs) unless ``--mlflow-uri`` names another, with its usage telemetry off
(``MLFLOW_DISABLE_TELEMETRY``). Nothing prompts, nothing is sent anywhere unless the user points MLflow at a
server. Each tracker's run id is saved in the run folder
(``trackers.json``), so a resumed run continues the same tracker runs.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import yaml

from clbench import ClbenchError
from clbench.drop import metric_matrix
from clbench.figures import pyplot
from clbench.results import TEST, atomic_write, to_json
from clbench.tasks import TaskSpec

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # tracker → the module it needs (extra of that name)
STATE_FILE = "trackers.json"


def offline() -> None:
    """MLflow 3 sends usage telemetry unless told not to: off, unless the user set the variable themselves."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def check_installed(names: Sequence[str]) -> None:
    """A one-line error naming the extra for a tracker whose package is missing (before anything is written)."""
    offline()
    for name in names:
        try:
            importlib.import_module(PACKAGES[name])
        except ImportError:
            raise ClbenchError(f"--log {name}: the {PACKAGES[name]} package is not installed; "
                               f"pip install \"clbench[{name}]\"") from None


@dataclass(frozen=True)
class TrackedRun:
    """Where and under which names one run is tracked."""

    run_dir: Path
    group: str          # the comparison's name (or "clbench" for a lone run): one MLflow experiment
    name: str           # the run's name in the tracker: the run id (<strategy>-seed<N> in a comparison)
    store: Path         # where local stores go (mlruns/)
    config: dict[str, Any]
    env: dict[str, Any]


class TensorBoard:
    """Event files in ``<run>/tensorboard``; ``tensorboard --logdir <comparison>/runs`` lines the cells up."""

    def __init__(self, run: TrackedRun, state: dict[str, Any], first_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter
        log_dir = run.run_dir / "tensorboard"
        # A resumed run redoes steps from first_step: purge what the interrupted attempt logged there.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=first_step if state else None)
        if not state:
            self.writer.add_text("config", _block(yaml.safe_dump(run.config, sort_keys=False)), 0)
            self.writer.add_text("env", _block(json.dumps(run.env, indent=1)), 0)
        self.state = {"log_dir": str(log_dir)}

    def scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def figure(self, tag: str, figure: Any, step: int) -> None:
        self.writer.add_figure(tag, figure, step, close=False)

    def close(self, status: str) -> None:
        self.writer.close()


class MLflow:
    """One MLflow run per clbench run, in the experiment named after the comparison."""

    def __init__(self, run: TrackedRun, state: dict[str, Any], uri: str | None) -> None:
        offline()
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient
        if uri is None:
            # MLflow 3 keeps its file store only behind this opt-out; a local folder is what offline needs.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run.store / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        if state:
            self.run_id = state["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = self.client.get_experiment_by_name(run.group)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(run.group)
            self.run_id = self.client.create_run(experiment_id, run_name=run.name).info.run_id
            params = [Param(k[:250], str(v)[:6000]) for k, v in _flat(run.config).items()]
            tags = [RunTag("git_commit", str(run.env.get("git_commit"))), RunTag("clbench.run_dir", str(run.run_dir))]
            self.client.log_batch(self.run_id, params=params, tags=tags)
            self.client.log_dict(self.run_id, run.env, "env.json")
        self.state = {"run_id": self.run_id, "tracking_uri": uri}

    def scalars(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def figure(self, tag: str, figure: Any, step: int) -> None:
        self.client.log_figure(self.run_id, figure, f"{tag}/stage{step}.png")

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


class Trackers:
    """Every tracker a run was asked for (none: every call does nothing)."""

    def __init__(self, trackers: dict[str, Any]) -> None:
        self.trackers = trackers

    @classmethod
    def open(cls, names: Sequence[str], run: TrackedRun, first_step: int, mlflow_uri: str | None) -> "Trackers":
        """Start (or, where ``trackers.json`` names them, continue) the trackers and save their ids."""
        if not names:
            return cls({})
        path = run.run_dir / STATE_FILE
        saved = json.loads(path.read_text()) if path.exists() else {}
        trackers: dict[str, Any] = {}
        for name in names:
            if name == "tensorboard":
                trackers[name] = TensorBoard(run, saved.get(name, {}), first_step)
            else:
                trackers[name] = MLflow(run, saved.get(name, {}), mlflow_uri)
        atomic_write(path, to_json({name: t.state for name, t in trackers.items()}))
        return cls(trackers)

    @property
    def active(self) -> bool:
        return bool(self.trackers)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tracker in self.trackers.values():
            tracker.scalars(values, step)

    def stage(self, stage: int, rows: list[dict[str, Any]], tasks: Sequence[TaskSpec]) -> None:
        """Every metric of every task after ``stage`` (step = stage), and the stage × task matrix so far."""
        if not self.active:
            return
        self.scalars({f"{'' if r.get('split', TEST) == TEST else r['split'] + '/'}{r['eval_task']}/{r['metric']}":
                      r["value"] for r in rows if r["stage"] == stage}, stage)
        figure = matrix_figure(pd.DataFrame([r for r in rows if r.get("split", TEST) == TEST]), tasks)
        for tracker in self.trackers.values():
            tracker.figure("stage_task_matrix", figure, stage)
        pyplot().close(figure)

    def close(self, status: str = "FINISHED") -> None:
        for tracker in self.trackers.values():
            tracker.close(status)


def matrix_figure(rows: pd.DataFrame, tasks: Sequence[TaskSpec]) -> Any:
    """Heat map of each task's primary metric (columns) after each stage (rows), values written in."""
    plt = pyplot()
    matrix = metric_matrix(rows, {t.name: t.metric for t in tasks})[[t.name for t in tasks]]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(tasks), 1.0 + 0.5 * len(matrix)))
    ax.imshow(matrix.to_numpy(dtype=float), cmap="viridis", vmin=0, vmax=max(float(matrix.max().max()), 1e-9))
    ax.set_xticks(range(len(tasks)), [t.metric_label for t in tasks])
    ax.set_yticks(range(len(matrix)), [f"after stage {s}" for s in matrix.index])
    for (i, j), value in pd.DataFrame(matrix.to_numpy()).stack().items():
        ax.text(j, i, f"{value:.3f}", ha="center", va="center", color="white", fontsize=8)
    fig.tight_layout()
    return fig


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _block(text: str) -> str:
    """Markdown code block (TensorBoard renders text summaries as Markdown)."""
    return "    " + text.replace("\n", "\n    ")
