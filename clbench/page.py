"""`clbench report DIR`: one self-contained HTML page (no network, images inline) for a run or a comparison,
made from the folder's files alone: the verdict in words, every definition's table, the stage × task
matrices, the plots, the BN attribution, the cost, and the command that reproduces it."""

from __future__ import annotations

import base64
import html
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from clbench import ClbenchError, __version__
from clbench.config import FIELDS, RunConfig
from clbench.drop import DEFINITIONS, metric_matrix, trained_at
from clbench.plots import plot_folder
from clbench.reader import ComparisonData, Folder, RunData, load
from clbench.report import (
    BN_NOTE,
    COST_NOTE,
    CURVE_NOTE,
    bn_attribution,
    class_group_table,
    cost_frame,
    cost_table,
    curve_measures,
    curve_table,
    definitions_table,
    primary_metrics,
    resource_line,
    run_measures,
    run_table,
)
from clbench.results import atomic_write
from clbench.summary import definition_table
from clbench.tasks import TaskSpec

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .6em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; } th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
p.note { color: #555; font-size: 12.5px; max-width: 1000px; }
pre { background: #f6f6f6; padding: .8em; overflow-x: auto; font-size: 12px; }
img { max-width: 100%; border: 1px solid #eee; margin: .5em 0; }
.verdict { background: #eef6ee; border-left: 4px solid #4a4; padding: .6em 1em; }
details { margin: 1em 0; } summary { cursor: pointer; font-weight: 600; }
"""

# Marks the page once loaded: data-images="decoded/total", so a headless browser can tell it rendered whole.
SELF_CHECK = ("<script>addEventListener('load', () => { const imgs = [...document.images]; document.body.dataset"
              ".images = imgs.filter(i => i.complete && i.naturalWidth > 0).length + '/' + imgs.length; });</script>")


def write_report(data: Folder | Path) -> Path:
    """``report.html`` in a run folder or a comparison folder (read once through ``clbench.reader``, or already
    read); returns its path."""
    data = load(data) if isinstance(data, Path) else data
    folder = data.path
    title, body = comparison_page(data) if isinstance(data, ComparisonData) else run_page(data)
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
            f"<style>{STYLE}</style></head>\n<body>\n<h1>{_e(title)}</h1>\n{body}\n{SELF_CHECK}\n"
            f"<p class=\"note\">Written by clbench {__version__} on {time.strftime('%Y-%m-%d %H:%M')} from the files "
            f"in {_e(str(folder))}; every number is in them.</p>\n</body></html>\n")
    path = folder / "report.html"
    atomic_write(path, page)
    return path


# a comparison ----------------------------------------------------------------------------------------------

def comparison_page(data: ComparisonData) -> tuple[str, str]:
    """The verdict and one picture, one compact table (a column per definition), then the details."""
    rows, tasks, order, folder = data.rows, data.tasks, data.order, data.path
    costs = strategy_costs(data.runs)
    lead, plots = _lead_plot(plot_folder(data))
    references = {}
    for name in DEFINITIONS:
        try:
            references[name] = data.measured_against(name)[0]
        except ClbenchError:   # needs single-task references this comparison has not run
            continue
    parts = [f"<div class=\"verdict\">{verdict(rows, tasks, costs)}</div>", data_line(data.env), lead]
    if data.missing:
        parts.append(f"<p class=\"note\">Not finished (not in any table): {_e(', '.join(data.missing))}.</p>")
    parts.append("<h2>Every definition at a glance</h2>" + _table(definitions_table(rows, tasks, order, references)) +
                 "<p class=\"note\">Mean over seeds; each column's definition, spread over seeds and pass/fail are in "
                 "the tables below. " + ("Plasticity and drop vs single-task: against the single-task references."
                                         if data.references else "Plasticity: against the joint bound's final metric of "
                                         "the same seed (no single-task reference; no drop vs single-task)."
                                         if data.joint is not None else "No reference runs: no plasticity, no drop vs "
                                         "single-task.") + "</p>")
    parts.append(_folded("Each definition's table: mean ± std over seeds, Δ naive, pass/fail, notes",
                         _definition_tables(data)))
    parts.append(_curve_section(data))
    parts.append(_class_group_section(data))
    cost = cost_frame(data.runs)
    if not cost.empty:
        parts.append("<h2>Cost</h2>" + _table(cost_table(cost, order)) + f"<p class=\"note\">{_e(COST_NOTE)}</p>")
    parts.append("<h2>More plots</h2>" + "".join(_image(p) for p in plots))
    parts.append(_folded("Primary metric after every stage, per strategy (mean over seeds)", "".join(
        f"<h3>{_e(strategy)}</h3>" + _table(stage_matrix(rows[rows.strategy == strategy], tasks)) for strategy in order)))
    parts.append("<h2>BatchNorm attribution</h2>" + _table(bn_table(rows, tasks, order)) +
                 f"<p class=\"note\">Mean over seeds. {_e(BN_NOTE)}</p>")
    parts.append("<h2>Reproduce</h2><pre>" + _e(compare_command(folder, data.settings)) + "</pre>" +
                 _folded("Settings (compare.yaml)", "<pre>" + _e((folder / "compare.yaml").read_text()) + "</pre>"))
    parts.append(environment_block(data.env))
    return f"clbench comparison {folder.name}", "\n".join(parts)


def _class_group_section(data: Folder) -> str:
    """The papers' format for class-incremental tasks (base / added / all classes), when the runs have one."""
    table, note = class_group_table(data.by_class, data.class_tasks, getattr(data, "order", ()))
    return "" if table.empty else ("<h2>Class groups, as the papers report them</h2>" + _table(table) +
                                   f"<p class=\"note\">{_e(note)}</p>")


def _curve_section(data: Folder) -> str:
    """Forgetting inside the stages (--eval-every): the curve plot and min-ACC, WC-ACC, the stability gaps."""
    if data.curve.empty:
        return ""
    measures = curve_measures(data.rows, data.curve, data.tasks, getattr(data, "references", None))
    plot = data.path / "plots" / "curve.png"
    return ("<h2>Forgetting inside the stages</h2>" + (_image(plot) if plot.exists() else "") +
            _table(curve_table(measures, data.tasks, getattr(data, "order", ()))) +
            f"<p class=\"note\">{_e(CURVE_NOTE)}</p>")


def _definition_tables(data: ComparisonData) -> str:
    out = []
    for name in DEFINITIONS:
        try:
            table, note = definition_table(data, name)
        except ClbenchError:  # needs single-task references this comparison has not run
            continue
        out.append(f"<h3>{_e(DEFINITIONS[name].column)}</h3>{_table(table)}<p class=\"note\">{_e(note)}</p>")
    return "".join(out)


def _lead_plot(paths: list[Path]) -> tuple[str, list[Path]]:
    """The one picture the page leads with (the stability-plasticity plot where there is one, else each task's
    metric over the stages) and the others."""
    names = [p.name for p in paths]
    lead = next((p for name in ("stability_plasticity.png", "metric_by_stage.png") for p in paths if p.name == name),
                paths[0] if paths else None)
    return (_image(lead) if lead else ""), [p for p in paths if p != lead and p.name in names and p.name != "curve.png"]


def _folded(summary: str, body: str) -> str:
    return f"<details><summary>{_e(summary)}</summary>{body}</details>"


def verdict(rows: pd.DataFrame, tasks: Sequence[TaskSpec], costs: pd.DataFrame) -> str:
    """Which strategy forgets least per task (drop %, mean over seeds), against naive, and at what cost."""
    measures = run_measures(rows, tasks, "drop").dropna(subset=["value"])
    if measures.empty:
        return "No drop is defined yet (a comparison needs at least two stages)."
    means = measures.groupby(["task", "strategy"])["value"].mean()
    lines = []
    for task in tasks:
        if task.name not in means.index.get_level_values(0):
            continue
        per = means.loc[task.name].sort_values(ascending=False)
        best = per.index[0]
        naive = f"; naive {per['naive']:+.2f}%" if "naive" in per.index and best != "naive" else ""
        cost = " (the baseline itself)" if best == "naive" else ""
        if best != "naive" and best in costs.index and "naive" in costs.index and costs.at["naive", "train_seconds"] > 0:
            ratio = costs.at[best, "train_seconds"] / costs.at["naive", "train_seconds"]
            cost = f", at {ratio:.2f}× naive's training time"
        lines.append(f"<b>{_e(task.label)}</b> ({_e(task.metric_label)}): least forgetting with <b>{_e(best)}</b>, "
                     f"drop {per[best]:+.2f}%{naive}{cost}.")
    last = tasks[-1]
    final = rows[(rows.stage == rows.stage.max()) & (rows.eval_task == last.name) & (rows.metric == last.metric)]
    learned = final.groupby("strategy")["value"].mean().sort_values()
    lines.append(f"The task trained last, {_e(last.label)}, ends at {_e(last.metric_label)} from "
                 f"{learned.iloc[0]:.3f} ({_e(learned.index[0])}) to {learned.iloc[-1]:.3f} ({_e(learned.index[-1])}): "
                 "a strategy that forgets little but learns little shows here.")
    seeds = rows["seed"].nunique()
    lines.append(f"Drop % = 100 × (final − after own stage) / after own stage; mean over {seeds} seed(s).")
    return "<br>".join(lines)


def strategy_costs(runs: Sequence[RunData]) -> pd.DataFrame:
    """Per strategy, mean over its runs: training, evaluation and BN-audit seconds, peak memory, latency."""
    out = []
    for run in runs:
        resources = run.resources
        if resources is None:
            continue
        strategy = run.config["strategy"]
        memory = resources.memory
        latency = [v.get(512) for v in resources.latency_ms.values() if v.get(512) is not None]
        out.append({"strategy": strategy, "train_seconds": sum(s.trained_seconds for s in resources.stages.values()),
                    "eval_seconds": resources.totals()["eval_seconds"],
                    "bn_audit_seconds": resources.totals()["bn_audit_seconds"],
                    "peak_memory_mb": memory.get("cuda_max_allocated_mb", memory.get("process_peak_rss_mb")),
                    "latency_512_ms": max(latency) if latency else math.nan})
    frame = pd.DataFrame(out, columns=["strategy", "train_seconds", "eval_seconds", "bn_audit_seconds",
                                       "peak_memory_mb", "latency_512_ms"])
    return frame.groupby("strategy").mean().round(1)


def stage_matrix(rows: pd.DataFrame, tasks: Sequence[TaskSpec]) -> pd.DataFrame:
    """After stage k (rows) × each task's primary metric (columns), mean over the runs in ``rows``."""
    per_run = [metric_matrix(run, primary_metrics(tasks)) for _, run in rows.groupby("run_id")]
    mean = pd.concat(per_run).groupby(level=0).mean()[[t.name for t in tasks]]
    mean.columns = [f"{t.label} ({t.metric_label})" for t in tasks]
    mean.index = [f"after stage {k}" if k else "before training" for k in mean.index]
    return mean.round(4).reset_index(names="")


def bn_table(rows: pd.DataFrame, tasks: Sequence[TaskSpec], order: Sequence[str]) -> pd.DataFrame:
    """Per strategy and task not trained last: the change split into BN drift and weights (pp, mean over seeds)."""
    out = []
    for strategy in order:
        for _, run in rows[rows.strategy == strategy].groupby("run_id"):
            trained, last = trained_at(run), int(run["stage"].max())
            for task in tasks:
                if task.name in trained and trained[task.name] < last:
                    split = bn_attribution(run, task, trained[task.name], last)
                    if split is not None:
                        out.append({"strategy": strategy, "task": task.label, "BN drift (pp)": split[0],
                                    "weights (pp)": split[1]})
    frame = pd.DataFrame(out, columns=["strategy", "task", "BN drift (pp)", "weights (pp)"])
    return frame.groupby(["strategy", "task"], sort=False).mean().round(2).reset_index()


def compare_command(folder: Path, settings: dict[str, Any]) -> str:
    """The `clbench compare` command that reruns (or resumes) exactly this comparison into this folder."""
    words = ["clbench compare", f"--strategies {','.join(settings['strategies'])}",
             f"--seeds {','.join(map(str, settings['seeds']))}"]
    if settings.get("reference"):
        words.append("--reference single-task")
    words += [f"--set {k}={_flag_value(v)}" for k, v in settings.get("set", {}).items()]
    words += changed_flags(settings["run"])
    words += [f"--out {folder.parent}", f"--name {folder.name}"]
    return " \\\n    ".join(words)


def changed_flags(values: dict[str, Any]) -> list[str]:
    """``--flag value`` for every setting that differs from its default."""
    defaults = RunConfig().to_dict()
    return [f"--{k.replace('_', '-')} {_flag_value(v)}" for k, v in values.items()
            if k in FIELDS and v != defaults.get(k) and v is not None]


def _flag_value(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={_flag_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


# one run ---------------------------------------------------------------------------------------------------

def run_page(data: RunData) -> tuple[str, str]:
    """One picture, one compact table (a column per definition), then the details."""
    rows, tasks, config = data.rows, data.tasks, data.config
    lead, plots = _lead_plot(plot_folder(data))
    strategy = str(rows["strategy"].iloc[0])
    parts = [data_line(data.env), lead, "<h2>Every definition at a glance</h2>" +
             _table(definitions_table(rows, tasks, [strategy])) +
             "<p class=\"note\">Each column's definition and pass/fail are in the tables below.</p>"]
    details = []
    for name in (n for n, d in DEFINITIONS.items() if not d.needs_reference):
        table, note = run_table(rows, tasks, name, chance=data.chance)
        details.append(f"<h3>{_e(DEFINITIONS[name].column)}</h3>{_table(table)}<p class=\"note\">{_e(note)}</p>")
    parts.append(_folded("Each definition's table: per stage, pass/fail, BN attribution, notes", "".join(details)))
    parts.append(_curve_section(data))
    parts.append(_class_group_section(data))
    parts.append("<h2>Primary metric after every stage</h2>" + _table(stage_matrix(rows, tasks)))
    parts.append("<h2>More plots</h2>" + "".join(_image(p) for p in plots))
    if data.resources is not None:
        parts.append("<h2>Cost</h2><p>" + _e(resource_line(data.resources)) + "</p>")
    command = " \\\n    ".join(["clbench run", *changed_flags({k: v for k, v in config.items()
                                                                if k not in ("out", "run_id", "set")}),
                                *[f"--set {k}={_flag_value(v)}" for k, v in config.get("set", {}).items()]])
    parts.append("<h2>Reproduce</h2><pre>" + _e(command) + "</pre>" +
                 _folded("config.yaml", "<pre>" + _e((data.path / "config.yaml").read_text()) + "</pre>"))
    parts.append(environment_block(data.env))
    return f"clbench run {data.path.name}", "\n".join(parts)


# pieces ----------------------------------------------------------------------------------------------------

def data_line(env: dict[str, Any]) -> str:
    """Where the data came from (env.json's data_source, from the data root's manifest) and how images were
    normalised: every figure on the page names its data."""
    source = env.get("data_source")
    if not source:
        return ""
    origin = source.get("source") or {}
    git = origin.get("git") or {} if isinstance(origin, dict) else {}
    where = f" from {origin['path']}" if isinstance(origin, dict) and origin.get("path") else ""
    if git.get("commit"):
        where += f" ({git.get('repository') or 'a git checkout'} at commit {git['commit'][:12]}" + \
            (", with uncommitted changes)" if git.get("dirty") else ")")
    folders = [d["path"] for d in env.get("data", {}).values()]
    text = f"Data: {os.path.commonpath(folders) if folders else 'see below'}, made by {source.get('made_by', '?')}" \
        f"{where}."
    if source.get("manifest_sha256"):
        text += f" Manifest sha256 {source['manifest_sha256'][:16]}…."
    if env.get("normalization"):
        n = env["normalization"]
        text += f" Input normalised with mean {n['mean']} and std {n['std']} ({n.get('source', '')})."
    return f"<p class=\"note\">{_e(text)}</p>"


def environment_block(env: dict[str, Any]) -> str:
    """env.json of a run (versions, git commit, device, data hashes) as written."""
    return _folded("Environment (env.json)", "<pre>" + _e(json.dumps(env, indent=1, default=str)) + "</pre>") \
        if env else ""


def _table(frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{_e(str(c))}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in frame.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"<td class=\"num\">{'—' if math.isnan(value) else f'{value:g}'}</td>"
    return f"<td>{_e(str(value))}</td>"


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f"<figure><img alt=\"{_e(path.stem)}\" src=\"data:image/png;base64,{data}\"></figure>"


def _e(text: str) -> str:
    return html.escape(text, quote=True)
