"""Forgetting measures (DESIGN.md §4) as pure functions of the stage × task matrix, and one record per
definition that every table, plot and pass/fail reads.

R[s, t]: task t's primary metric after stage s (s = 0: before any training); s(t): the stage that
trains t; S: the last stage. A measure that has no meaning for the task trained last (it has no later
stage to forget in) is NaN for it here, and "undefined" in every table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd

from clbench.bootstrap import interval

DEFAULT_THRESHOLD = 5.0  # DESIGN.md §4: pass/fail threshold, % for relative definitions, pp for absolute ones


def metric_matrix(rows: pd.DataFrame, primary: dict[str, str]) -> pd.DataFrame:
    """R as a DataFrame: index = stage, columns = eval_task, values = the task's ``primary[task]`` metric."""
    keep = rows["metric"] == rows["eval_task"].map(primary)
    return rows[keep].pivot_table(index="stage", columns="eval_task", values="value", aggfunc="first", dropna=False)


def trained_at(rows: pd.DataFrame) -> dict[str, int]:
    """s(t) for every task trained in the run."""
    stages = rows[rows["stage"] > 0].drop_duplicates("stage")
    return {task: int(stage) for stage, task in zip(stages["stage"], stages["stage_task"])}


def _base_and_final(R: pd.DataFrame, task: str, s_t: int) -> tuple[float, float]:
    last = int(R.index.max())
    get = lambda s: float(R.at[s, task]) if s in R.index and task in R.columns else math.nan  # noqa: E731
    return get(s_t), get(last)


def _last_trained(trained: dict[str, int]) -> str:
    return max(trained, key=trained.get)


def drop_percent(R: pd.DataFrame, trained: dict[str, int]) -> dict[str, float]:
    """100 (R[S,t] − R[s(t),t]) / R[s(t),t]; negative = worse; NaN (undefined) when the base is 0 or missing,
    and for the task trained last (its base is its final value)."""
    out = {}
    for task, s_t in trained.items():
        base, final = _base_and_final(R, task, s_t)
        undefined = base == 0 or math.isnan(base) or task == _last_trained(trained)
        out[task] = math.nan if undefined else 100.0 * (final - base) / base
    return out


def absolute_change(R: pd.DataFrame, trained: dict[str, int]) -> dict[str, float]:
    """R[S,t] − R[s(t),t], in metric points; NaN for the task trained last."""
    out = {}
    for task, s_t in trained.items():
        base, final = _base_and_final(R, task, s_t)
        out[task] = math.nan if task == _last_trained(trained) else final - base
    return out


def forgetting(R: pd.DataFrame, trained: dict[str, int]) -> dict[str, float]:
    """Chaudhry et al.: max over s(t) ≤ s < S of R[s,t] − R[S,t]; NaN for the task trained last."""
    last = int(R.index.max())
    out = {}
    for task, s_t in trained.items():
        earlier = R.loc[(R.index >= s_t) & (R.index < last), task] if task in R.columns else pd.Series(dtype=float)
        out[task] = float(earlier.max() - R.at[last, task]) if len(earlier) else math.nan
    return out


def reference_drop(R: pd.DataFrame, trained: dict[str, int], reference: dict[str, float]) -> dict[str, float]:
    """Drop vs a single-task reference: 100 (R[S,t] − R_ref[t]) / R_ref[t], R_ref[t] = task t trained alone
    with the same budget and seed. Defined for the task trained last too; NaN when R_ref is 0 or missing."""
    out = {}
    for task, s_t in trained.items():
        _, final = _base_and_final(R, task, s_t)
        base = reference.get(task, math.nan)
        out[task] = math.nan if base == 0 or math.isnan(base) else 100.0 * (final - base) / base
    return out


def own_stage_values(R: pd.DataFrame, trained: dict[str, int]) -> dict[str, float]:
    """R[s(t),t]: each task's metric right after its own stage, the base of every drop."""
    return {task: _get(R, s_t, task) for task, s_t in trained.items()}


