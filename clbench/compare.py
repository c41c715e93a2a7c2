"""`clbench compare`: a strategy × seed grid of normal runs under one folder, resumable, with the stage-1
training shared by every strategy that does not change it, and optional single-task reference runs.

Folder: ``<out>/<name>/`` with ``compare.yaml``, ``runs/<strategy>-seed<N>/`` (each a normal run, finished
when its ``done.json`` exists), ``reference/<task>-seed<N>/``, ``cache/stage1-…pt``, ``summary.{md,csv}``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from tqdm import tqdm

from clbench import ClbenchError
from clbench.config import RunConfig
from clbench.report import comparison_table, render
from clbench.results import atomic_write, to_json, write_table

# Fields that cannot change what stage 1 computes, so they stay out of the stage-1 cache key. ``workers`` is
# not one of them: with augmentation on, workers draw other random crops than the main process.
NOT_IN_STAGE1_KEY = ("strategy", "set", "out", "run_id", "progress")


@dataclass(frozen=True)
class CompareSettings:
    strategies: tuple[str, ...]
    seeds: tuple[int, ...]
    reference: bool
    base: RunConfig

    def to_dict(self) -> dict[str, Any]:
        base = {k: v for k, v in self.base.to_dict().items() if k not in ("strategy", "seed", "out", "run_id",
                                                                          "progress", "set")}
        return {"strategies": list(self.strategies), "seeds": list(self.seeds), "reference": self.reference,
                "set": self.base.set, "run": base}

    def name(self) -> str:
        return "compare-" + hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:10]


def stage1_key(config: RunConfig) -> str:
    fields = {k: v for k, v in config.to_dict().items() if k not in NOT_IN_STAGE1_KEY}
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


def prepare_folder(settings: CompareSettings, out: Path, name: str | None) -> Path:
    """Create or reopen the comparison folder; reopening with other settings is an error, never an overwrite."""
    folder = Path(out) / (name or settings.name())
    saved = folder / "compare.yaml"
    wanted = yaml.safe_dump(settings.to_dict(), sort_keys=True)
    if saved.exists() and saved.read_text() != wanted:
        raise ClbenchError(f"{folder}: holds a comparison with other settings (see its compare.yaml); "
                           "choose another --name or --out")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(saved, wanted)
    return folder


def run_cell(folder: Path, cell_id: str, config: RunConfig, progress: Progress, stages: int,
             stage1_cache: Path | None) -> tuple[Path, float]:
    """Run one cell unless done; a cell folder without done.json is an interrupted run and is redone.
    Returns the run folder and the stage-1 training seconds saved by the cache."""
    from clbench.run import run
    run_dir = folder / cell_id
    progress.start_cell(cell_id)
    if (run_dir / "done.json").exists():
        progress.finish_cell(stages)
        return run_dir, 0.0
    if run_dir.exists():
        shutil.rmtree(run_dir)  # our own unfinished output: its tables hold only the stages it finished
    start = time.perf_counter()
    run(dataclasses.replace(config, out=str(folder), run_id=cell_id, progress=False), stage1_cache=stage1_cache,
        on_stage=progress.on_stage)
    atomic_write(run_dir / "done.json", to_json({"seconds": time.perf_counter() - start}))
    progress.finish_cell(stages)
    stage1 = json.loads((run_dir / "resources.json").read_text())["stages"]["1"]
    return run_dir, float(stage1.get("seconds_saved_by_cache", 0.0))


def compare(settings: CompareSettings, *, out: Path, name: str | None = None, progress: bool = True) -> Path:
    """Run (or resume) the grid and write summary.md / summary.csv; returns the comparison folder."""
    from clbench.plugins import create, options_for
    used = {key for s in settings.strategies for key in options_for(s, settings.base.set)}
    unused = sorted(set(settings.base.set) - used)
    if unused:
        raise ClbenchError(f"--set {unused[0]}: no strategy of --strategies {','.join(settings.strategies)} has it")
    folder = prepare_folder(settings, out, name)
    stages = len(settings.base.order)
    cells = [(s, seed) for seed in settings.seeds for s in settings.strategies]
    references = [(task, seed) for seed in settings.seeds for task in settings.base.order] if settings.reference else []
    bar = Progress(len(cells) * stages + len(references), progress)
    saved, reused = 0.0, 0
    try:
        for strategy, seed in cells:
            config = dataclasses.replace(settings.base, strategy=strategy, seed=seed,
                                         set=options_for(strategy, settings.base.set))
            changes_stage1 = create(strategy, config.set)[0].changes_first_stage
            cache = None if changes_stage1 else folder / "cache" / f"stage1-seed{seed}-{stage1_key(config)}.pt"
            _, seconds = run_cell(folder / "runs", f"{strategy}-seed{seed}", config, bar, stages, cache)
            saved, reused = saved + seconds, reused + (seconds > 0)
        for task, seed in references:
            config = dataclasses.replace(settings.base, strategy="naive", seed=seed, order=(task,), set={})
            run_cell(folder / "reference", f"{task}-seed{seed}", config, bar, 1, None)
    finally:
        bar.close()
    write_summary(folder)
    write_resources(folder)
    atomic_write(folder / "cache_report.json", to_json({"stage1_reused_by_cells_this_invocation": reused,
                                                        "stage1_seconds_saved_this_invocation": saved}))
    return folder


RESOURCE_COLUMNS = ("cell", "stage", "task", "train_seconds", "seconds_saved_by_cache", "eval_seconds",
                    "bn_audit_seconds", "eval_share", "eval_and_bn_audit_share")


def write_resources(folder: Path) -> None:
    """``resources.csv``: every finished cell's time per stage, from its resources.json."""
    rows = []
    for run_dir in sorted((folder / "runs").glob("*")):
        if (run_dir / "done.json").exists():
            stages = json.loads((run_dir / "resources.json").read_text())["stages"]
            rows += [{"cell": run_dir.name, "stage": int(k), **{c: v[c] for c in RESOURCE_COLUMNS[2:]}}
                     for k, v in stages.items()]
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


