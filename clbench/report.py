"""The original report's table (Task | Metric | Stage 1..S | Drop (%)) from tidy metrics rows."""

from __future__ import annotations

import math

import pandas as pd

from clbench.drop import drop_percent, metric_matrix, trained_at
from clbench.tasks import PRIMARY_METRIC

LABELS = {"det": ("Detection", "mAP@[.5:.95]"), "seg": ("Segmentation", "mIoU"), "cls": ("Classification", "Top-1")}
FOOTNOTE = ("Drop (%) = 100 x (R[last stage] - R[own stage]) / R[own stage], signed (negative = worse); "
            "'-' = before the task's own stage; the task trained last has no drop against itself.")


def stage_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per task in training order: its primary metric after every stage and its drop %."""
    primary = {task: PRIMARY_METRIC[task] for task in rows["eval_task"].unique()}
    R, trained = metric_matrix(rows, primary), trained_at(rows)
    drops, last = drop_percent(R, trained), max(trained.values())
    table = []
    for task, s_t in sorted(trained.items(), key=lambda kv: kv[1]):
        label, metric = LABELS[task]
        row = {"Task": label, "Metric": metric}
        for s in range(1, last + 1):
            row[f"Stage {s}"] = f"{R.at[s, task]:.3f}" if s >= s_t and s in R.index else "-"
        row["Drop (%)"] = "n/a (trained last)" if s_t == last else _percent(drops[task])
        table.append(row)
    return pd.DataFrame(table)


def _percent(value: float) -> str:
    return "undefined (base 0)" if math.isnan(value) else f"{value:+.2f}%"


def to_markdown(table: pd.DataFrame) -> str:
    cells = [list(table.columns)] + table.astype(str).values.tolist()
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "| " + " | ".join("-" * w for w in widths) + " |"] + [line(r) for r in cells[1:]])
