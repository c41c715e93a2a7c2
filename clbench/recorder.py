"""The run folder and every file in it (see results/README.md): the Recorder writes them while a run trains,
the ``read_*`` functions are how `clbench compare`, `table`, `plot` and `eval` read them back.

Guarantees: the folder is claimed atomically (two runs with one run id cannot both write it) and removed
again if the start fails; every file is replaced whole (``atomic_write``); a stage's rows are written only
after its checkpoint was, so the tables never show a stage that has no checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from clbench import ClbenchError
from clbench.bootstrap import interval
from clbench.evaluate import TaskEval
from clbench.results import (
    BN_COLUMNS,
    BOOTSTRAP_COLUMNS,
    CURVE_COLUMNS,
    METRIC_COLUMNS,
    OPTIONAL_METRIC_COLUMNS,
    PER_CLASS_COLUMNS,
    TEST,
    atomic_write,
    save_checkpoint,
    to_json,
    write_table,
)
from clbench.tasks import KIND_LABELS, TaskSpec


@dataclass
class StageResources:
    """One stage's cost. ``train_seconds`` is 0 for a stage restored from the stage-1 cache, whose training
    time is then ``seconds_saved_by_cache``."""

    task: str
    train_seconds: float = 0.0
    seconds_saved_by_cache: float = 0.0
    eval_seconds: float = 0.0
    bn_audit_seconds: float = 0.0
    parameters: dict[str, int] = field(default_factory=dict)
    curve_seconds: float = 0.0   # in-stage evaluation (--eval-every), not counted as training
    validation_seconds: float = 0.0   # of eval_seconds: the validation split's share (--val-fraction)
    steps: int = 0               # optimizer steps this run trained (0: restored from the stage-1 cache)
    forwards: int = 0            # forward passes of any UniHeadNet during them (clbench.costs)
    backwards: int = 0           # backward passes reaching one
    strategy_bytes: int = 0      # the most the strategy held at any point of the stage

    @property
    def trained_seconds(self) -> float:
        return self.train_seconds + self.seconds_saved_by_cache

    def shares(self) -> dict[str, float | None]:
        return eval_shares(self.trained_seconds, self.eval_seconds + self.curve_seconds, self.bn_audit_seconds)


def eval_shares(train: float, evaluation: float, audit: float) -> dict[str, float | None]:
    """Shares of a stage's time (training + evaluation + BN audit); training counts what the stage took when
    it was trained, also when this run restored it from the stage-1 cache."""
    total = train + evaluation + audit
    return {"eval_share": evaluation / total if total else None,
            "eval_and_bn_audit_share": (evaluation + audit) / total if total else None}


@dataclass
class Resources:
    """resources.json: parameters and times per stage, latency, peak memory, budgets."""

    stages: dict[int, StageResources] = field(default_factory=dict)
    device: str = ""
    latency_ms: dict[str, dict[int, float]] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)
    budgets: list[dict[str, Any]] = field(default_factory=list)
    latency_amp_ms: dict[str, dict[int, float]] = field(default_factory=dict)   # under the run's --amp (if any)
    latency_detail: dict[str, Any] = field(default_factory=dict)                # timer, amp dtype, batch size
    training_data: dict[str, dict[str, Any]] = field(default_factory=dict)      # per task: memory or per-image

    def totals(self) -> dict[str, float]:
        stages = self.stages.values()
        return {"train_seconds": sum(s.train_seconds for s in stages), "eval_seconds": sum(s.eval_seconds for s in stages),
                "bn_audit_seconds": sum(s.bn_audit_seconds for s in stages)}

    def shares(self) -> dict[str, float | None]:
        """The evaluation's share of the whole run's stage time (cached stages count what they stand for)."""
        totals = self.totals()
        trained = sum(s.trained_seconds for s in self.stages.values())
        return eval_shares(trained, totals["eval_seconds"], totals["bn_audit_seconds"])

    def to_json(self) -> str:
        return to_json({
            "device": self.device, "latency_ms": self.latency_ms, "latency_amp_ms": self.latency_amp_ms,
            "latency": self.latency_detail, "memory": self.memory, "budgets": self.budgets,
            "training_data": self.training_data,
            "stages": {k: {**dataclasses.asdict(s), **s.shares()} for k, s in self.stages.items()},
            **self.totals(), **self.shares()})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Resources":
        names = {f.name for f in dataclasses.fields(StageResources)}
        stages = {int(k): StageResources(**{n: v for n, v in s.items() if n in names}) for k, s in data["stages"].items()}
        def by_size(key: str) -> dict[str, dict[int, float]]:
            return {t: {int(size): ms for size, ms in v.items()} for t, v in data.get(key, {}).items()}
        return cls(stages, data.get("device", ""), by_size("latency_ms"), data.get("memory", {}),
                   data.get("budgets", []), by_size("latency_amp_ms"), data.get("latency", {}),
                   data.get("training_data", {}))


class Recorder:
    """Owns one run folder while the run trains: rows of every table, checkpoints, resources."""

    def __init__(self, run_dir: Path, base: dict[str, Any]) -> None:
        self.run_dir, self.base = run_dir, base
        self.rows: list[dict[str, Any]] = []        # metrics.csv, committed stages only
        self.per_class: list[dict[str, Any]] = []   # per_class.csv
        self.bn_rows: list[dict[str, Any]] = []     # bn_drift.csv
        self.curve: list[dict[str, Any]] = []       # curve.csv (--eval-every)
        self.bootstrap: list[dict[str, Any]] = []   # bootstrap.csv (--bootstrap)
        self._pending: dict[str, list] = {"rows": [], "per_class": [], "bn_rows": [], "curve": [], "predictions": [],
                                          "bootstrap": []}
        self.resources = Resources()

    @classmethod
    def create(cls, out: Path, run_id: str, base: dict[str, Any], files: dict[str, str]) -> "Recorder":
        """Claim ``out/run_id`` (an existing folder is never touched) and write ``files`` into it; if that
        fails, the folder is removed again: a failed start leaves nothing behind."""
        out, run_dir = Path(out), Path(out) / run_id
        if out.exists() and not out.is_dir():
            raise ClbenchError(f"--out {out}: is a file, expected a folder")
        try:
            out.mkdir(parents=True, exist_ok=True)
            run_dir.mkdir()  # atomic: of two runs with one id, exactly one gets here
        except FileExistsError:
            raise ClbenchError(f"{run_dir}: already exists; give another --run-id or --out (nothing was overwritten)") \
                from None
        except OSError as exc:
            raise ClbenchError(f"--out {out}: cannot create the run folder there ({exc.strerror or exc})") from None
        try:
            for name, text in files.items():
                atomic_write(run_dir / name, text)
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        return cls(run_dir, {"run_id": run_id, **base})

    def row_base(self, stage: int, stage_task: str) -> dict[str, Any]:
        return {**self.base, "stage": stage, "stage_task": stage_task}

    def add_evaluation(self, stage: int, stage_task: str, task: TaskSpec, result: TaskEval, split: str = TEST) -> None:
        """A task's evaluation: its metrics (on ``split``); per-class values and predictions of the test set."""
        base = {**self.row_base(stage, stage_task), "eval_task": task.name}
        resampled = result.resampled or {}
        self._pending["rows"] += [{**base, "split": split, "metric": metric, "value": value,
                                   "direction": task.direction, "n": n,
                                   **dict(zip(("ci_low", "ci_high"), interval(resampled[metric]) if metric in resampled
                                              else (math.nan, math.nan)))}
                                  for metric, (value, n) in result.metrics.items()]
        self._pending["bootstrap"] += [{**base, "split": split, "metric": metric, "values": " ".join(
            f"{v:.6g}" for v in values)} for metric, values in resampled.items()]
        if split != TEST:
            return
        self._pending["per_class"] += [{**base, "class": name, "metric": metric, "value": value}
                                       for metric, values in result.per_class.items() for name, value in values.items()]
        if result.detections is not None:
            self._pending["predictions"].append((f"stage{stage}_{task.name}.json", json.dumps(result.detections)))

    def add_metric(self, stage: int, stage_task: str, task: TaskSpec, metric: str, value: float, n: int) -> None:
        self._pending["rows"].append({**self.row_base(stage, stage_task), "eval_task": task.name, "split": TEST,
                                      "metric": metric, "value": value, "direction": task.direction, "n": n,
                                      "ci_low": math.nan, "ci_high": math.nan})

    def add_bn_drift(self, stage: int, stage_task: str, reference_stage: int,
                     drift: list[tuple[str, str, float]]) -> None:
        base = {**self.row_base(stage, stage_task), "reference_stage": reference_stage}
        self._pending["bn_rows"] += [{**base, "layer": layer, "statistic": stat, "distance": d}
                                     for layer, stat, d in drift]

    def add_curve_point(self, stage: int, step: int, global_step: int, task: TaskSpec, value: float, probe: int) -> None:
        self._pending["curve"].append({**self.base, "stage": stage, "step": step, "global_step": global_step,
                                       "eval_task": task.name, "metric": task.metric, "value": value, "probe": probe})

    def add_curve_points(self, points: list[dict[str, Any]]) -> None:
        """Curve points made by another run of the same configuration (the stage-1 cache), under this run's name."""
        self._pending["curve"] += [{**self.base, **point} for point in points]

    def pending_curve(self) -> list[dict[str, Any]]:
        """The curve points of the stage in progress (the stage-1 cache keeps them)."""
        return list(self._pending["curve"])

    def commit(self, stage: int, checkpoint: dict[str, Any] | None) -> None:
        """The stage's checkpoint first, then its rows: a stage is in the tables only if its checkpoint exists.
        The checkpoint also holds every row up to this stage and the resources so far (``record``), so a run
        resumed from it rewrites exactly these tables."""
        self.rows += self._pending["rows"]
        self.per_class += self._pending["per_class"]
        self.bn_rows += self._pending["bn_rows"]
        self.curve += self._pending["curve"]
        self.bootstrap += self._pending["bootstrap"]
        predictions, self._pending = self._pending["predictions"], {key: [] for key in self._pending}
        if checkpoint is not None:
            save_checkpoint(self.run_dir / "checkpoints" / f"stage{stage}.pt", {**checkpoint, "record": self.record()})
        for name, text in predictions:
            atomic_write(self.run_dir / "predictions" / name, text)
        self.write_tables()

    def write_tables(self) -> None:
        write_table(self.run_dir / "metrics.csv", self.rows, METRIC_COLUMNS)
        write_table(self.run_dir / "per_class.csv", self.per_class, PER_CLASS_COLUMNS)
        write_table(self.run_dir / "bn_drift.csv", self.bn_rows, BN_COLUMNS)
        if self.curve:
            write_table(self.run_dir / "curve.csv", self.curve, CURVE_COLUMNS)
        if self.bootstrap:
            write_table(self.run_dir / "bootstrap.csv", self.bootstrap, BOOTSTRAP_COLUMNS)

    def record(self) -> dict[str, Any]:
        """The rows and resources so far, as plain values (a checkpoint stays loadable with weights_only)."""
        return {"rows": self.rows, "per_class": self.per_class, "bn_rows": self.bn_rows, "curve": self.curve,
                "bootstrap": self.bootstrap,
                "stages": {k: dataclasses.asdict(s) for k, s in self.resources.stages.items()}}

    @classmethod
    def reopen(cls, run_dir: Path, base: dict[str, Any], record: dict[str, Any] | None, from_stage: int) -> "Recorder":
        """An interrupted run's folder, back at the end of stage ``from_stage`` (``record`` from its checkpoint;
        None: from the start). The tables are rewritten to hold exactly those stages; resume.json notes it."""
        recorder = cls(run_dir, {"run_id": run_dir.name, **base})
        if record is not None:
            recorder.rows, recorder.per_class, recorder.bn_rows = (list(record[k]) for k in ("rows", "per_class", "bn_rows"))
            recorder.curve = list(record.get("curve", []))
            recorder.bootstrap = list(record.get("bootstrap", []))
            recorder.resources.stages = {int(k): StageResources(**v) for k, v in record["stages"].items()}
        history = json.loads((run_dir / "resume.json").read_text()) if (run_dir / "resume.json").exists() else []
        history.append({"resumed_after_stage": from_stage, "at": time.strftime("%Y-%m-%d %H:%M:%S")})
        atomic_write(run_dir / "resume.json", to_json(history))
        recorder.write_tables()
        return recorder

    def write_resources(self) -> None:
        atomic_write(self.run_dir / "resources.json", self.resources.to_json())