def near_chance(base: float, chance: float | None, ci_low: float = math.nan) -> bool:
    """A base a drop from says little: its 95% bootstrap interval reaches the chance level (``ci_low`` <= chance);
    without an interval, within 2x of chance. False when chance is unknown."""
    if chance is None or math.isnan(base):
        return False
    return ci_low <= chance if not math.isnan(ci_low) else base <= 2 * chance


def change_within_noise(base: Any, final: Any) -> bool | None:
    """Whether the paired 95% bootstrap interval of R[S,t] − R[s(t),t] includes 0: the two stages' metrics per
    resample of the same images (``clbench.bootstrap``), differenced resample by resample. None without
    resamples; False when the change is 0 in every resample (nothing changed). A drop % (or any change from the own
    stage) has the sign of this difference, so one flag serves."""
    if base is None or final is None or not isinstance(base, np.ndarray) or not isinstance(final, np.ndarray):
        return None
    change = final - base
    if not np.any(change):
        return False   # no change at all in any resample (a task served bit-identically): nothing to flag
    low, high = interval(change)
    return None if math.isnan(low) else low <= 0 <= high


def normalised(R: pd.DataFrame, reference: dict[str, float]) -> pd.DataFrame:
    """N[s,t] = R[s,t] / R_ref[t] for every task with a positive single-task reference, R[s,t] otherwise."""
    N = R.copy()
    for task in N.columns:
        base = reference.get(task, math.nan)
        if base > 0:
            N[task] = N[task] / base
    return N


def _get(N: pd.DataFrame, stage: int, task: str) -> float:
    return float(N.at[stage, task]) if stage in N.index and task in N.columns else math.nan


def average_accuracy(R: pd.DataFrame, trained: dict[str, int], reference: dict[str, float]) -> dict[str, float]:
    """ACC (Lopez-Paz & Ranzato 2017; Chaudhry et al. 2018): each task's final N[S,t]; its mean is ACC."""
    N, last = normalised(R, reference), int(R.index.max())
    return {task: _get(N, last, task) for task in trained}


def backward_transfer(R: pd.DataFrame, trained: dict[str, int], reference: dict[str, float]) -> dict[str, float]:
    """BWT (Lopez-Paz & Ranzato 2017): N[S,t] − N[s(t),t] per task but the last trained; their mean is BWT."""
    N, last = normalised(R, reference), _last_trained(trained)
    return {task: math.nan if task == last else _get(N, int(R.index.max()), task) - _get(N, s_t, task)
            for task, s_t in trained.items()}


def forward_transfer(R: pd.DataFrame, trained: dict[str, int], reference: dict[str, float]) -> dict[str, float]:
    """FWT (Lopez-Paz & Ranzato 2017): N[s(t)−1,t] − N[0,t], what earlier stages did for task t before it was
    trained, against the untrained network (stage 0); undefined for the task trained first. Mean = FWT."""
    N = normalised(R, reference)
    return {task: math.nan if s_t == 1 else _get(N, s_t - 1, task) - _get(N, 0, task) for task, s_t in trained.items()}


def plasticity(R: pd.DataFrame, trained: dict[str, int], reference: dict[str, float]) -> dict[str, float]:
    """R[s(t),t] / R_ref[t]: how much of what task t learns alone it learned in its own stage (needs the
    single-task references); 1 = as much, < 1 = earlier stages or a strategy held it back."""
    out = {}
    for task, s_t in trained.items():
        base = reference.get(task, math.nan)
        out[task] = _get(R, s_t, task) / base if base > 0 else math.nan
    return out


Measure = Callable[[pd.DataFrame, dict[str, int], dict[str, float]], dict[str, float]]


