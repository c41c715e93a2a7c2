"""One reader of results folders: a run or a comparison folder loaded once into a typed object that the tables,
plots, the report page and the summary read from (they never open a results file themselves, and never import
a runner). The per-file readers it builds on are ``clbench.recorder``'s (``read_rows``, ``read_tasks``, ...)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Union

import numpy as np
import pandas as pd
import yaml

from clbench import ClbenchError
from clbench.drop import DEFINITIONS
from clbench.incremental import grouped
from clbench.recorder import (
    Resources,
    read_bn_drift,
    read_bootstrap,
    read_chance,
    read_curve,
    read_per_class,
    read_resources,
    read_rows,
    read_tasks,
)
from clbench.results import TEST, VALIDATION
from clbench.tasks import TaskSpec


@dataclass(frozen=True)
class RunData:
    """One run folder: its rows (metrics.csv), tasks, chance levels, configuration and environment; resources and
    BN drift where the run wrote them."""

    path: Path
    rows: pd.DataFrame
    tasks: list[TaskSpec]
    chance: dict[str, float]
    config: dict[str, Any]
    env: dict[str, Any]
    resources: Resources | None
    bn_drift: pd.DataFrame
    curve: pd.DataFrame                 # curve.csv (empty without --eval-every)
    validation: pd.DataFrame            # metrics.csv's validation rows (empty without --val-fraction)

    by_class: pd.DataFrame = field(repr=False, default_factory=pd.DataFrame)   # class-incremental: rows as written
    class_tasks: list[TaskSpec] = field(default_factory=list)                     # and the tasks as written

    @classmethod
    def load(cls, path: Path) -> "RunData":
        path = Path(path)
        every = with_resamples(read_rows(path, split=None), read_bootstrap(path))
        written, validation = (every[every["split"] == s].reset_index(drop=True) for s in (TEST, VALIDATION))
        written_tasks = read_tasks(path, written)
        chance = chance_levels(read_chance(path), written, written_tasks)
        rows, tasks = group_tasks(written, written_tasks)
        validation, _ = group_tasks(validation, written_tasks)
        chance.update({t.name: math.nan for t in tasks if t.name not in chance})
        return cls(path, rows, tasks, chance, _yaml(path / "config.yaml", {}),
                   _json(path / "env.json", {}), read_resources(path) if (path / "resources.json").exists() else None,
                   read_bn_drift(path), read_curve(path), validation, written, written_tasks)


def group_tasks(rows: pd.DataFrame, tasks: list[TaskSpec]) -> tuple[pd.DataFrame, list[TaskSpec]]:
    """Rows and tasks as the drop tables read them (DESIGN.md §8): a task trained over several class steps becomes
    one task per step, ``seg[16-20]``, whose primary metric is the task's metric on that step's classes
    (``mIoU[16-20]``), trained at the stage that introduced them; so every definition applies per class group, from
    the stage that introduced it. Other tasks and rows stay as they are; without a class-incremental task, the
    rows themselves."""
    incremental = [t for t in tasks if t.incremental]
    if not incremental or rows.empty:
        return rows, tasks
    rows = rows.copy()
    stage_task = dict(zip(rows["stage"], rows["stage_task"]))
    renamed = dict(stage_task)
    out_tasks: list[TaskSpec] = []
    for task in tasks:
        if not task.incremental:
            out_tasks.append(task)
            continue
        names = [grouped(task.name, step) for step in task.steps]
        for k, stage in enumerate(s for s in sorted(stage_task) if stage_task[s] == task.name):
            renamed[stage] = names[min(k, len(names) - 1)]
        out_tasks += [dataclasses.replace(task, name=name, classes=tuple(task.classes[c] for c in step), steps=(),
                                          mode=None, category_ids=tuple(task.category_ids[c] for c in step)
                                          if task.category_ids else ())
                      for name, step in zip(names, task.steps)]
        for (name, step), suffix in itertools.product(zip(names, task.steps), ("", "_own_bn")):
            chosen = (rows["eval_task"] == task.name) & (rows["metric"] == grouped(task.metric, step) + suffix)
            rows.loc[chosen, "eval_task"] = name
            rows.loc[chosen, "metric"] = task.metric + suffix
        rows = rows[rows["eval_task"] != task.name]
    rows["stage_task"] = rows["stage"].map(renamed).where(rows["stage"] > 0, rows["stage_task"])
    return rows.reset_index(drop=True), out_tasks


def with_resamples(rows: pd.DataFrame, resamples: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with a ``resampled`` column: the primary metric's bootstrap values (an array) where bootstrap.csv
    holds them, else None; the views compute paired intervals from it."""
    keys = ["stage", "eval_task", "split", "metric"]
    if resamples.empty:
        return rows.assign(resampled=None)
    values = {tuple(k): np.array(v.split(), dtype=np.float64) for *k, v in resamples[keys + ["values"]].itertuples(
        index=False)}
    return rows.assign(resampled=[values.get(tuple(k)) for k in rows[keys].itertuples(index=False)])