def read_table(path: Path, columns: tuple[str, ...], numeric: tuple[str, ...], what: str) -> pd.DataFrame:
    """A CSV the recorder wrote, checked: garbage, missing columns or non-numbers in ``numeric`` are errors."""
    try:
        rows = pd.read_csv(path)
    except FileNotFoundError:
        raise ClbenchError(f"{path}: not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ClbenchError(f"{path}: not a clbench {what} ({str(exc).splitlines()[0]})") from None
    missing = [c for c in columns if c not in rows.columns]
    if missing:
        raise ClbenchError(f"{path}: not a clbench {what}: missing columns {', '.join(missing)} "
                           f"(expected {', '.join(columns)})")
    for column in numeric:
        if not rows.empty and not pd.api.types.is_numeric_dtype(rows[column]):
            raise ClbenchError(f"{path}: column {column!r} holds non-numbers (e.g. {rows[column].iloc[0]!r})")
    return rows


def read_rows(run_dir: Path, split: str | None = TEST) -> pd.DataFrame:
    """metrics.csv of a run, checked: a file that is not a clbench metrics table, or has no rows, is an error.
    The rows of ``split`` (None: all); a file written before the split column holds test rows only."""
    path = Path(run_dir) / "metrics.csv"
    try:
        header = pd.read_csv(path, nrows=0).columns
    except (FileNotFoundError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        header = METRIC_COLUMNS   # read_table says what is wrong
    columns = tuple(c for c in METRIC_COLUMNS if c in header or c not in OPTIONAL_METRIC_COLUMNS)
    rows = read_table(path, columns, ("stage", "value", "seed"), "metrics table")
    if rows.empty:
        raise ClbenchError(f"{path}: has no rows (the run finished no evaluation)")
    if "split" not in rows.columns:
        rows.insert(columns.index("eval_task") + 1, "split", TEST)
    for column in ("ci_low", "ci_high"):
        if column not in rows.columns:
            rows[column] = math.nan
    return rows if split is None else rows[rows["split"] == split].reset_index(drop=True)


def read_bn_drift(run_dir: Path) -> pd.DataFrame:
    """bn_drift.csv of a run (empty when the run has none), checked like metrics.csv."""
    path = Path(run_dir) / "bn_drift.csv"
    if not path.exists():
        return pd.DataFrame(columns=list(BN_COLUMNS))
    return read_table(path, BN_COLUMNS, ("stage", "reference_stage", "distance"), "BN-drift table")


def read_per_class(run_dir: Path) -> pd.DataFrame:
    """per_class.csv of a run (empty when it has none), checked like metrics.csv."""
    path = Path(run_dir) / "per_class.csv"
    if not path.exists():
        return pd.DataFrame(columns=list(PER_CLASS_COLUMNS))
    return read_table(path, PER_CLASS_COLUMNS, ("stage", "value"), "per-class table")


def read_bootstrap(run_dir: Path) -> pd.DataFrame:
    """bootstrap.csv of a run (empty when it ran with --bootstrap 0 or before it existed), checked."""
    path = Path(run_dir) / "bootstrap.csv"
    if not path.exists():
        return pd.DataFrame(columns=list(BOOTSTRAP_COLUMNS))
    return read_table(path, BOOTSTRAP_COLUMNS, ("stage",), "bootstrap table")


def read_curve(run_dir: Path) -> pd.DataFrame:
    """curve.csv of a run (empty when it ran without --eval-every), checked like metrics.csv."""
    path = Path(run_dir) / "curve.csv"
    if not path.exists():
        return pd.DataFrame(columns=list(CURVE_COLUMNS))
    return read_table(path, CURVE_COLUMNS, ("stage", "step", "global_step", "value", "probe", "seed"), "curve table")


def read_tasks(run_dir: Path, rows: pd.DataFrame | None = None) -> list[TaskSpec]:
    """The run's tasks in stream order (tasks.json); for folders written before it existed, from the rows
    (then each task's name is its kind)."""
    path = Path(run_dir) / "tasks.json"
    if path.exists():
        try:
            return [TaskSpec.from_dict(t) for t in json.loads(path.read_text())]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ClbenchError(f"{path}: not a clbench task list ({exc})") from None
    rows = read_rows(run_dir) if rows is None else rows
    order = rows[rows["stage"] > 0].drop_duplicates("stage").sort_values("stage")["stage_task"].tolist()
    unknown = [t for t in order if t not in KIND_LABELS]
    if unknown:
        raise ClbenchError(f"{run_dir}: no tasks.json, and task {unknown[0]!r} is not a task kind")
    return [TaskSpec(t, t, t, ()) for t in order]


def read_chance(run_dir: Path) -> dict[str, float]:
    """Each task's primary metric at chance on its test set (chance.json); empty for folders written before it."""
    path = Path(run_dir) / "chance.json"
    if not path.exists():
        return {}
    try:
        return {str(k): float(v) for k, v in json.loads(path.read_text()).items()}
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
        raise ClbenchError(f"{path}: expected task -> chance level ({exc})") from None


def mark_finished(run_dir: Path, where: dict[str, Any], seconds: float) -> None:
    """A comparison cell is finished: ``executor.json`` (where it ran), then ``done.json`` (one format, written
    here only: the cell's seconds and when it finished). A cell without done.json is resumed."""
    atomic_write(Path(run_dir) / "executor.json", to_json(where))
    atomic_write(Path(run_dir) / "done.json", to_json({"seconds": round(seconds, 3),
                                                        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}))


def read_resources(run_dir: Path) -> Resources:
    path = Path(run_dir) / "resources.json"
    try:
        return Resources.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ClbenchError(f"{path}: not found (the run did not finish)") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ClbenchError(f"{path}: not a clbench resources file ({exc})") from None

