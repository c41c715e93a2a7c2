"""Evaluate one task's test set: predictions in original image coordinates, then clbench.metrics."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from clbench.bootstrap import Bootstrap, CocoPieces, resampled_metric, stack_confusions
from clbench.decode import boxes_to_original, decode_detections, seg_labels
from clbench.freezing import swapped_state
from clbench.incremental import grouped, restrict_logits
from clbench.metrics import chance_miou, chance_top1, coco_evaluation, confusion_matrix, iou_from_confusion, topk_correct
from clbench.tasks import TaskSpec

# Test-set batch size: on 2 CPU threads at 128 px, 16 images per forward were the fastest per image (3.7 ms vs
# 4.3 at 32 and 6.1 at 60: larger batches fall out of cache). Each image is evaluated independently (BN in eval
# mode); only float rounding depends on the batch size.
EVAL_BATCH = 16


@dataclass
class TaskEval:
    """One task's evaluation: metric → (value, n evaluated); per-class values; detections (COCO results)."""

    metrics: dict[str, tuple[float, int]]
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)   # metric → class name → value
    detections: list[dict[str, Any]] | None = None
    pieces: Any = None                   # per-image pieces of the primary metric (``clbench.bootstrap``)
    resampled: dict[str, np.ndarray] | None = None  # metric -> its values per bootstrap resample (with a
    #                                                  ``Bootstrap``): the primary metric and its class groups


@torch.inference_mode()
def evaluate_task(model: nn.Module, task: TaskSpec, batches: Iterable, device: torch.device,
                  coco_gt: dict[str, Any] | None = None, state: dict[str, torch.Tensor] | None = None,
                  bootstrap: Bootstrap | None = None, classes: tuple[int, ...] | None = None,
                  groups: dict[str, tuple[tuple[int, ...], int]] | None = None) -> TaskEval:
    """Primary and secondary metrics of ``task``, served with ``state`` (a strategy's ``evaluation_state``)
    loaded into the model for the duration; the model is left in eval mode. With ``bootstrap``, the primary metric
    and each class group's per resample of the images too (``TaskEval.resampled``). A class-incremental task
    (DESIGN.md §8): ``classes`` the classes seen so far (the others never predicted), ``groups`` name -> (classes,
    n images holding one): the primary metric over each group's classes too, as ``metric[name]``."""
    model.eval()
    with swapped_state(model, state):
        result = _evaluate(model, task, batches, device, coco_gt, classes)
    for members, support in (groups or {}).values():
        result.metrics[grouped(task.metric, members)] = (group_value(task, result, members), support)
    if bootstrap is not None and bootstrap.resamples:
        pieces = CocoPieces.evaluate(coco_gt, result.detections or []) if task.kind == "det" else result.pieces
        counts = bootstrap.counts(result.metrics[task.metric][1])
        result.resampled = {task.metric: resampled_metric(task.kind, pieces, counts)}
        for members, _ in (groups or {}).values():
            chosen = [task.category_ids[c] for c in members] if task.kind == "det" else members
            result.resampled[grouped(task.metric, members)] = resampled_metric(task.kind, pieces, counts, chosen)
    result.pieces = None
    return result


def _evaluate(model: nn.Module, task: TaskSpec, batches: Iterable, device: torch.device,
              coco_gt: dict[str, Any] | None, classes: tuple[int, ...] | None) -> TaskEval:
    def outputs(images: torch.Tensor) -> torch.Tensor:
        return restrict_logits(model(images.to(device, non_blocking=True))[task.name].float(), task.kind, classes)
    if task.kind == "det":
        return _evaluate_det(model, task, batches, outputs, coco_gt)
    if task.kind == "seg":
        return _evaluate_seg(task, batches, outputs)
    return _evaluate_cls(task, batches, outputs)


def group_value(task: TaskSpec, result: TaskEval, members: tuple[int, ...]) -> float:
    """The primary metric over some classes only: the mean IoU or AP of those evaluated (NaN: none), top-1 on the
    images of those classes."""
    if task.kind == "cls":
        hits, labels = result.pieces
        chosen = np.isin(labels, members)
        return float(hits[chosen].mean()) if chosen.any() else float("nan")
    per_class = result.per_class["IoU" if task.kind == "seg" else "AP"]
    values = [per_class[task.classes[c]] for c in members if not math.isnan(per_class[task.classes[c]])]
    return float(np.mean(values)) if values else float("nan")


