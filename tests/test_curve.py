"""Evaluation inside stages (--eval-every, --probe): training untouched bit for bit, the schedule, the probe, the
stage-end agreement, resume and the stage-1 cache."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch
from conftest import flags

from clbench.benchmarks.coco import images_only as probe_ground_truth
from clbench.compare import CompareSettings, compare
from clbench.config import resolve
from clbench.curve import due, probe_indices
from clbench.run import run


def test_the_schedule_is_dense_first_then_every_kth():
    assert [s for s in range(1, 20) if due(s, 4)] == [1, 2, 3, 4, 8, 12, 16]
    assert not any(due(s, 0) for s in range(1, 20))


def test_the_probe_is_a_fixed_subset_and_cuts_the_ground_truth():
    assert probe_indices(10, 4) == probe_indices(10, 4) and len(probe_indices(10, 4)) == 4
    assert probe_indices(10, 0) == list(range(10)) == probe_indices(10, 50)
    coco = {"images": [{"id": i} for i in range(5)], "annotations": [{"image_id": i, "id": 10 + i} for i in (0, 2, 2, 4)],
            "categories": [{"id": 1, "name": "a"}]}
    cut = probe_ground_truth(coco, {2, 4})
    assert [img["id"] for img in cut["images"]] == [2, 4] and [a["id"] for a in cut["annotations"]] == [12, 12, 14]
    assert cut["categories"] == coco["categories"]


def without_run_id(path):
    return pd.read_csv(path).drop(columns="run_id")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["bn_frozen+lwf+replay", "bn_per_task+freeze_restore"])
def test_in_stage_evaluation_leaves_training_bit_identical(tiny_args, strategy):
    plain = run(resolve(None, {**tiny_args, "strategy": strategy, "run_id": "plain"}))
    curved = run(resolve(None, {**tiny_args, "strategy": strategy, "run_id": "curved", "eval_every": "1",
                                "probe": "4"}))
    assert without_run_id(plain / "metrics.csv").equals(without_run_id(curved / "metrics.csv"))
    a = torch.load(plain / "checkpoints" / "stage3.pt", weights_only=True)["model"]
    b = torch.load(curved / "checkpoints" / "stage3.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    curve = pd.read_csv(curved / "curve.csv")
    assert set(curve.probe) == {4} and set(curve.eval_task) == {"seg", "det", "cls"}
    assert not (plain / "curve.csv").exists()


def test_the_last_point_of_a_stage_is_its_stage_end_row(tiny_args):
    """naive's after_stage changes nothing, so with the whole test set as the probe the curve's point after the last
    step is the stage's row in metrics.csv, to the bit; stage 0 is the reference point."""
    run_dir = run(resolve(None, {**tiny_args, "run_id": "c", "eval_every": "3", "batch_size": "4"}))
    curve, rows = pd.read_csv(run_dir / "curve.csv"), pd.read_csv(run_dir / "metrics.csv")
    steps = curve.groupby("stage")["step"].max()
    assert steps.to_dict() == {0: 0, 1: 3, 2: 3, 3: 3}                 # 12 images, batches of 4, one epoch
    assert curve.global_step.max() == 9
    for stage, last in steps.items():
        points = curve[(curve.stage == stage) & (curve.step == last)].set_index("eval_task")
        for task, point in points.iterrows():
            row = rows[(rows.stage == stage) & (rows.eval_task == task) & (rows.metric == point.metric)]
            assert point.value == row.value.item(), (stage, task)


@pytest.mark.slow
def test_a_resumed_runs_curve_equals_an_uninterrupted_ones(tiny_args, tmp_path):
    from clbench.cli import main
    run_dir = run(resolve(None, {**tiny_args, "strategy": "lwf", "run_id": "r", "eval_every": "2", "probe": "4"}))
    whole = (run_dir / "curve.csv").read_bytes()
    (run_dir / "checkpoints" / "stage3.pt").unlink()
    (run_dir / "checkpoints" / "stage2.pt").unlink()
    assert main(["run", "--resume", str(run_dir), "--progress", "false"]) == 0
    assert (run_dir / "curve.csv").read_bytes() == whole


