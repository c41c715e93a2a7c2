"""Forgetting measures of DESIGN §4 as pure functions of the tidy metrics rows.

R[s, t]: task t's primary metric after stage s (s = 0: before any training); s(t): the stage that
trains t; S: the last stage.
"""

from __future__ import annotations

import math

import pandas as pd


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


def drop_percent(R: pd.DataFrame, trained: dict[str, int]) -> dict[str, float]:
    """100 (R[S,t] − R[s(t),t]) / R[s(t),t]; negative = worse; NaN (undefined) when the base is 0 or missing."""
    out = {}
    for task, s_t in trained.items():
        base, final = _base_and_final(R, task, s_t)
        out[task] = math.nan if base == 0 or math.isnan(base) else 100.0 * (final - base) / base
    return out


def absolute_change(R: pd.DataFrame, trained: dict[str, int]) -> dict[str, float]:
    """R[S,t] − R[s(t),t], in metric points."""
    out = {}
    for task, s_t in trained.items():
        base, final = _base_and_final(R, task, s_t)
        out[task] = final - base
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
    last_task = max(trained, key=trained.get)
    changes = [v for t, v in absolute_change(R, trained).items() if t != last_task]
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
