"""`clbench compare`: a strategy × seed grid of normal runs under one folder, resumable, with the stage-1
training shared by every strategy that declares ``shares_first_stage``, and optional single-task reference runs.

Folder: ``<out>/<name>/`` with ``compare.yaml``, ``runs/<strategy name>-seed<N>/`` (each a normal run, finished
when its ``done.json`` exists), ``reference/<task>-seed<N>/``, ``cache/stage1-…pt``, ``summary.{md,csv}``,
``resources.csv`` and, while a process works on it, ``lock``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import yaml
from tqdm import tqdm

from clbench import ClbenchError
from clbench.config import RunConfig
from clbench.drop import DEFINITIONS
from clbench.recorder import read_chance, read_resources, read_rows, read_tasks
from clbench.report import comparison_table, render
from clbench.results import atomic_write, to_json, write_table
from clbench.runtime import Session


@dataclass(frozen=True)
class CompareSettings:
    strategies: tuple[str, ...]
    seeds: tuple[int, ...]
    reference: bool
    base: RunConfig

    def to_dict(self) -> dict[str, Any]:
        run = {k: v for k, v in self.base.without("output_only", "per_cell").items() if k != "set"}
        return {"strategies": list(self.strategies), "seeds": list(self.seeds), "reference": self.reference,
                "set": dict(self.base.set), "run": run}

    def name(self) -> str:
        return "compare-" + hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:10]


def stage1_key(config: RunConfig) -> str:
    """Hash of every setting that can change what stage 1 computes (not the strategy: see shares_first_stage)."""
    fields = config.without("output_only", "strategy")
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
             stage1_cache: Path | None, session: Session) -> float:
    """Run one cell unless done; a cell folder without done.json is an interrupted run and is resumed after its
    last finished stage. Returns the stage-1 training seconds saved by the cache."""
    from clbench.run import run
    run_dir = folder / cell_id
    progress.start_cell(cell_id)
    if (run_dir / "done.json").exists():
        progress.finish_cell(stages)
        return 0.0
    resume = (run_dir / "config.yaml").exists()  # interrupted: continue after its last finished stage
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)  # a folder without a run in it (the folder lock excludes any other writer)
    start = time.perf_counter()
    run(dataclasses.replace(config, out=str(folder), run_id=cell_id, progress=False), stage1_cache=stage1_cache,
        on_stage=progress.on_stage, session=session, resume=resume, group=(folder.parent.name, folder.parent))
    atomic_write(run_dir / "done.json", to_json({"seconds": time.perf_counter() - start}))
    progress.finish_cell(stages)
    return read_resources(run_dir).stages[1].seconds_saved_by_cache


def cells(settings: CompareSettings) -> list[tuple[str, str, int, RunConfig, bool]]:
    """(cell id, strategy name, seed, config, shares stage 1) for the grid; cell folders are named after the
    strategy's registered name, never a path; two strategies with one name are an error."""
    from clbench.plugins import create, options_for
    used = {key for s in settings.strategies for key in options_for(s, settings.base.set)}
    unused = sorted(set(settings.base.set) - used)
    if unused:
        raise ClbenchError(f"--set {unused[0]}: no strategy of --strategies {','.join(settings.strategies)} has it")
    repeated = sorted({s for s in settings.strategies if settings.strategies.count(s) > 1})
    if repeated:
        raise ClbenchError(f"--strategies: {repeated[0]!r} appears twice")
    named: dict[str, str] = {}
    out = []
    for seed in settings.seeds:
        for spec in settings.strategies:
            config = dataclasses.replace(settings.base, strategy=spec, seed=seed,
                                         set=options_for(spec, settings.base.set))
            strategy = create(spec, config.set)[0]
            if named.setdefault(strategy.name, spec) != spec:
                raise ClbenchError(f"--strategies: {named[strategy.name]!r} and {spec!r} are both named "
                                   f"{strategy.name!r}; a comparison needs distinct names")
            out.append((f"{strategy.name}-seed{seed}", strategy.name, seed, config, strategy.shares_first_stage))
    return out