@dataclass(frozen=True)
class Definition:
    """What a table column means: how it is computed, its unit and scale, which way is better, and what it
    says about the task trained last."""

    name: str
    column: str
    unit: str                  # "%" or "pp" (percentage points of the metric)
    scale: float               # the function's value × scale is what is shown
    higher_is_better: bool
    trained_last: str          # "undefined" or "defined"
    needs_reference: bool
    text: str
    function: Measure
    summary: str = ""          # the name of the mean over tasks (ACC, BWT, ...); "" = no summary column
    thresholded: bool = True   # pass/fail at a threshold applies (drops), or not (the standard CL metrics)
    normalises: bool = False   # N = R / R_ref where a single-task reference exists
    from_own_stage: bool = False  # measured from R[s(t),t]: flagged when that base is near chance

    def summarised(self, values: dict[str, float]) -> float:
        """The mean over the tasks where the definition has a value (NaN if none)."""
        defined = [v for v in values.values() if not math.isnan(v)]
        return sum(defined) / len(defined) if defined else math.nan

    def values(self, R: pd.DataFrame, trained: dict[str, int], reference: dict[str, float] | None = None
               ) -> dict[str, float]:
        """Per task, in the shown unit; NaN where undefined."""
        return {t: v * self.scale for t, v in self.function(R, trained, reference or {}).items()}

    def passes(self, value: float, threshold: float) -> bool | None:
        """Within ``threshold`` of the base (in this definition's unit)? None when undefined."""
        if math.isnan(value):
            return None
        return value >= -threshold if self.higher_is_better else value <= threshold

    def format(self, value: float) -> str:
        return f"{value:+.2f}" + ("%" if self.unit == "%" else "")


DEFINITIONS: dict[str, Definition] = {d.name: d for d in (
    Definition("drop", "Drop (%)", "%", 1.0, True, "undefined", False,
               "Drop (%) = 100 x (R[S,t] - R[s(t),t]) / R[s(t),t]: R[s,t] = task t's primary metric after stage s, "
               "s(t) = the stage that trains t, S = the last stage; signed, negative = worse; undefined for the task "
               "trained last and when the base is 0.",
               lambda R, trained, ref: drop_percent(R, trained), from_own_stage=True),
    Definition("abs", "Abs. change (pp)", "pp", 100.0, True, "undefined", False,
               "Abs. change = 100 x (R[S,t] - R[s(t),t]), in percentage points of the metric; signed, negative = "
               "worse; undefined for the task trained last.",
               lambda R, trained, ref: absolute_change(R, trained), from_own_stage=True),
    Definition("forgetting", "Forgetting (pp)", "pp", 100.0, False, "undefined", False,
               "Forgetting (Chaudhry et al. 2018) = 100 x max over s(t) <= s < S of (R[s,t] - R[S,t]), in "
               "percentage points; positive = forgot; undefined for the task trained last; F = its mean over tasks.",
               lambda R, trained, ref: forgetting(R, trained), summary="F", from_own_stage=True),
    Definition("reference", "Drop vs single-task (%)", "%", 1.0, True, "defined", True,
               "Drop vs single-task = 100 x (R[S,t] - R_ref[t]) / R_ref[t], R_ref[t] = task t trained alone with "
               "the same budget and seed; signed, negative = worse; defined for every task.",
               reference_drop),
    Definition("acc", "ACC (x100)", "pp", 100.0, True, "defined", False,
               "ACC = mean over tasks of N[S,t], the final metric; N = R / R_ref[t] where a single-task reference "
               "exists, R otherwise (x100).",
               average_accuracy, summary="ACC", thresholded=False, normalises=True),
    Definition("bwt", "BWT (x100)", "pp", 100.0, True, "undefined", False,
               "BWT = mean over tasks but the last of N[S,t] - N[s(t),t] (x100; negative = forgetting); N as for ACC.",
               backward_transfer, summary="BWT", thresholded=False, normalises=True, from_own_stage=True),
    Definition("fwt", "FWT (x100)", "pp", 100.0, True, "defined", False,
               "FWT = mean over tasks but the first of N[s(t)-1,t] - N[0,t]: what the stages before t did for it, "
               "against the untrained network (x100); undefined for the task trained first; N as for ACC.",
               forward_transfer, summary="FWT", thresholded=False, normalises=True),
    Definition("plasticity", "Plasticity (%)", "%", 100.0, True, "defined", True,
               "Plasticity = 100 x R[s(t),t] / R_ref[t]: task t's metric after its own stage against t trained alone "
               "(same budget and seed); 100% = learned as much as alone.",
               plasticity, summary="mean", thresholded=False),
)}


