import math

import pandas as pd
import pytest

from clbench.drop import absolute_change, bwt, drop_percent, forgetting, metric_matrix, trained_at
from clbench.report import stage_table

PRIMARY = {"seg": "mIoU", "det": "mAP", "cls": "top1"}


def rows_from(matrix: dict[int, dict[str, float]], order=("seg", "det", "cls")) -> pd.DataFrame:
    """Tidy rows for R[stage][task], plus a secondary metric that must never be picked up."""
    rows = []
    for stage, values in matrix.items():
        stage_task = "none" if stage == 0 else order[stage - 1]
        for task, value in values.items():
            for metric, v in ((PRIMARY[task], value), ("other", 99.0)):
                rows.append({"run_id": "r", "benchmark": "b", "strategy": "s", "seed": 0, "stage": stage,
                             "stage_task": stage_task, "eval_task": task, "metric": metric, "value": v,
                             "direction": "higher", "n": 10})
    return pd.DataFrame(rows)


MATRIX = {0: {"seg": 0.0, "det": 0.0, "cls": 0.1},
          1: {"seg": 0.80, "det": 0.0, "cls": 0.1},
          2: {"seg": 0.60, "det": 0.40, "cls": 0.1},
          3: {"seg": 0.70, "det": 0.10, "cls": 0.9}}


def test_matrix_uses_primary_metrics_only_and_stage_assignment_comes_from_the_rows():
    rows = rows_from(MATRIX)
    R = metric_matrix(rows, PRIMARY)
    assert R.at[2, "det"] == 0.40 and R.at[3, "seg"] == 0.70
    assert trained_at(rows) == {"seg": 1, "det": 2, "cls": 3}


def test_drop_abs_forgetting_and_bwt_by_hand():
    rows = rows_from(MATRIX)
    R, trained = metric_matrix(rows, PRIMARY), trained_at(rows)
    drop = drop_percent(R, trained)
    assert drop["seg"] == pytest.approx(100 * (0.70 - 0.80) / 0.80)   # -12.5 %: forgot, partly recovered
    assert drop["det"] == pytest.approx(-75.0)
    assert drop["cls"] == 0.0                                          # trained last: no drop against itself
    change = absolute_change(R, trained)
    assert change["seg"] == pytest.approx(-0.10) and change["det"] == pytest.approx(-0.30)
    forget = forgetting(R, trained)
    assert forget["seg"] == pytest.approx(0.80 - 0.70)                 # max over stages 1, 2 minus final
    assert forget["det"] == pytest.approx(0.30) and math.isnan(forget["cls"])
    assert bwt(R, trained) == pytest.approx((-0.10 - 0.30) / 2)


def test_improvement_gives_a_positive_drop():
    m = {0: {"seg": 0.0, "det": 0.0, "cls": 0.0}, 1: {"seg": 0.5, "det": 0, "cls": 0},
         2: {"seg": 0.55, "det": 0.2, "cls": 0}, 3: {"seg": 0.6, "det": 0.2, "cls": 0.5}}
    rows = rows_from(m)
    drop = drop_percent(metric_matrix(rows, PRIMARY), trained_at(rows))
    assert drop["seg"] == pytest.approx(20.0) and drop["det"] == pytest.approx(0.0)


def test_zero_base_is_undefined_never_zero():
    m = {0: {"seg": 0.0, "det": 0.0, "cls": 0.0}, 1: {"seg": 0.0, "det": 0.0, "cls": 0.0},
         2: {"seg": 0.0, "det": 0.3, "cls": 0.0}, 3: {"seg": 0.1, "det": 0.3, "cls": 0.4}}
    rows = rows_from(m)
    drop = drop_percent(metric_matrix(rows, PRIMARY), trained_at(rows))
    assert math.isnan(drop["seg"])
    assert stage_table(rows).set_index("Task").at["Segmentation", "Drop (%)"] == "undefined (base 0)"


def test_missing_cells_give_nan_not_a_number():
    rows = rows_from({0: MATRIX[0], 1: MATRIX[1], 2: MATRIX[2]})  # run stopped after stage 2
    rows = rows[~((rows["stage"] == 2) & (rows["eval_task"] == "seg"))]
    R, trained = metric_matrix(rows, PRIMARY), trained_at(rows)
    assert math.isnan(drop_percent(R, trained)["seg"])
    assert "cls" not in trained


def test_report_table_has_the_original_layout():
    table = stage_table(rows_from(MATRIX))
    assert list(table.columns) == ["Task", "Metric", "Stage 1", "Stage 2", "Stage 3", "Drop (%)"]
    assert table["Task"].tolist() == ["Segmentation", "Detection", "Classification"]
    assert table.iloc[1].tolist() == ["Detection", "mAP@[.5:.95]", "-", "0.400", "0.100", "-75.00%"]
    assert table.iloc[2]["Drop (%)"] == "n/a (trained last)"
