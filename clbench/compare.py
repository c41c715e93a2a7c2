"""`clbench compare`: a strategy × seed grid of normal runs under one folder, resumable, with the stage-1
training shared by every strategy that declares ``shares_first_stage``, and optional single-task reference runs.

Folder: ``<out>/<name>/`` with ``compare.yaml``, ``runs/<strategy name>-seed<N>/`` (each a normal run, finished
when its ``done.json`` exists; a ``--grid`` setting's folder is its label made plain, ``lwf_lam=0.1-seed0``),
``bounds/joint-seed<N>/`` (the joint bound, ``clbench.joint``), ``reference/<task>-seed<N>/``, ``cache/stage1-…pt``,
``cells.json``, ``failed.json``, ``resources.csv`` and, while a process works on it, ``lock``. The views of it
(``summary.{md,csv}``, ``picked.json``, ``report.html``, ``plots/``) are written by ``clbench.summary`` and
``clbench.page`` from ``clbench.reader``'s one load of the folder.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import itertools
import json
import os
import re
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml
from tqdm import tqdm

from clbench import ClbenchError
from clbench.config import FIELDS, KIND_DEFAULTS, RunConfig
from clbench.executors import Job, RayOptions, import_ray, run_on_ray, sequential_where
from clbench.joint import run_joint
from clbench.plugins import create, options_for
from clbench.reader import finished_runs
from clbench.recorder import mark_finished, read_resources
from clbench.results import atomic_write, to_json, write_table
from clbench.run import DONE, run
from clbench.runtime import Session
from clbench.strategy import check_protects

BOUNDS = ("joint", "frozen")


@dataclass(frozen=True)
class CompareSettings:
    strategies: tuple[str, ...]
    seeds: tuple[int, ...]
    reference: bool
    base: RunConfig
    bounds: tuple[str, ...] = ()                          # of BOUNDS
    grid: tuple[tuple[str, tuple[str, ...]], ...] = ()    # (STRATEGY.PARAM, values): one cell per value

    def __post_init__(self) -> None:
        unknown = [b for b in self.bounds if b not in BOUNDS]
        if unknown:
            raise ClbenchError(f"--bounds {unknown[0]}: expected some of {', '.join(BOUNDS)} (or none)")
        keys = [key for key, _ in self.grid]
        for key, values in self.grid:
            if not values or any(not v for v in values) or ("." not in key and not is_run_key(key)):
                raise ClbenchError(f"--grid {key}: expected STRATEGY.PARAM=V1,V2,... (e.g. lwf.lam=0.1,1,10) or a run "
                                   "setting SETTING[.TASK]=V1,V2,... (e.g. lr=1e-3,3e-4)")
            if keys.count(key) > 1 or len(set(values)) != len(values):
                raise ClbenchError(f"--grid {key}: given twice, or a value repeats")
            if key in self.base.set:
                raise ClbenchError(f"--grid {key} and --set {key}: give one or the other")
            if is_run_key(key):
                for value in values:
                    with_run_setting(self.base, key, value)   # every value checked before anything trains

    @property
    def strategy_grid(self) -> dict[str, tuple[str, ...]]:
        return {key: values for key, values in self.grid if not is_run_key(key)}

    @property
    def run_grid(self) -> list[tuple[dict[str, str], str]]:
        """The cross product of the run-setting keys: (setting -> value, label part) per combination."""
        keys = [key for key, _ in self.grid if is_run_key(key)]
        values = dict(self.grid)
        return [(dict(zip(keys, combo)), ",".join(f"{k}={v}" for k, v in zip(keys, combo)))
                for combo in itertools.product(*(values[k] for k in keys))]

    def to_dict(self) -> dict[str, Any]:
        run = {k: v for k, v in self.base.without("output_only", "per_cell").items() if k != "set"}
        return {"strategies": list(self.strategies), "seeds": list(self.seeds), "reference": self.reference,
                "bounds": list(self.bounds), "grid": {key: list(values) for key, values in self.grid},
                "set": dict(self.base.set), "run": run}

    def name(self) -> str:
        return "compare-" + hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:10]


GRID_EXCLUDED = ("set", "tasks", "order", "protocol", "data_root", "device", "strategy", "seed")


def is_run_key(key: str) -> bool:
    """A --grid key that names a run setting (``lr``, ``epochs.det``), not a strategy's parameter."""
    name, _, task = key.partition(".")
    return name in FIELDS and name not in GRID_EXCLUDED and not any(
        FIELDS[name].metadata.get(role) for role in ("output_only", "per_cell", "strategy")) and \
        (not task or name in KIND_DEFAULTS)