def compare(settings: CompareSettings, *, out: Path, name: str | None = None, progress: bool = True) -> Path:
    """Run (or resume) the grid and write summary.md / summary.csv; returns the comparison folder."""
    grid = cells(settings)
    folder = Path(out) / (name or settings.name())
    if folder.exists() and not folder.is_dir():
        raise ClbenchError(f"{folder}: is a file, expected a comparison folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ClbenchError(f"--out {out}: cannot create the comparison folder ({exc.strerror or exc})") from None
    with folder_lock(folder):
        prepare_folder(settings, folder)
        _run_grid(settings, folder, grid, progress)
    return folder


def _run_grid(settings: CompareSettings, folder: Path, grid: list, progress: bool) -> None:
    stages = len(settings.base.order)
    references = [(task, seed) for seed in settings.seeds for task in settings.base.order] if settings.reference else []
    bar = Progress(len(grid) * stages + len(references), progress)
    session, saved, reused = Session(), 0.0, 0
    atomic_write(folder / "cells.json", to_json([[cell, name] for cell, name, *_ in grid]))  # grid order
    try:
        for cell_id, _, seed, config, shares in grid:
            cache = folder / "cache" / f"stage1-seed{seed}-{stage1_key(config)}.pt" if shares else None
            seconds = run_cell(folder / "runs", cell_id, config, bar, stages, cache, session)
            saved, reused = saved + seconds, reused + (seconds > 0)
        for task, seed in references:
            config = dataclasses.replace(settings.base, strategy="naive", seed=seed, order=(task,), set={})
            run_cell(folder / "reference", f"{task}-seed{seed}", config, bar, 1, None, session)
    finally:
        bar.close()
    write_summary(folder)
    write_resources(folder)
    from clbench.page import write_report
    write_report(folder)
    atomic_write(folder / "cache_report.json", to_json({"stage1_reused_by_cells_this_invocation": reused,
                                                        "stage1_seconds_saved_this_invocation": saved}))


RESOURCE_COLUMNS = ("cell", "stage", "task", "train_seconds", "seconds_saved_by_cache", "eval_seconds",
                    "bn_audit_seconds", "eval_share", "eval_and_bn_audit_share")


def finished_runs(folder: Path, sub: str = "runs") -> list[Path]:
    return [d for d in sorted((folder / sub).glob("*")) if (d / "done.json").exists()]


def write_resources(folder: Path) -> None:
    """``resources.csv``: every finished cell's time per stage, from its resources.json."""
    rows = []
    for run_dir in finished_runs(folder):
        for k, s in read_resources(run_dir).stages.items():
            rows.append({"cell": run_dir.name, "stage": k, **dataclasses.asdict(s), **s.shares()})
    write_table(folder / "resources.csv", rows, RESOURCE_COLUMNS)


def eval_share_line(folder: Path) -> str:
    """One line from ``resources.csv``: the median and the highest evaluation share of a stage's time."""
    table = pd.read_csv(folder / "resources.csv")
    if table.empty:
        return ""
    worst = table.loc[table["eval_share"].idxmax()]
    return (f"evaluation: {100 * table['eval_share'].median():.1f}% of a stage's time (median over cells and stages; "
            f"BN audit included {100 * table['eval_and_bn_audit_share'].median():.1f}%), highest "
            f"{100 * worst['eval_share']:.1f}% ({worst['cell']} stage {worst['stage']}: "
            f"{worst['train_seconds'] + worst['seconds_saved_by_cache']:.1f} s training, "
            f"{worst['eval_seconds']:.1f} s evaluation); per stage in resources.csv")


def load_comparison(folder: Path) -> tuple[pd.DataFrame, list, dict[int, dict[str, float]]]:
    """All finished cells' metrics rows, their tasks, and each seed's single-task reference results (if any)."""
    runs = finished_runs(folder)
    if not runs:
        raise ClbenchError(f"{folder}: no finished run in runs/")
    frames = [read_rows(d) for d in runs]
    tasks = read_tasks(runs[0], frames[0])
    references: dict[int, dict[str, float]] = {}
    for d in finished_runs(folder, "reference"):
        rows = read_rows(d)
        task = read_tasks(d, rows)[0]
        final = rows[(rows.stage == rows.stage.max()) & (rows.eval_task == task.name) & (rows.metric == task.metric)]
        references.setdefault(int(rows["seed"].iloc[0]), {})[task.name] = float(final["value"].iloc[0])
    return pd.concat(frames, ignore_index=True), tasks, references


def comparison_chance(folder: Path) -> dict[str, float]:
    """The tasks' chance levels (every cell evaluates the same test sets: the first finished run's)."""
    runs = finished_runs(folder)
    return read_chance(runs[0]) if runs else {}


def missing_cells(folder: Path) -> list[str]:
    """Cells of the grid (cells.json) without a finished run."""
    path = folder / "cells.json"
    expected = [cell for cell, _ in json.loads(path.read_text())] if path.exists() else []
    done = {d.name for d in finished_runs(folder)}
    return [cell for cell in expected if cell not in done]


def comparison_summary(folder: Path, definition: str = "drop",
                       threshold: float | None = None) -> tuple[pd.DataFrame, str]:
    """The strategies × tasks table of a comparison folder, from its CSVs alone, and its footnote."""
    rows, tasks, references = load_comparison(folder)
    if DEFINITIONS[definition].needs_reference and not references:
        raise ClbenchError(f"{folder}: --definition {definition} needs a comparison run with --reference single-task")
    names = list(dict.fromkeys(name for _, name in json.loads((folder / "cells.json").read_text()))) \
        if (folder / "cells.json").exists() else None
    table, note = comparison_table(rows, tasks, definition, references, threshold, names, comparison_chance(folder))
    missing = missing_cells(folder)
    if missing:
        note += f" Missing (not finished, not in the table): {', '.join(missing)}."
    return table, note


def write_summary(folder: Path, definition: str = "drop", threshold: float | None = None) -> str:
    table, note = comparison_summary(folder, definition, threshold)
    text = render(table, "md") + "\n\n" + note + "\n"
    atomic_write(folder / "summary.md", text)
    atomic_write(folder / "summary.csv", render(table, "csv"))
    return text