def test_the_stage1_cache_carries_its_curve_and_the_options_stay_out_of_the_settings_hash(tiny_args, tmp_path):
    base = {k: v for k, v in tiny_args.items() if k != "out"}
    curved = CompareSettings(strategies=("naive", "ewc"), seeds=(0,), reference=False,
                             base=resolve(None, {**base, "eval_every": "2", "probe": "4"}))
    plain = CompareSettings(strategies=("naive", "ewc"), seeds=(0,), reference=False, base=resolve(None, base))
    assert curved.name() == plain.name()
    folder = compare(curved, out=tmp_path, name="c", progress=False)
    naive, ewc = (pd.read_csv(folder / "runs" / f"{s}-seed0" / "curve.csv") for s in ("naive", "ewc"))
    stage1 = [frame[frame.stage <= 1].drop(columns=["run_id", "strategy"]).reset_index(drop=True)
              for frame in (naive, ewc)]
    assert stage1[0].equals(stage1[1]) and len(stage1[0]) > 3
    resources = json.loads((folder / "runs" / "ewc-seed0" / "resources.json").read_text())
    assert resources["stages"]["1"]["train_seconds"] == 0.0 and resources["stages"]["1"]["seconds_saved_by_cache"] > 0
    assert set(ewc.stage) == {0, 1, 2, 3}


@pytest.mark.slow
def test_a_cache_made_without_the_curve_is_made_again_with_it(tiny_args, tmp_path):
    from clbench.cli import main
    args = ["compare", "--strategies", "naive,ewc", "--name", "c", "--bounds", "none"]
    assert main([*args, *flags(tiny_args)]) == 0
    shutil.rmtree(tmp_path / "results" / "c" / "runs" / "ewc-seed0")
    assert main([*args, *flags(tiny_args, eval_every="2")]) == 0   # the same comparison (folder), now with curves
    curve = pd.read_csv(tmp_path / "results" / "c" / "runs" / "ewc-seed0" / "curve.csv")
    assert set(curve.stage) == {0, 1, 2, 3}


def hand_curve() -> pd.DataFrame:
    """seg trained in stage 1, det in 2, cls in 3; values chosen so every measure is known by hand."""
    points = [(0, 0, "seg", 0.1), (1, 1, "seg", 0.5), (1, 2, "seg", 0.8),
              (2, 1, "seg", 0.2), (2, 2, "seg", 0.3), (2, 3, "seg", 0.6), (2, 4, "seg", 0.78),
              (3, 1, "seg", 0.7), (3, 2, "seg", 0.75),
              (2, 1, "det", 0.1), (2, 2, "det", 0.2), (2, 3, "det", 0.3), (2, 4, "det", 0.4),
              (3, 1, "det", 0.1), (3, 2, "det", 0.35)]
    steps = {0: 0, 1: 0, 2: 2, 3: 6}
    return pd.DataFrame([{"stage": s, "step": k, "global_step": steps[s] + k, "eval_task": t, "value": v}
                         for s, k, t, v in points])


def test_the_curve_measures_against_a_hand_computation():
    from clbench.drop import min_acc, stability_gaps, wc_acc
    trained = {"seg": 1, "det": 2, "cls": 3}
    curve = hand_curve()
    assert min_acc(curve, trained, {}) == pytest.approx({"seg": 20.0, "det": 10.0})
    R = pd.DataFrame({"cls": [0.9]}, index=[3])
    assert wc_acc(curve, R, trained, {}) == pytest.approx(90 / 3 + 2 / 3 * 15)
    gaps = stability_gaps(curve, trained, {})
    seg, det = gaps["seg"], gaps["det"]
    assert (seg.stage, seg.size, seg.lowest_at, seg.recovered_at) == (2, pytest.approx(60.0), 1, 4)   # back >= 0.76
    assert (det.stage, det.size, det.lowest_at, det.recovered_at) == (3, pytest.approx(30.0), 1, None)  # never >= 0.38
    assert min_acc(curve, trained, {"seg": 0.5})["seg"] == pytest.approx(40.0)        # normalised as ACC


@pytest.mark.slow
def test_the_curve_reaches_the_summary_the_table_and_the_plot(tiny_args, capsys):
    from clbench.cli import main
    assert main(["compare", "--strategies", "naive,lwf", "--name", "k", *flags(tiny_args, bounds="none",
                                                                                eval_every="2", probe="4")]) == 0
    out = capsys.readouterr().out
    assert "| min-ACC (x100) | WC-ACC (x100) | Segmentation stability gap" in out and "De Lange" in out
    folder = tiny_args["out"] + "/k"
    assert main(["table", folder]) == 0 and "WC-ACC (x100)" in capsys.readouterr().out
    assert main(["plot", folder]) == 0 and "curve.png" in capsys.readouterr().out
    page = open(folder + "/report.html").read()
    assert "Forgetting inside the stages" in page and 'alt="curve"' in page