def with_run_setting(config: RunConfig, key: str, value: str) -> RunConfig:
    """``config`` with a run setting of --grid applied: ``lr=V`` for every task, ``lr.det=V`` for one."""
    name, _, task = key.partition(".")
    if task and task not in config.tasks:
        raise ClbenchError(f"--grid {key}: unknown task {task!r}, expected one of {', '.join(config.tasks)}")
    new = {**getattr(config, name), task: value} if task else value
    try:
        return dataclasses.replace(config, **{name: new})
    except ClbenchError as exc:
        raise ClbenchError(f"--grid {key}={value}: {str(exc).split(': ', 2)[-1]}") from None


def stage1_key(config: RunConfig) -> str:
    """Hash of every setting that can change what stage 1 computes (not the strategy: see shares_first_stage; of the
    per-task settings only the first task's: a later task's epochs or learning rate cannot change stage 1, so a
    --grid over them shares it)."""
    fields = config.without("output_only", "strategy")
    first = config.experiences[0]
    fields.update({name: {first: fields[name][first]} for name in KIND_DEFAULTS})
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Progress:
    """One overall bar: which cell, which stage, elapsed and ETA over every stage of the grid."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, unit="stage", disable=not enabled, dynamic_ncols=True,
                        bar_format="{desc} |{bar}| {n_fmt}/{total_fmt} stages [{elapsed}<{remaining}]")
        self.cell = ""
        self._started = 0

    def start_cell(self, cell: str) -> None:
        self.cell, self._started = cell, 0

    def on_stage(self, stage: int, task: str) -> None:
        if self._started:
            self.bar.update(1)
        self._started = stage
        self.bar.set_description_str(f"{self.cell}: stage {stage} ({task})")

    def finish_cell(self, stages: int) -> None:
        self.bar.update(stages - max(self._started - 1, 0))

    def close(self) -> None:
        self.bar.close()


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Only one process works on a comparison folder at a time: an exclusive flock on ``folder/lock``. The
    kernel drops it when its process dies, so the lock of a killed comparison is free at once (taken over)."""
    fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process (starting)"
        os.close(fd)
        raise ClbenchError(f"{folder}: in use by {holder}; wait for it to finish or stop it") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
    try:
        yield
    finally:
        os.ftruncate(fd, 0)
        os.close(fd)


def prepare_folder(settings: CompareSettings, folder: Path) -> None:
    """Create or reopen the comparison folder; reopening with other settings is an error, never an overwrite."""
    saved = folder / "compare.yaml"
    wanted = yaml.safe_dump(settings.to_dict(), sort_keys=True)
    if saved.exists() and saved.read_text() != wanted:
        raise ClbenchError(f"{folder}: holds a comparison with other settings (see its compare.yaml); "
                           "choose another --name or --out")
    atomic_write(saved, wanted)


def run_cell(folder: Path, cell_id: str, config: RunConfig, progress: Progress, stages: int,
             stage1_cache: Path | None, session: Session) -> None:
    """Run one cell unless done; a cell folder without done.json is an interrupted run and is resumed after its
    last finished stage."""
    run_dir = folder / cell_id
    progress.start_cell(cell_id)
    if (run_dir / "done.json").exists():
        progress.finish_cell(stages)
        return
    resume = (run_dir / "config.yaml").exists()  # interrupted: continue after its last finished stage
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)  # a folder without a run in it (the folder lock excludes any other writer)
    start = time.perf_counter()
    run(dataclasses.replace(config, out=str(folder), run_id=cell_id, progress=False), stage1_cache=stage1_cache,
        on_stage=progress.on_stage, session=session, resume=resume, group=(folder.parent.name, folder.parent))
    mark_finished(run_dir, sequential_where(), time.perf_counter() - start)
    progress.finish_cell(stages)


@dataclass(frozen=True)
class Cell:
    """One run of the grid: its folder name, the label its rows carry (the table's row), seed, configuration."""

    id: str
    label: str
    seed: int
    config: RunConfig
    shares_first_stage: bool


def grid_settings(spec: str, name: str, grid: dict[str, tuple[str, ...]]) -> list[tuple[dict[str, str], str]]:
    """The cross product of the --grid keys that belong to ``spec``: (options, label suffix) per setting;
    [({}, "")] when none does. The suffix names each parameter without its strategy prefix where that prefix
    is the cell's own strategy name: lwf[lam=0.1], bn_per_task+lwf[lwf.lam=0.1]."""
    keys = list(options_for(spec, dict(grid)))
    out = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        shown = [(k.split(".", 1)[1] if k.split(".", 1)[0] == name else k, v) for k, v in zip(keys, combo)]
        out.append((dict(zip(keys, combo)), "[" + ",".join(f"{k}={v}" for k, v in shown) + "]" if keys else ""))
    return out


