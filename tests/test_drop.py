import math

import pandas as pd
import pytest

from clbench.drop import (
    DEFINITIONS,
    absolute_change,
    average_accuracy,
    backward_transfer,
    drop_percent,
    forgetting,
    forward_transfer,
    metric_matrix,
    plasticity,
    reference_drop,
    trained_at,
)
from clbench.report import aggregate, comparison_table, paired_difference, run_measures, run_table, stage_table
from clbench.tasks import TaskSpec

PRIMARY = {"seg": "mIoU", "det": "mAP", "cls": "top1"}
TASKS = [TaskSpec(name, name, name, ()) for name in ("seg", "det", "cls")]


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
    assert math.isnan(drop["cls"])                                     # trained last: undefined, not 0
    change = absolute_change(R, trained)
    assert change["seg"] == pytest.approx(-0.10) and change["det"] == pytest.approx(-0.30)
    assert math.isnan(change["cls"])
    forget = forgetting(R, trained)
    assert forget["seg"] == pytest.approx(0.80 - 0.70)                 # max over stages 1, 2 minus final
    assert forget["det"] == pytest.approx(0.30) and math.isnan(forget["cls"])
    assert DEFINITIONS["bwt"].summarised(backward_transfer(R, trained, {})) == pytest.approx((-0.10 - 0.30) / 2)


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
    assert stage_table(rows, TASKS).set_index("Task").at["Segmentation", "Drop (%)"] == "undefined (base 0)"


def test_missing_cells_give_nan_not_a_number():
    rows = rows_from({0: MATRIX[0], 1: MATRIX[1], 2: MATRIX[2]})  # run stopped after stage 2
    rows = rows[~((rows["stage"] == 2) & (rows["eval_task"] == "seg"))]
    R, trained = metric_matrix(rows, PRIMARY), trained_at(rows)
    assert math.isnan(drop_percent(R, trained)["seg"])
    assert "cls" not in trained


def test_report_table_has_the_original_layout():
    table = stage_table(rows_from(MATRIX), TASKS)
    assert list(table.columns) == ["Task", "Metric", "Stage 1", "Stage 2", "Stage 3", "Strategy", "Drop (%)"]
    assert table["Task"].tolist() == ["Segmentation", "Detection", "Classification"]
    assert table.iloc[1].tolist() == ["Detection", "mAP@[.5:.95]", "-", "0.400", "0.100", "s", "-75.00%"]
    assert table.iloc[2]["Drop (%)"] == "undefined (trained last)"


def test_reference_drop_is_defined_for_the_task_trained_last():
    rows = rows_from(MATRIX)
    R, trained = metric_matrix(rows, PRIMARY), trained_at(rows)
    ref = reference_drop(R, trained, {"seg": 0.5, "det": 0.4, "cls": 1.0})
    assert ref["seg"] == pytest.approx(40.0) and ref["det"] == pytest.approx(-75.0) and ref["cls"] == pytest.approx(-10.0)
    assert math.isnan(reference_drop(R, trained, {"seg": 0.0})["seg"]) and math.isnan(reference_drop(R, trained, {})["det"])


def comparison_rows():
    """naive and lwf, seeds 0..2, with hand-picked final detection mAPs (base 0.40 everywhere)."""
    frames = []
    for strategy, finals in (("naive", (0.10, 0.20, 0.30)), ("lwf", (0.20, 0.30, 0.30))):
        for seed, final in enumerate(finals):
            m = {s: dict(v) for s, v in MATRIX.items()}
            m[3]["det"] = final
            frame = rows_from(m)
            frame["strategy"], frame["seed"], frame["run_id"] = strategy, seed, f"{strategy}{seed}"
            frames.append(frame)
    return pd.concat(frames)


