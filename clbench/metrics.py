"""The numbers clbench reports (DESIGN.md §3): COCO mAP via the COCO API, mIoU from one confusion matrix, top-k."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np
import torch

COCO_STATS = ("mAP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")


def coco_detection_metrics(gt: dict[str, Any], detections: list[dict[str, Any]]) -> dict[str, float]:
    """COCO bbox stats of ``detections`` (results format, original category ids) against a COCO ``gt`` dict.

    Uses faster-coco-eval (its 12 stats equal pycocotools'). A stat COCO reports as -1 (no ground truth
    in that area range) comes back as NaN, never as a number that could be averaged.
    """
    return coco_evaluation(gt, detections)[0]


def coco_evaluation(gt: dict[str, Any], detections: list[dict[str, Any]]) -> tuple[dict[str, float], dict[int, float]]:
    """The COCO stats and the AP@[.5:.95] of every category id (NaN: no ground truth of that category)."""
    from faster_coco_eval import COCO, COCOeval_faster

    category_ids = sorted(c["id"] for c in gt["categories"])
    with_gt = {a["category_id"] for a in gt["annotations"] if not a.get("iscrowd", 0)}
    if not detections:
        stats = {k: (0.0 if with_gt else float("nan")) for k in COCO_STATS}
        return stats, {c: (0.0 if c in with_gt else float("nan")) for c in category_ids}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt)
        evaluator = COCOeval_faster(coco_gt, coco_gt.loadRes(detections), iouType="bbox",
                                    print_function=lambda *a, **k: None)
        evaluator.params.imgIds = sorted(img["id"] for img in gt["images"])
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = {k: (float(v) if v >= 0 else float("nan")) for k, v in zip(COCO_STATS, evaluator.stats[:6])}
    return stats, per_category_ap(evaluator.eval["precision"], list(evaluator.params.catIds))


def per_category_ap(precision: np.ndarray, category_ids: list[int]) -> dict[int, float]:
    """AP@[.5:.95] per category from COCOeval's precision array [T, R, K, area, maxDets] (area all, 100 dets),
    as detectron2 computes it: the mean of the entries that are not -1."""
    out = {}
    for k, cat in enumerate(category_ids):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        out[int(cat)] = float(values.mean()) if values.size else float("nan")
    return out


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) counts, rows = ground truth, columns = prediction; target pixels equal to 255 are ignored."""
    valid = target != 255
    index = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


def iou_from_confusion(cm: torch.Tensor) -> tuple[float, list[float]]:
    """mIoU and per-class IoU; a class absent from both ground truth and predictions is NaN and left out."""
    cm = cm.double()
    inter = cm.diag()
    union = cm.sum(0) + cm.sum(1) - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, float("nan")))
    present = ~iou.isnan()
    miou = float(iou[present].mean()) if present.any() else float("nan")
    return miou, [float(v) for v in iou]


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    """How many rows have their label among the k highest logits."""
    k = min(k, logits.shape[1])
    return int((logits.topk(k, dim=1).indices == labels[:, None]).any(1).sum())



def chance_top1(labels: torch.Tensor, num_classes: int) -> float:
    """Top-1 of always answering the most frequent class: its share of the test set."""
    return float(torch.bincount(labels.long(), minlength=num_classes).max()) / max(len(labels), 1)


def chance_miou(pixels: torch.Tensor) -> float:
    """mIoU of predicting the class with the most ground-truth pixels everywhere (the best constant
    prediction): the confusion matrix of that prediction, through ``iou_from_confusion``. ``pixels``: the
    count of ground-truth pixels per class (ignored pixels excluded)."""
    cm = torch.zeros(len(pixels), len(pixels), dtype=torch.long)
    cm[:, int(pixels.argmax())] = pixels.long()
    return iou_from_confusion(cm)[0]
