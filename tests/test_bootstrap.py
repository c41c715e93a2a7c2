"""Bootstrap intervals over test images (clbench.bootstrap) against direct computations, and the flags built on
them: a base whose interval reaches chance, a change within noise."""

from __future__ import annotations

import math
import random

import numpy as np
import pandas as pd
import pytest
import torch

from clbench.bootstrap import Bootstrap, CocoPieces, interval, miou, resample_counts, resampled_metric, top1
from clbench.config import resolve
from clbench.drop import change_within_noise, near_chance
from clbench.metrics import coco_evaluation, iou_from_confusion
from clbench.reader import RunData
from clbench.report import run_table
from clbench.run import run


def test_resample_counts_draw_n_images_per_row_from_a_seed():
    counts = resample_counts(7, 50, seed=4)
    assert counts.shape == (50, 7) and (counts.sum(1) == 7).all() and (counts >= 0).all()
    assert np.array_equal(counts, resample_counts(7, 50, seed=4))
    assert not np.array_equal(counts, resample_counts(7, 50, seed=5))


def test_top1_and_miou_per_resample_equal_a_direct_computation_on_the_drawn_images():
    hits = np.array([1.0, 0.0, 1.0, 1.0])
    counts = np.array([[1, 1, 1, 1], [2, 0, 1, 1], [0, 4, 0, 0]])
    assert top1(hits, counts).tolist() == [0.75, 1.0, 0.0]
    generator = torch.Generator().manual_seed(0)
    confusions = torch.randint(0, 20, (5, 3, 3), generator=generator)
    confusions[2, 2] = 0   # class 2 absent from one image's ground truth
    draws = resample_counts(5, 30, seed=1)
    expected = [iou_from_confusion(sum(int(k) * confusions[i] for i, k in enumerate(row)))[0] for row in draws]
    assert miou(confusions.numpy(), draws) == pytest.approx(expected, abs=1e-12)


def coco_case(seed: int = 0) -> tuple[dict, list]:
    rng = random.Random(seed)
    images = [{"id": i, "width": 100, "height": 80, "file_name": f"{i}.jpg"} for i in range(1, 21)]
    anns, dets = [], []
    for img in images:
        for _ in range(rng.randint(0, 3)):
            x, y, w, h = rng.uniform(0, 60), rng.uniform(0, 50), rng.uniform(4, 40), rng.uniform(4, 30)
            c = rng.choice([1, 3, 7])
            anns.append({"id": len(anns) + 1, "image_id": img["id"], "category_id": c, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})
            if rng.random() < 0.7:
                dets.append({"image_id": img["id"], "category_id": c, "bbox": [x + rng.gauss(0, 3), y, w, h],
                             "score": rng.random()})
        for _ in range(rng.randint(0, 2)):
            dets.append({"image_id": img["id"], "category_id": rng.choice([1, 3, 7]),
                         "bbox": [rng.uniform(0, 60), rng.uniform(0, 50), 10, 10], "score": rng.random()})
    return {"images": images, "categories": [{"id": c, "name": str(c)} for c in (1, 3, 7)], "annotations": anns}, dets


def drawn(gt: dict, dets: list, counts: np.ndarray) -> tuple[dict, list]:
    """The drawn test set written out: image i drawn k times becomes k images (new ids) with its annotations and
    detections; what a resample stands for, evaluated from scratch."""
    images, anns, out = [], [], []
    for (img, k) in zip(gt["images"], counts):
        for copy in range(int(k)):
            new = img["id"] * 100 + copy
            images.append({**img, "id": new})
            anns += [{**a, "image_id": new} for a in gt["annotations"] if a["image_id"] == img["id"]]
            out += [{**d, "image_id": new} for d in dets if d["image_id"] == img["id"]]
    return {**gt, "images": images, "annotations": [{**a, "id": i} for i, a in enumerate(anns, start=1)]}, out


def test_coco_map_per_resample_equals_cocos_own_map_on_the_drawn_images():
    gt, dets = coco_case()
    pieces = CocoPieces.evaluate(gt, dets)
    ones = np.ones((1, len(gt["images"])), dtype=np.int64)
    assert pieces.map(ones)[0] == pytest.approx(coco_evaluation(gt, dets)[0]["mAP"], abs=1e-12)
    for counts in resample_counts(len(gt["images"]), 20, seed=2):
        assert pieces.map(counts[None])[0] == pytest.approx(coco_evaluation(*drawn(gt, dets, counts))[0]["mAP"],
                                                          abs=1e-12)


def test_a_class_groups_metric_per_resample_equals_a_direct_computation_on_the_drawn_images():
    """Top-1 on the group's images, the mean IoU of the group's classes, the mean AP of its categories."""
    draws = resample_counts(20, 15, seed=2)
    hits, labels = np.array([1.0, 0.0] * 10), np.arange(20) % 4
    expected = [np.mean([h for h, y, k in zip(hits, labels, row) if y in (1, 3) for _ in range(k)] or [np.nan])
                for row in draws]
    assert resampled_metric("cls", (hits, labels), draws, (1, 3)) == pytest.approx(expected, abs=1e-12, nan_ok=True)
    confusions = torch.randint(0, 20, (20, 4, 4), generator=torch.Generator().manual_seed(3))
    confusions[:, 3] = 0
    confusions[:, :, 3] = 0   # class 3 never present: left out of its group's mean
    group = [float(np.nanmean(np.array(iou_from_confusion(sum(int(k) * confusions[i] for i, k in enumerate(row)))[1])
                              [[1, 3]])) for row in draws]
    assert resampled_metric("seg", confusions.numpy(), draws, (1, 3)) == pytest.approx(group, abs=1e-12)
    gt, dets = coco_case()
    pieces = CocoPieces.evaluate(gt, dets)
    for row in draws[:4]:
        per_category = coco_evaluation(*drawn(gt, dets, row))[1]
        assert pieces.map(row[None], category_ids=(1, 7))[0] == pytest.approx(
            np.nanmean([per_category[1], per_category[7]]), abs=1e-12)


