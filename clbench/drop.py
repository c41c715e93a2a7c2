"""Forgetting measures (DESIGN.md §4) as pure functions of the stage × task matrix, and one record per
definition that every table, plot and pass/fail reads.

R[s, t]: task t's primary metric after stage s (s = 0: before any training); s(t): the stage that
trains t; S: the last stage. A measure that has no meaning for the task trained last (it has no later
stage to forget in) is NaN for it here, and "undefined" in every table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pandas as pd

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


def bwt(R: pd.DataFrame, trained: dict[str, int]) -> float:
    """Backward transfer: mean over every task but the last trained of R[S,t] − R[s(t),t]."""
    changes = [v for v in absolute_change(R, trained).values() if not math.isnan(v)]
    return sum(changes) / len(changes) if changes else math.nan


def reference_drop(R: pd.DataFrame, trained: dict[str, int], reference: dict[str, float]) -> dict[str, float]:
    """Drop vs a single-task reference: 100 (R[S,t] − R_ref[t]) / R_ref[t], R_ref[t] = task t trained alone
    with the same budget and seed. Defined for the task trained last too; NaN when R_ref is 0 or missing."""
    out = {}
    for task, s_t in trained.items():
        _, final = _base_and_final(R, task, s_t)
        base = reference.get(task, math.nan)
        out[task] = math.nan if base == 0 or math.isnan(base) else 100.0 * (final - base) / base
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
               lambda R, trained, ref: drop_percent(R, trained)),
    Definition("abs", "Abs. change (pp)", "pp", 100.0, True, "undefined", False,
               "Abs. change = 100 x (R[S,t] - R[s(t),t]), in percentage points of the metric; signed, negative = "
               "worse; undefined for the task trained last.",
               lambda R, trained, ref: absolute_change(R, trained)),
    Definition("forgetting", "Forgetting (pp)", "pp", 100.0, False, "undefined", False,
               "Forgetting (Chaudhry et al. 2018) = 100 x max over s(t) <= s < S of (R[s,t] - R[S,t]), in "
               "percentage points; positive = forgot; undefined for the task trained last.",
               lambda R, trained, ref: forgetting(R, trained)),
    Definition("reference", "Drop vs single-task (%)", "%", 1.0, True, "defined", True,
               "Drop vs single-task = 100 x (R[S,t] - R_ref[t]) / R_ref[t], R_ref[t] = task t trained alone with "
               "the same budget and seed; signed, negative = worse; defined for every task.",
               reference_drop),
)}