def detections_to_coco(task: TaskSpec, detections: list[dict[str, torch.Tensor]], targets: list[dict[str, Any]],
                       input_hw: tuple[int, int]) -> list[dict[str, Any]]:
    """COCO results entries: original image ids, original category ids, xywh in original pixels, plain floats."""
    results = []
    for det, target in zip(detections, targets):
        boxes = boxes_to_original(det["boxes"].float().cpu(), input_hw, target["orig_size"])
        for box, score, label in zip(boxes.tolist(), det["scores"].tolist(), det["labels"].tolist()):
            results.append({"image_id": int(target["image_id"]), "category_id": int(task.category_ids[label]),
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": float(score)})
    return results


def _evaluate_det(model: nn.Module, task: TaskSpec, batches: Iterable, outputs: Callable,
                  coco_gt: dict[str, Any] | None) -> TaskEval:
    if coco_gt is None:
        raise ValueError("detection evaluation needs the COCO ground truth")
    results, n = [], 0
    for images, targets, _ in batches:
        raw = outputs(images)
        input_hw = tuple(images.shape[-2:])
        anchors_px = model.anchors * raw.new_tensor([input_hw[1], input_hw[0]])
        results += detections_to_coco(task, decode_detections(raw, anchors_px, model.head_stride), targets, input_hw)
        n += len(targets)
    stats, per_category = coco_evaluation(coco_gt, results)
    names = dict(zip(task.category_ids, task.classes))
    per_class = {name: per_category.get(c, float("nan")) for c, name in names.items()}
    return TaskEval({name: (value, n) for name, value in stats.items()}, {"AP": per_class}, results)


def _evaluate_seg(task: TaskSpec, batches: Iterable, outputs: Callable) -> TaskEval:
    cm = torch.zeros(task.num_classes, task.num_classes, dtype=torch.long)
    per_image = []
    for images, masks, _ in batches:
        logits = outputs(images)
        for image_logits, mask in zip(logits, masks):
            pred = seg_labels(image_logits, tuple(mask.shape)).cpu()
            per_image.append(confusion_matrix(pred, mask, task.num_classes))
            cm += per_image[-1]
    n = len(per_image)
    miou, per_class = iou_from_confusion(cm)
    pixel_acc = float(cm.diag().sum() / cm.sum().clamp(min=1))
    return TaskEval({"mIoU": (miou, n), "pixel_acc": (pixel_acc, n)}, {"IoU": dict(zip(task.classes, per_class))},
                    pieces=stack_confusions(per_image))


def _evaluate_cls(task: TaskSpec, batches: Iterable, outputs: Callable) -> TaskEval:
    top1 = top5 = n = 0
    hits, seen = [], []
    for images, labels, _ in batches:
        logits = outputs(images).cpu()
        hits += (logits.topk(1, dim=1).indices[:, 0] == labels).tolist()
        seen += labels.tolist()
        top1 += topk_correct(logits, labels, 1)
        top5 += topk_correct(logits, labels, 5)
        n += len(labels)
    return TaskEval({"top1": (top1 / n, n), "top5": (top5 / n, n)},
                    pieces=(np.asarray(hits, dtype=np.float64), np.asarray(seen, dtype=np.int64)))


def chance_level(task: TaskSpec, dataset: Any) -> float:
    """The primary metric a network that learned nothing would get on this test set: top-1 of the most
    frequent class, mIoU of predicting the most frequent class everywhere, mAP of no detection (0)."""
    if task.kind == "det":
        return 0.0
    if task.kind == "cls":
        return chance_top1(torch.tensor([int(dataset[i][1]) for i in range(len(dataset))]), task.num_classes)
    pixels = torch.zeros(task.num_classes, dtype=torch.long)
    for i in range(len(dataset)):
        mask = dataset[i][1]
        pixels += torch.bincount(mask[mask != 255].long().flatten(), minlength=task.num_classes)
    return chance_miou(pixels)
