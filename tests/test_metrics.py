import contextlib
import copy
import io
import math

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO as RefCOCO
from pycocotools.cocoeval import COCOeval as RefCOCOeval

from clbench.metrics import coco_detection_metrics, confusion_matrix, iou_from_confusion, topk_correct

GT = {
    "images": [{"id": 1, "width": 100, "height": 80}, {"id": 2, "width": 60, "height": 60},
               {"id": 3, "width": 50, "height": 50}],  # image 3 has no annotation
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 7, "bbox": [50, 30, 40, 40], "area": 1600, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 3, "bbox": [5, 5, 20, 20], "area": 400, "iscrowd": 0},
        {"id": 4, "image_id": 2, "category_id": 3, "bbox": [30, 30, 28, 28], "area": 784, "iscrowd": 1},
    ],
    "categories": [{"id": 3, "name": "car"}, {"id": 7, "name": "train"}],
}
DETECTIONS = [
    {"image_id": 1, "category_id": 3, "bbox": [11, 10, 30, 21], "score": 0.9},
    {"image_id": 1, "category_id": 7, "bbox": [55, 35, 40, 40], "score": 0.8},
    {"image_id": 1, "category_id": 3, "bbox": [60, 5, 10, 10], "score": 0.7},   # false positive
    {"image_id": 2, "category_id": 3, "bbox": [5, 6, 19, 20], "score": 0.6},
    {"image_id": 2, "category_id": 3, "bbox": [31, 31, 26, 26], "score": 0.95},  # on the crowd box: ignored
    {"image_id": 3, "category_id": 7, "bbox": [1, 1, 20, 20], "score": 0.5},    # image without annotations
]


def pycocotools_stats(gt, dets):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = RefCOCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        ev = RefCOCOeval(coco, coco.loadRes(copy.deepcopy(dets)), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[:6]


def test_coco_metrics_equal_pycocotools_with_crowd_box_and_empty_image():
    ours = coco_detection_metrics(copy.deepcopy(GT), copy.deepcopy(DETECTIONS))
    ref = pycocotools_stats(GT, DETECTIONS)
    for value, expected in zip(ours.values(), ref):
        assert (math.isnan(value) and expected == -1) or value == pytest.approx(expected, abs=1e-12)
    assert 0 < ours["mAP"] < 1


def test_coco_metrics_equal_pycocotools_on_random_detections():
    rng = np.random.default_rng(0)
    dets = [{"image_id": int(rng.integers(1, 4)), "category_id": int(rng.choice([3, 7])),
             "bbox": [float(v) for v in rng.uniform(0, 40, 2)] + [float(v) for v in rng.uniform(5, 40, 2)],
             "score": float(rng.random())} for _ in range(40)] + DETECTIONS
    ours = coco_detection_metrics(copy.deepcopy(GT), copy.deepcopy(dets))
    ref = pycocotools_stats(GT, dets)
    assert list(ours.values())[:3] == pytest.approx(list(ref[:3]), abs=1e-12)


def test_map_by_hand_perfect_and_iou_0_58_boxes():
    gt = {"images": [{"id": 1, "width": 100, "height": 100}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 50, 50], "area": 2500,
                           "iscrowd": 0}],
          "categories": [{"id": 1, "name": "a"}]}
    perfect = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 50, 50], "score": 0.9}]
    assert coco_detection_metrics(copy.deepcopy(gt), perfect)["mAP"] == pytest.approx(1.0)
    # a 50x29 box inside the 50x50 one: IoU 0.58 → matched at thresholds .50 and .55 only → mAP 2/10
    partial = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 50, 29], "score": 0.9}]
    stats = coco_detection_metrics(copy.deepcopy(gt), partial)
    assert stats["mAP"] == pytest.approx(0.2)
    assert stats["AP50"] == pytest.approx(1.0) and stats["AP75"] == pytest.approx(0.0)


def test_no_detections_score_zero_not_an_exception():
    assert coco_detection_metrics(copy.deepcopy(GT), [])["mAP"] == 0.0


def test_miou_by_hand_with_ignore_pixels_and_absent_classes():
    pred = torch.tensor([[0, 1], [1, 2]])
    target = torch.tensor([[0, 1], [255, 1]])
    cm = confusion_matrix(pred, target, num_classes=4)
    miou, per_class = iou_from_confusion(cm)
    # class 0: 1/1; class 1: inter 1, union 2 + 1 - 1 = 2; class 2: predicted once, never true: 0;
    # class 3: absent from both → excluded. The ignored pixel's prediction (1) counts nowhere.
    assert per_class[:3] == [1.0, 0.5, 0.0] and math.isnan(per_class[3])
    assert miou == pytest.approx(0.5)


def test_miou_accumulates_one_confusion_matrix_over_the_set():
    a_pred, a_true = torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)
    b_pred, b_true = torch.tensor([[1, 1, 1, 1]]), torch.tensor([[1, 0, 0, 0]])
    cm = confusion_matrix(a_pred, a_true, 2) + confusion_matrix(b_pred, b_true, 2)
    miou, per_class = iou_from_confusion(cm)
    # class 0: inter 4, union 4 + 3 + 0 = 7; class 1: inter 1, union 1 + 4 - 1 = 4
    assert per_class == pytest.approx([4 / 7, 1 / 4])
    assert miou == pytest.approx((4 / 7 + 1 / 4) / 2)
    per_image_mean = (1.0 + (0 + 0.25) / 2) / 2  # what a mean of per-image mIoUs would wrongly give
    assert miou != pytest.approx(per_image_mean)


def test_topk_counts_rows_whose_label_is_among_the_k_best():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    assert topk_correct(logits, labels, 1) == 1
    assert topk_correct(logits, labels, 2) == 2
    assert topk_correct(logits, labels, 5) == 3