def cell_folder(label: str, seed: int) -> str:
    """A cell's folder name: the label made a plain name (lwf[lam=0.1] -> lwf_lam=0.1) and the seed."""
    return re.sub(r"[\[\],]", "_", label).rstrip("_") + f"-seed{seed}"


def run_joint_cell(folder: Path, cell_id: str, config: RunConfig, progress: Progress, session: Session) -> None:
    """The joint bound of one seed unless done (an unfinished one is redone: it is a single stage)."""
    progress.start_cell(cell_id)
    if not (folder / cell_id / "done.json").exists():
        progress.on_stage(1, "joint")
        start = time.perf_counter()
        run_joint(dataclasses.replace(config, out=str(folder), run_id=cell_id, progress=False), session=session,
                  group=(folder.parent.name, folder.parent))
        mark_finished(folder / cell_id, sequential_where(), time.perf_counter() - start)
    progress.finish_cell(1)


def cells(settings: CompareSettings) -> list[Cell]:
    """The grid's cells, seed by seed: every strategy (the frozen bound last) × its --grid settings. Cell
    folders are named after the strategy's registered name, never a path; two cells with one label are an error."""
    specs = settings.strategies + tuple(b for b in settings.bounds if b == "frozen" and b not in settings.strategies)
    grid = settings.strategy_grid
    used = {key for s in specs for key in options_for(s, {**settings.base.set, **grid})}
    unused = sorted(set(settings.base.set) - used)
    if unused:
        raise ClbenchError(f"--set {unused[0]}: no strategy of --strategies {','.join(settings.strategies)} has it")
    unused = sorted(set(grid) - used)
    if unused:
        raise ClbenchError(f"--grid {unused[0]}: no strategy of --strategies {','.join(settings.strategies)} has it")
    repeated = sorted({s for s in settings.strategies if settings.strategies.count(s) > 1})
    if repeated:
        raise ClbenchError(f"--strategies: {repeated[0]!r} appears twice")
    named: dict[str, str] = {}
    out = []
    for seed in settings.seeds:
        for spec in specs:
            name = create(spec, options_for(spec, settings.base.set))[0].name
            if named.setdefault(name, spec) != spec:
                raise ClbenchError(f"--strategies: {named[name]!r} and {spec!r} are both named "
                                   f"{name!r}; a comparison needs distinct names")
            for (options, suffix), (run_settings, run_suffix) in itertools.product(
                    grid_settings(spec, name, grid), settings.run_grid):
                suffix = "[" + ",".join(p for p in (suffix.strip("[]"), run_suffix) if p) + "]" \
                    if suffix or run_suffix else ""
                base = settings.base
                for key, value in run_settings.items():
                    base = with_run_setting(base, key, value)
                config = dataclasses.replace(base, strategy=spec, seed=seed,
                                             set={**options_for(spec, settings.base.set), **options},
                                             label=name + suffix if suffix else None)
                strategy = create(spec, config.set)[0]  # every value checked before anything trains
                check_protects(strategy, config.benchmark_file())
                out.append(Cell(cell_folder(name + suffix, seed), name + suffix, seed, config,
                                strategy.shares_first_stage))
    return out


def joint_config(settings: CompareSettings, seed: int) -> RunConfig:
    """The joint bound's run: the comparison's run settings, no strategy, no latency timing."""
    return dataclasses.replace(settings.base, strategy="naive", seed=seed, set={}, label="joint", latency_sizes=())