def test_a_subsets_draws_are_the_whole_sets_draws_at_its_images():
    """A class-incremental view evaluates some of a split's images; each image is drawn as often as in the whole
    set, so the same resample at two stages draws the same images (the drop stays paired)."""
    whole = Bootstrap(30, seed=1)
    sub = whole.subset([0, 2, 5], 8)
    assert np.array_equal(sub.counts(3), whole.counts(8)[:, [0, 2, 5]])
    assert np.array_equal(sub.subset([5], 8).counts(1), sub.counts(3)[:, [2]])
    with pytest.raises(ValueError, match="subset has 3"):
        sub.counts(4)


def test_coco_map_without_detections_is_zero_in_every_resample_with_ground_truth():
    gt, _ = coco_case()
    assert (CocoPieces.evaluate(gt, []).map(resample_counts(20, 10, 0)) == 0).all()


def test_interval_is_the_central_95_percent_and_flags_follow_it():
    values = np.arange(1001, dtype=np.float64)   # 0..1000: percentiles 25 and 975
    assert interval(values) == pytest.approx((25.0, 975.0))
    assert all(math.isnan(v) for v in interval(np.array([np.nan, np.nan])))
    assert near_chance(0.30, 0.10, ci_low=0.09) and not near_chance(0.30, 0.10, ci_low=0.11)
    assert near_chance(0.19, 0.10) and not near_chance(0.21, 0.10)    # no interval: the 2x rule
    base, final = np.linspace(0.5, 0.6, 100), np.linspace(0.5, 0.6, 100) - 0.2
    assert change_within_noise(base, final) is False
    assert change_within_noise(base, base[::-1]) is True and change_within_noise(base, None) is None
    assert change_within_noise(base, base.copy()) is False   # served bit-identically: no change to flag


def test_run_table_flags_a_change_within_noise_and_a_base_reaching_chance():
    """Task a: base 0.50 with interval low 0.12 <= chance 0.12; its resamples at the last stage run the other way,
    so the paired change (-0.01 on average) spans -0.11..+0.09. Task b is trained last: no flag."""
    from clbench.tasks import TaskSpec
    noise = np.linspace(-0.05, 0.05, 200)
    rows = []
    for stage, task, value, low, resampled in ((0, "a", 0.1, 0.05, noise), (1, "a", 0.50, 0.12, noise),
                                               (2, "a", 0.49, 0.1, noise[::-1]), (0, "b", 0.1, 0.05, noise),
                                               (1, "b", 0.1, 0.05, noise), (2, "b", 0.6, 0.5, noise)):
        rows.append({"run_id": "r", "benchmark": "x", "strategy": "naive", "seed": 0, "stage": stage,
                     "stage_task": {0: "none", 1: "a", 2: "b"}[stage], "eval_task": task, "split": "test",
                     "metric": "top1", "value": value, "direction": "higher", "n": 60, "ci_low": low, "ci_high": 1.0,
                     "resampled": value + resampled})
    tasks = [TaskSpec("a", "cls", "A", ("x", "y")), TaskSpec("b", "cls", "B", ("x", "y"))]
    table, note = run_table(pd.DataFrame(rows), tasks, chance={"a": 0.12, "b": 0.5})
    assert table.iloc[0]["Drop (%)"] == "-2.00% (base near chance) (within noise)"
    assert "within noise: the paired 95% bootstrap interval" in note and "base near chance: the 95% bootstrap" in note
    rows[2]["resampled"] = 0.49 + noise          # moving with the base: the change is -0.01 in every resample
    rows[1]["ci_low"] = 0.2
    table, note = run_table(pd.DataFrame(rows), tasks, chance={"a": 0.12, "b": 0.5})
    assert table.iloc[0]["Drop (%)"] == "-2.00%" and "within noise" not in note


@pytest.mark.slow
def test_intervals_leave_training_untouched_and_detection_chance_is_the_stage0_map(tiny_args):
    with_ci = run(resolve(None, {**tiny_args, "run_id": "ci"}))
    without = run(resolve(None, {**tiny_args, "run_id": "plain", "bootstrap": "0"}))
    a, b = (pd.read_csv(d / "metrics.csv") for d in (with_ci, without))
    pd.testing.assert_series_equal(a["value"], b["value"])
    assert b["ci_low"].isna().all() and not (without / "bootstrap.csv").exists()
    primary = a[a.metric.isin(["mIoU", "mAP", "top1"])]
    assert primary[["ci_low", "ci_high"]].notna().all().all() and (primary.ci_low <= primary.ci_high).all()
    saved = pd.read_csv(with_ci / "bootstrap.csv")
    assert len(saved) == len(primary) and {len(v.split()) for v in saved["values"]} == {1000}
    data = RunData.load(with_ci)
    det0 = primary[(primary.stage == 0) & (primary.eval_task == "det")]["value"].item()
    assert data.chance["det"] == det0 and data.rows["resampled"].notna().sum() == len(primary)