# Measures of the curve inside the stages (--eval-every; DESIGN.md §4b) -------------------------------------

GAP_TOLERANCE = 0.05   # a task has recovered once it is back within 5% (relative) of its value when the stage began


def _normalised_curve(curve: pd.DataFrame, reference: dict[str, float]) -> pd.DataFrame:
    """The curve's values as ACC uses them: R / R_ref where a single-task reference exists, R otherwise (× 100)."""
    scale = curve["eval_task"].map(lambda t: 100.0 / reference[t] if reference.get(t) else 100.0)
    return curve.assign(value=curve["value"] * scale).sort_values("global_step", kind="stable")


def min_acc(curve: pd.DataFrame, trained: dict[str, int], reference: dict[str, float]) -> dict[str, float]:
    """Per task but the last: the lowest value at any point after its own stage (De Lange et al., ICLR 2023),
    normalised as ACC (× 100)."""
    points = _normalised_curve(curve, reference)
    last = _last_trained(trained)
    return {t: float(points[(points.eval_task == t) & (points.stage > s)]["value"].min())
            for t, s in trained.items() if t != last}


def wc_acc(curve: pd.DataFrame, R: pd.DataFrame, trained: dict[str, int], reference: dict[str, float]) -> float:
    """Worst-case accuracy after the last stage k: (1/k) A[k,k] + (1 − 1/k) min-ACC (mean over earlier tasks)."""
    last, k = _last_trained(trained), len(trained)
    final = float(R.at[trained[last], last]) * (100.0 / reference[last] if reference.get(last) else 100.0)
    earlier = [v for v in min_acc(curve, trained, reference).values() if not math.isnan(v)]
    return final / k + (1 - 1 / k) * (sum(earlier) / len(earlier) if earlier else math.nan)


@dataclass(frozen=True)
class Gap:
    """A task's largest fall inside a later stage: from its value when the stage began to the lowest point."""

    task: str
    stage: int
    size: float                 # points (× 100, normalised as ACC); > 0 = it fell
    lowest_at: int              # the step of the lowest point
    recovered_at: int | None    # the first later step back within GAP_TOLERANCE of the start; None = never


def stability_gaps(curve: pd.DataFrame, trained: dict[str, int], reference: dict[str, float]) -> dict[str, Gap]:
    """Per task but the last: its largest stability gap over the stages after its own."""
    points = _normalised_curve(curve, reference)
    out = {}
    for task, own in trained.items():
        if task == _last_trained(trained):
            continue
        series = points[points.eval_task == task]
        gaps = [_gap(task, stage, series) for stage in sorted(set(series.stage)) if stage > own]
        gaps = [g for g in gaps if g is not None]
        if gaps:
            out[task] = max(gaps, key=lambda g: g.size)
    return out


def _gap(task: str, stage: int, series: pd.DataFrame) -> Gap | None:
    before, inside = series[series.stage < stage], series[series.stage == stage]
    if before.empty or inside.empty:
        return None
    start = float(before["value"].iloc[-1])          # the last point before the stage began
    lowest = inside.loc[inside["value"].idxmin()]
    after = inside[(inside.step >= lowest.step) & (inside.value >= start - GAP_TOLERANCE * abs(start))]
    return Gap(task, stage, start - float(lowest.value), int(lowest.step),
               int(after.step.iloc[0]) if not after.empty else None)