def compare(settings: CompareSettings, *, out: Path, name: str | None = None, progress: bool = True,
            executor: RayOptions | None = None) -> Path:
    """Run (or resume) the grid; returns the comparison folder (the summary and the report page are views of it:
    ``clbench.summary.write_summary``, ``clbench.page.write_report``; the command line writes both).
    ``executor``: None runs the cells here one after another; RayOptions runs them as Ray tasks (the
    results are the same; see ``clbench.executors``). Cells that failed are listed in ``failed.json`` and
    the summary (they stay resumable)."""
    grid = cells(settings)
    if executor is not None:
        import_ray(executor.address is None)
        if "mlflow" in settings.base.log and not settings.base.mlflow_uri:
            raise ClbenchError("--executor ray with --log mlflow needs --mlflow-uri (a tracking server every node "
                               "reaches): a local file store would stay on the workers")
    folder = Path(out) / (name or settings.name())
    if folder.exists() and not folder.is_dir():
        raise ClbenchError(f"{folder}: is a file, expected a comparison folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ClbenchError(f"--out {out}: cannot create the comparison folder ({exc.strerror or exc})") from None
    with folder_lock(folder):
        prepare_folder(settings, folder)
        _run_grid(settings, folder, grid, progress, executor)
    return folder


def jobs(settings: CompareSettings, folder: Path, grid: list[Cell]) -> list[Job]:
    """Every run of the comparison in order: the cells (seed by seed), the joint bound, the references."""
    stages = len(settings.base.experiences)
    out = [Job("run", "runs", cell.id, cell.config, stages,
               folder / "cache" / f"stage1-seed{cell.seed}-{stage1_key(cell.config)}.pt"
               if cell.shares_first_stage else None) for cell in grid]
    if "joint" in settings.bounds:
        out += [Job("joint", "bounds", f"joint-seed{seed}", joint_config(settings, seed), 1, None)
                for seed in settings.seeds]
    if settings.reference:
        out += [Job("run", "reference", f"{task}-seed{seed}",
                    dataclasses.replace(settings.base, strategy="naive", seed=seed, protocol=None, order=(task,),
                                        synth_variant=settings.base.synthetic_variant, set={}), 1, None)
                for seed in settings.seeds for task in settings.base.order]
    return out


def _run_grid(settings: CompareSettings, folder: Path, grid: list[Cell], progress: bool,
              executor: RayOptions | None) -> None:
    todo = jobs(settings, folder, grid)
    atomic_write(folder / "cells.json", to_json([[cell.id, cell.label] for cell in grid]))  # grid order
    unfinished = [job for job in todo if not (folder / job.sub / job.cell_id / "done.json").exists()]
    failures: list[str] = []
    if executor is None:
        bar, session = Progress(sum(job.stages for job in todo), progress), Session()
        try:
            for job in todo:
                if job.kind == "joint":
                    run_joint_cell(folder / job.sub, job.cell_id, job.config, bar, session)
                else:
                    run_cell(folder / job.sub, job.cell_id, job.config, bar, job.stages, job.cache, session)
        finally:
            bar.close()
    else:
        bar = GridProgress(todo, progress)
        try:
            failures = run_on_ray(todo, folder, executor, bar)
        finally:
            bar.close()
    atomic_write(folder / "failed.json", to_json(failures))
    write_resources(folder)
    saved = [read_resources(folder / job.sub / job.cell_id).stages[1].seconds_saved_by_cache for job in unfinished
             if job.cache is not None and (folder / job.sub / job.cell_id / "done.json").exists()]
    atomic_write(folder / "cache_report.json", to_json({"stage1_reused_by_cells_this_invocation": sum(s > 0 for s in saved),
                                                        "stage1_seconds_saved_this_invocation": sum(saved)}))


class GridProgress:
    """One bar for a grid run on Ray: stages finished over all cells, and cells running / finished / failed."""

    def __init__(self, todo: list[Job], enabled: bool) -> None:
        self.bar = tqdm(total=sum(job.stages for job in todo), unit="stage", disable=not enabled, dynamic_ncols=True,
                        bar_format="{desc} |{bar}| {n_fmt}/{total_fmt} stages [{elapsed}<{remaining}]")
        self.counted: dict[str, int] = {}
        self.running = self.finished = self.failed = 0

    def _show(self) -> None:
        self.bar.set_description_str(f"cells: {self.running} running, {self.finished} finished, {self.failed} failed")

    def job_done(self, job: Job, skipped: bool = False) -> None:
        self.bar.update(job.stages - self.counted.get(job.cell_id + job.sub, 0))
        self.finished += 1
        self._show()

    def job_started(self, job: Job) -> None:
        self.running += 1
        self._show()

    def job_stage(self, job: Job, stage: int) -> None:
        if stage == DONE:
            self.running -= 1
            self.job_done(job)
        elif stage > 0:
            key = job.cell_id + job.sub
            self.counted[key] = self.counted.get(key, 0) + 1
            self.bar.update(1)

    def job_failed(self, job: Job, line: str) -> None:
        self.running, self.failed = self.running - 1, self.failed + 1
        self.bar.write(line)
        self._show()

    def close(self) -> None:
        self.bar.close()


RESOURCE_COLUMNS = ("cell", "stage", "task", "train_seconds", "seconds_saved_by_cache", "eval_seconds",
                    "bn_audit_seconds", "eval_share", "eval_and_bn_audit_share")


def write_resources(folder: Path) -> None:
    """``resources.csv``: every finished cell's time per stage, from its resources.json."""
    rows = []
    for run_dir in finished_runs(folder):
        for k, s in read_resources(run_dir).stages.items():
            rows.append({"cell": run_dir.name, "stage": k, **dataclasses.asdict(s), **s.shares()})
    write_table(folder / "resources.csv", rows, RESOURCE_COLUMNS)