def load_comparison(folder: Path) -> tuple[pd.DataFrame, dict[int, dict[str, float]]]:
    """All finished cells' metrics rows, and each seed's single-task reference results (if any)."""
    frames = [pd.read_csv(d / "metrics.csv") for d in sorted((folder / "runs").glob("*")) if (d / "done.json").exists()]
    if not frames:
        raise ClbenchError(f"{folder}: no finished run in runs/")
    references: dict[int, dict[str, float]] = {}
    for d in sorted((folder / "reference").glob("*")):
        if (d / "done.json").exists():
            rows = pd.read_csv(d / "metrics.csv")
            from clbench.tasks import PRIMARY_METRIC
            task = rows["stage_task"].iloc[-1]
            final = rows[(rows.stage == rows.stage.max()) & (rows.eval_task == task) & (rows.metric == PRIMARY_METRIC[task])]
            references.setdefault(int(rows["seed"].iloc[0]), {})[task] = float(final["value"].iloc[0])
    return pd.concat(frames, ignore_index=True), references


def comparison_summary(folder: Path, definition: str = "drop",
                       threshold: float | None = None) -> tuple[pd.DataFrame, str]:
    """The strategies × tasks table of a comparison folder, from its CSVs alone, and its footnote."""
    rows, references = load_comparison(folder)
    if definition == "reference" and not references:
        raise ClbenchError(f"{folder}: --definition reference needs a comparison run with --reference single-task")
    strategies = yaml.safe_load((folder / "compare.yaml").read_text())["strategies"]
    return comparison_table(rows, definition, references, threshold, strategies)


def write_summary(folder: Path, definition: str = "drop", threshold: float | None = None) -> str:
    table, note = comparison_summary(folder, definition, threshold)
    text = render(table, "md") + "\n\n" + note + "\n"
    atomic_write(folder / "summary.md", text)
    atomic_write(folder / "summary.csv", render(table, "csv"))
    return text