def test_comparison_statistics_by_hand():
    measures = run_measures(comparison_rows(), TASKS, "drop")
    stats = aggregate(measures).set_index(["strategy", "task"])
    naive = stats.loc[("naive", "det")]
    # drops: -75, -50, -25 → mean -50, sample std 25, 95% CI half-width t(0.975, 2) · 25/√3 = 4.3027 · 14.434
    assert naive["mean"] == pytest.approx(-50.0) and naive["std"] == pytest.approx(25.0) and naive["n"] == 3
    assert naive["ci_high"] - naive["mean"] == pytest.approx(4.302653 * 25 / math.sqrt(3), rel=1e-5)
    diff = paired_difference(measures).set_index(["strategy", "task"])
    assert diff.loc[("lwf", "det"), "mean_diff"] == pytest.approx((25 + 25 + 0) / 3)
    assert math.isnan(stats.loc[("naive", "cls"), "mean"])   # trained last: no drop


def test_comparison_table_marks_pass_and_fail_and_states_its_definition():
    table, note = comparison_table(comparison_rows(), TASKS, "drop", threshold=60)
    det = table.set_index("Strategy")["Detection (mAP@[.5:.95])"]
    assert det["naive"].startswith("-50.00% ± 25.00 [") and det["naive"].endswith(" pass")
    assert "Δ naive +16.67" in det["lwf"]
    assert note.startswith("Drop (%) = 100 x (R[S,t] - R[s(t),t])") and "Within 60: pass when the task lost at most 60%" in note
    assert table.set_index("Strategy").loc["naive", "Classification (Top-1)"] == "undefined (trained last)"
    table, _ = comparison_table(comparison_rows(), TASKS, "abs", threshold=15)   # naive: -30, -20, -10 pp → mean -20
    assert table.set_index("Strategy").loc["naive", "Detection (mAP@[.5:.95])"].endswith("FAIL")


def test_bn_attribution_splits_the_change_into_bn_and_weights():
    rows = rows_from(MATRIX)
    audit = rows[(rows.stage == 3) & (rows.eval_task == "det") & (rows.metric == "mAP")].copy()
    audit["metric"], audit["value"] = "mAP_own_bn", 0.35    # own-stage BN statistics bring it back to 0.35
    table = stage_table(pd.concat([rows, audit]), TASKS).set_index("Task")
    # det: 0.40 → 0.10; BN part 100 (0.10 - 0.35) = -25, weights part 100 (0.35 - 0.40) = -5
    assert table.at["Detection", "BN drift / weights (pp)"] == "-25.00 / -5.00"
    assert table.at["Segmentation", "BN drift / weights (pp)"] == "n/a (cell missing)"   # no seg audit row
    assert table.at["Classification", "BN drift / weights (pp)"] == "-"
    assert "BN drift / weights (pp)" not in stage_table(rows, TASKS)


def test_run_table_marks_pass_and_fail_at_the_threshold():
    table = stage_table(rows_from(MATRIX), TASKS, threshold=15).set_index("Task")
    assert table.at["Segmentation", "Within 15"] == "pass"       # -12.5 %
    assert table.at["Detection", "Within 15"] == "FAIL"          # -75 %
    assert table.at["Classification", "Within 15"] == "-"        # trained last
    absolute = stage_table(rows_from(MATRIX), TASKS, "abs", threshold=10.5).set_index("Task")
    assert absolute.at["Segmentation", "Within 10.5"] == "pass"  # -10 pp
    table = stage_table(rows_from(MATRIX), TASKS, "abs", threshold=9.5).set_index("Task")
    assert table.at["Segmentation", "Within 9.5"] == "FAIL"
    _, note = run_table(rows_from(MATRIX), TASKS, "abs", threshold=10.5)
    assert note.startswith("Abs. change = 100 x") and "Within 10.5: pass when the task lost at most 10.5 pp" in note
    _, note = run_table(rows_from(MATRIX), TASKS, threshold=5)
    assert note.startswith("Drop (%) = 100 x") and "Within 5: pass when the task lost at most 5%" in note
    _, note = run_table(rows_from(MATRIX), TASKS, "forgetting", threshold=5)
    assert "Within 5: pass when the task forgot at most 5 pp" in note


# the standard continual-learning metrics ----------------------------------------------------------------------

REFERENCE = {"seg": 0.875, "det": 0.5, "cls": 1.0}