def chance_levels(saved: dict[str, float], rows: pd.DataFrame, tasks: list[TaskSpec]) -> dict[str, float]:
    """chance.json's levels, detection's replaced by the run's stage-0 value (the untrained network's mAP, which a
    network that learned nothing reaches; chance.json's 0.0, "no detection", could never flag a base)."""
    out = dict(saved)
    for task in tasks:
        if task.kind == "det":
            stage0 = rows[(rows.stage == 0) & (rows.eval_task == task.name) & (rows.metric == task.metric)]
            if not stage0.empty:
                out[task.name] = max(float(stage0["value"].iloc[0]), saved.get(task.name, 0.0))
    return out


def finished_runs(folder: Path, sub: str = "runs") -> list[Path]:
    """The cell folders under ``folder/sub`` whose run finished (done.json written), in name order."""
    return [d for d in sorted((Path(folder) / sub).glob("*")) if (d / "done.json").exists()]


@dataclass(frozen=True)
class ComparisonData:
    """A comparison folder: every finished cell (``runs``), their rows together, the tasks, chance levels, each
    seed's single-task references, the joint bound's rows, the grid's order, the cells not finished and failed."""

    path: Path
    settings: dict[str, Any]            # compare.yaml
    runs: list[RunData]
    tasks: list[TaskSpec]
    references: dict[int, dict[str, float]]
    joint: pd.DataFrame | None
    labels: list[str]                   # the rows' strategy labels in the grid's order (cells.json)
    missing: list[str]                  # cells of the grid without a finished run
    failed: list[str]                   # failed.json's lines
    rows: pd.DataFrame = field(repr=False, default_factory=pd.DataFrame)
    validation: pd.DataFrame = field(repr=False, default_factory=pd.DataFrame)   # empty without --val-fraction
    validation_references: dict[int, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> "ComparisonData":
        path = Path(path)
        runs = [RunData.load(d) for d in finished_runs(path)]
        if not runs:
            raise ClbenchError(f"{path}: no finished run in runs/")
        settings = _yaml(path / "compare.yaml")
        cells = _json(path / "cells.json", None)
        labels = list(dict.fromkeys(label for _, label in cells)) if cells is not None else list(settings["strategies"])
        done = {r.path.name for r in runs}
        missing = [cell for cell, _ in cells or [] if cell not in done]
        joint = [read_rows(d) for d in finished_runs(path, "bounds")]
        joint_rows = group_tasks(pd.concat(joint, ignore_index=True), runs[0].class_tasks)[0] if joint else None
        return cls(path, settings, runs, runs[0].tasks, _references(path, TEST, runs[0].class_tasks), joint_rows,
                   labels, missing,
                   _json(path / "failed.json", []), pd.concat([r.rows for r in runs], ignore_index=True),
                   pd.concat([r.validation for r in runs], ignore_index=True), _references(path, VALIDATION))

    @property
    def chance(self) -> dict[str, float]:
        """The tasks' chance levels (every cell evaluates the same test sets: the first finished run's)."""
        return self.runs[0].chance

    @property
    def env(self) -> dict[str, Any]:
        return self.runs[0].env

    @property
    def order(self) -> list[str]:
        """The strategies with rows, in the grid's order."""
        present = set(self.rows["strategy"])
        return [s for s in self.labels if s in present]

    @cached_property
    def by_class(self) -> pd.DataFrame:
        """Every cell's rows as written (a class-incremental task's group metrics under its own name)."""
        return pd.concat([r.by_class for r in self.runs], ignore_index=True)

    @property
    def class_tasks(self) -> list[TaskSpec]:
        return self.runs[0].class_tasks

    @cached_property
    def bn_drift(self) -> pd.DataFrame:
        return pd.concat([r.bn_drift for r in self.runs], ignore_index=True)

    @cached_property
    def curve(self) -> pd.DataFrame:
        """Every finished cell's curve.csv together (empty when none ran with --eval-every)."""
        frames = [r.curve for r in self.runs if not r.curve.empty]
        return pd.concat(frames, ignore_index=True) if frames else self.runs[0].curve

    def joint_finals(self) -> dict[int, dict[str, float]]:
        """seed -> task -> the joint bound's final primary metric."""
        if self.joint is None:
            return {}
        primary = {t.name: t.metric for t in self.tasks}
        joint = self.joint
        final = joint[(joint.stage == joint.stage.max()) & (joint.metric == joint.eval_task.map(primary))]
        return {int(seed): dict(zip(g.eval_task, g.value.astype(float))) for seed, g in final.groupby("seed")}

    def measured_against(self, definition: str) -> tuple[dict[int, dict[str, float]], str]:
        """The references a definition is measured against and a note on where they come from: the single-task
        references; for plasticity without them, the joint bound's final metric of the same seed."""
        if not DEFINITIONS[definition].needs_reference or self.references:
            return self.references, ""
        if definition == "plasticity" and self.joint is not None:
            return self.joint_finals(), (" R_ref = the joint bound's final metric of the same seed (no single-task "
                                         "reference in this comparison).")
        raise ClbenchError(f"{self.path}: --definition {definition} needs a comparison run with --reference "
                           "single-task" + (" or with the joint bound" if definition == "plasticity" else ""))


Folder = Union[RunData, ComparisonData]


def load(folder: Path) -> Folder:
    """A comparison folder (compare.yaml) or a run folder (metrics.csv), read once."""
    folder = Path(folder)
    if (folder / "compare.yaml").exists():
        return ComparisonData.load(folder)
    if (folder / "metrics.csv").exists():
        return RunData.load(folder)
    raise ClbenchError(f"{folder}: neither a run folder (metrics.csv) nor a comparison folder (compare.yaml)")


def _references(folder: Path, split: str = TEST, class_tasks: Sequence[TaskSpec] = ()) -> dict[int, dict[str, float]]:
    """seed -> task -> the single-task reference run's final primary metric on ``split``; for a class-incremental
    task (``class_tasks``: the tasks as written) each class group's too, under its group task's name."""
    incremental = {t.name: t for t in class_tasks if t.incremental}
    out: dict[int, dict[str, float]] = {}
    for d in finished_runs(folder, "reference"):
        rows = read_rows(d, split)
        if rows.empty:
            continue
        task = read_tasks(d, rows)[0]
        stage = int(rows.stage.max())
        final = rows[(rows.stage == stage) & (rows.eval_task == task.name) & (rows.metric == task.metric)]
        seed = out.setdefault(int(rows["seed"].iloc[0]), {})
        seed[task.name] = float(final["value"].iloc[0])
        if task.name in incremental and split == TEST:
            seed.update(group_references(d, stage, incremental[task.name]))
    return out


def group_references(run_dir: Path, stage: int, task: TaskSpec) -> dict[str, float]:
    """A class-incremental task's groups on a run that trained the task on every class at once (its single-task
    reference): each group's mean IoU (AP) of its classes after ``stage``, from per_class.csv, as a group row's
    value is computed (DESIGN.md §8). Classification groups have none: top-1 on a group's images is not in
    per_class.csv."""
    if task.kind == "cls":
        return {}
    table = read_per_class(run_dir)
    chosen = table[(table.stage == stage) & (table.eval_task == task.name)
                   & (table.metric == ("IoU" if task.kind == "seg" else "AP"))]
    value = dict(zip(chosen["class"], chosen["value"].astype(float)))
    out = {}
    for step in task.steps:
        members = [v for v in (value.get(task.classes[c], math.nan) for c in step) if not math.isnan(v)]
        out[grouped(task.name, step)] = float(np.mean(members)) if members else math.nan
    return out


def _yaml(path: Path, default: dict[str, Any] | None = None) -> dict[str, Any]:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        if default is not None:
            return default
        raise ClbenchError(f"{path}: missing") from None
    except yaml.YAMLError as exc:
        raise ClbenchError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None


def _json(path: Path, default: Any) -> Any:
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ClbenchError(f"{path}: not valid JSON ({exc})") from None