def test_acc_bwt_fwt_and_plasticity_by_hand():
    m = {s: dict(v) for s, v in MATRIX.items()}
    m[1]["det"], m[2]["cls"] = 0.05, 0.3   # earlier stages helped det and cls a little before their own
    rows = rows_from(m)
    R, trained = metric_matrix(rows, PRIMARY), trained_at(rows)
    assert average_accuracy(R, trained, {}) == pytest.approx({"seg": 0.7, "det": 0.1, "cls": 0.9})
    assert DEFINITIONS["acc"].summarised(average_accuracy(R, trained, REFERENCE)) == pytest.approx((0.8 + 0.2 + 0.9) / 3)
    bwt = backward_transfer(R, trained, REFERENCE)
    assert bwt["seg"] == pytest.approx((0.7 - 0.8) / 0.875) and bwt["det"] == pytest.approx((0.1 - 0.4) / 0.5)
    assert math.isnan(bwt["cls"])
    fwt = forward_transfer(R, trained, {})
    assert math.isnan(fwt["seg"]) and fwt["det"] == pytest.approx(0.05) and fwt["cls"] == pytest.approx(0.2)
    assert DEFINITIONS["fwt"].summarised(fwt) == pytest.approx(0.125)
    assert plasticity(R, trained, REFERENCE) == pytest.approx({"seg": 0.8 / 0.875, "det": 0.4 / 0.5, "cls": 0.9})
    assert all(math.isnan(v) for v in plasticity(R, trained, {}).values())   # needs the references


def test_standard_metrics_get_a_mean_column_no_pass_fail_and_say_how_they_normalise():
    table, note = comparison_table(comparison_rows(), TASKS, "acc", threshold=5)
    naive = table.set_index("Strategy").loc["naive"]
    # naive's final det over seeds: 0.10, 0.20, 0.30; seg 0.70, cls 0.90 → ACC per seed 56.67, 60, 63.33
    assert naive["ACC (mean over tasks)"].startswith("+60.00 ± 3.33")
    assert "pass" not in " ".join(table.astype(str).values.ravel()) and "FAIL" not in " ".join(table.astype(str).values.ravel())
    assert "no single-task reference" in note
    references = {seed: REFERENCE for seed in range(3)}
    _, note = comparison_table(comparison_rows(), TASKS, "bwt", references)
    assert "normalised by each seed's single-task reference" in note
    table, _ = comparison_table(comparison_rows(), TASKS, "plasticity", references)
    assert table.set_index("Strategy").loc["naive", "Segmentation (mIoU)"].startswith("+91.43%")


# chance levels ------------------------------------------------------------------------------------------------

def test_chance_levels_by_hand():
    import torch

    from clbench.metrics import chance_miou, chance_top1
    assert chance_top1(torch.tensor([0, 0, 1, 2]), 3) == 0.5
    # predict class 0 (6 of 10 pixels) everywhere: IoU 6/10, 0, 0 → mIoU 0.2
    assert chance_miou(torch.tensor([6, 3, 1])) == pytest.approx(0.2)
    # a class absent from the ground truth (and never predicted) is left out of the mean: (0.6 + 0) / 2
    assert chance_miou(torch.tensor([6, 0, 4])) == pytest.approx(0.3)


def test_drops_from_a_base_near_chance_are_flagged_in_tables():
    chance = {"seg": 0.05, "det": 0.25, "cls": 0.1}   # det's base (0.40 after stage 2) is within 2x of 0.25
    table, note = comparison_table(comparison_rows(), TASKS, "drop", chance=chance)
    row = table.set_index("Strategy").loc["naive"]
    assert row["Detection (mAP@[.5:.95])"].endswith("(base near chance)")
    assert "near chance" not in row["Segmentation (mIoU)"]
    assert "the metric is at most 2x chance" in note and "det 0.250" in note
    table, _ = comparison_table(comparison_rows(), TASKS, "acc", chance=chance)   # not a drop: no flag
    assert "near chance" not in " ".join(table.astype(str).values.ravel())
    table, note = run_table(rows_from(MATRIX), TASKS, "drop", chance=chance)
    assert table.set_index("Task").loc["Detection", "Drop (%)"] == "-75.00% (base near chance)"
    _, note = run_table(rows_from(MATRIX), TASKS, "drop", chance={"seg": 0.01, "det": 0.01, "cls": 0.5})
    assert "near chance" not in note
