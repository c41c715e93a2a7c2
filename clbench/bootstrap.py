"""Bootstrap intervals over test images: how far a metric moves when the test set is drawn again.

Each resample draws the test set's N images with replacement (``resample_counts``: how often each image is drawn);
the metric is re-accumulated from per-image pieces, never recomputed from predictions:

- top-1: the images' hits (1 or 0), averaged with the counts as weights;
- mIoU: the images' confusion matrices, summed with the counts as weights, then ``iou_from_confusion``'s rule;
- mAP@[.5:.95]: COCO's per-image evaluation (pycocotools ``COCOeval.evaluate``: per category and image, the
  matched, ignored and scored detections, area "all", 100 detections) re-accumulated as ``COCOeval.accumulate``
  does, with an image drawn k times contributing its detections and ground truth k times. With every count 1
  this is COCO's own mAP (tested against faster-coco-eval's).

The same counts (one seed, one N) serve every stage of a run and every strategy on the same test set, so a drop's
interval is *paired*: the drop computed resample by resample.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

LEVEL = 0.95
REC_THRESHOLDS = np.linspace(0.0, 1.00, 101)   # COCO's 101 recall points
MAX_DETS = 100


@dataclass(frozen=True)
class Bootstrap:
    """How intervals are drawn: ``resamples`` draws of the test images, from ``seed``."""

    resamples: int
    seed: int = 0
    images: tuple[tuple[int, ...], int] | None = None   # a subset: (positions in the whole set, its size)

    def counts(self, n: int) -> np.ndarray:
        """(resamples, n) draws of n images; for a subset, the whole set's draws at the subset's positions, so an
        image is drawn equally often in every view of the set that holds it (drops stay paired when the images
        evaluated change between stages, as a class-incremental task's do)."""
        if self.images is None:
            return resample_counts(n, self.resamples, self.seed)
        positions, total = self.images
        if len(positions) != n:
            raise ValueError(f"bootstrap: {n} images evaluated, but the subset has {len(positions)}")
        return resample_counts(total, self.resamples, self.seed)[:, list(positions)]

    def subset(self, positions: Sequence[int], total: int) -> "Bootstrap":
        """The same draws restricted to the images at ``positions`` of a set of ``total``."""
        return dataclasses.replace(self, images=(tuple(int(p) for p in positions), int(total)))

    def to_dict(self) -> dict[str, Any]:
        return {"resamples": self.resamples, "seed": self.seed, "level": LEVEL,
                "method": "percentile interval; test images drawn with replacement, metrics re-accumulated from "
                          "per-image hits, confusion matrices and COCO per-image evaluations; drops paired"}


def resample_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) how often each of n images is drawn in each resample (each row sums to n)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))
    counts = np.zeros((resamples, n), dtype=np.int64)
    np.add.at(counts, (np.arange(resamples)[:, None], draws), 1)
    return counts


def interval(values: np.ndarray) -> tuple[float, float]:
    """The percentile interval at ``LEVEL`` (NaN resamples left out; (nan, nan) when all are)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if not values.size:
        return float("nan"), float("nan")
    low, high = np.percentile(values, [50 * (1 - LEVEL), 100 - 50 * (1 - LEVEL)])
    return float(low), float(high)


def top1(hits: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per resample: the weighted share of hits (NaN where a resample draws none of the images)."""
    drawn = counts.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(drawn > 0, counts @ np.asarray(hits, dtype=np.float64) / np.where(drawn > 0, drawn, 1),
                        np.nan)


def miou(confusions: np.ndarray, counts: np.ndarray, members: Sequence[int] | None = None) -> np.ndarray:
    """Per resample: mIoU of the summed (N, C, C) per-image confusion matrices (a class absent from ground truth
    and prediction left out, as ``clbench.metrics.iou_from_confusion``); over the classes ``members`` only when
    given (a class group's mIoU)."""
    total = np.einsum("bn,ncd->bcd", counts.astype(np.float64), np.asarray(confusions, dtype=np.float64))
    inter = np.diagonal(total, axis1=1, axis2=2)
    union = total.sum(1) + total.sum(2) - inter
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # a resample with no class present: NaN, left out
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1), np.nan)
        return np.nanmean(iou if members is None else iou[:, list(members)], axis=1)


@dataclass(frozen=True)
class CocoPieces:
    """Per category, COCO's per-image evaluation flattened: every detection (top 100 per image, by score) with its
    image, match per IoU threshold and ignore flag, and per image the count of ground truth not ignored."""

    categories: list[dict[str, np.ndarray]]
    category_ids: tuple[int, ...] = ()   # the category id of each entry of ``categories``

    @classmethod
    def evaluate(cls, gt: dict[str, Any], detections: list[dict[str, Any]]) -> "CocoPieces":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
        image_ids = sorted(img["id"] for img in gt["images"])
        position = {image_id: i for i, image_id in enumerate(image_ids)}
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO()
            coco_gt.dataset = gt
            coco_gt.createIndex()
            evaluator = COCOeval(coco_gt, coco_gt.loadRes(detections) if detections else COCO(), iouType="bbox")
            evaluator.params.imgIds = image_ids
            if detections:
                evaluator.evaluate()
        n_images, n_areas = len(image_ids), len(evaluator.params.areaRng)
        evaluations = evaluator.evalImgs if detections else [None] * (len(evaluator.params.catIds) * n_areas * n_images)
        categories = [_category([evaluations[k * n_areas * n_images + i] for i in range(n_images)], position,
                                len(evaluator.params.iouThrs),
                                [_positives_without_detections(gt, category, i) for i in image_ids] if not detections
                                else None)
                      for k, category in enumerate(evaluator.params.catIds)]
        return cls(categories, tuple(int(c) for c in evaluator.params.catIds))

    def map(self, counts: np.ndarray, chunk: int = 64, category_ids: Sequence[int] | None = None) -> np.ndarray:
        """Per resample (a row of ``counts``): mAP@[.5:.95], COCO's accumulate + summarize on the drawn images;
        over the categories ``category_ids`` only when given (a class group's mAP). Vectorised over resamples,
        ``chunk`` at a time."""
        counts = np.asarray(counts, dtype=np.float64)
        total, seen = np.zeros(len(counts)), np.zeros(len(counts))
        chosen = None if category_ids is None else set(category_ids)
        for category_id, category in zip(self.category_ids, self.categories):
            if chosen is not None and category_id not in chosen:
                continue
            for start in range(0, len(counts), chunk):
                part = counts[start:start + chunk]
                sums, present = self._precision_sums(category, part)
                total[start:start + chunk] += sums
                seen[start:start + chunk] += present
        with np.errstate(invalid="ignore"):
            return np.where(seen > 0, total / np.where(seen > 0, seen, 1), np.nan)

    @staticmethod
    def _precision_sums(category: dict[str, np.ndarray], weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For (B, N) image weights: the sum of the category's (T x 101) interpolated precision per resample and
        how many entries it holds (0 where the drawn images hold none of its ground truth: COCO's -1, left out).

        An image drawn k times weighs its detections by k: the cumulative true and false positives at the end of
        each detection's run of k copies are those of COCO's accumulate on the copies, and the points inside a
        run never decide an interpolated precision (inside a true run precision rises, so the run's end bounds
        it; inside a false run recall stands still after a point that bounds it), so the result is COCO's."""
        positives = weights @ category["positives"]                                # (B,)
        thresholds = category["matched"].shape[0]
        present = np.where(positives > 0, thresholds * len(REC_THRESHOLDS), 0)
        if not category["image"].size:
            return np.zeros(len(weights)), present
        w = weights[:, category["image"]][:, None, :]                              # (B, 1, D)
        kept = ~category["ignored"][None]
        tp = np.cumsum(w * (category["matched"][None] & kept), axis=2)             # (B, T, D)
        fp = np.cumsum(w * (~category["matched"][None] & kept), axis=2)
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = tp / np.where(positives > 0, positives, 1)[:, None, None]
        precision = tp / (fp + tp + np.spacing(1))
        precision = np.maximum.accumulate(precision[..., ::-1], axis=2)[..., ::-1]
        rows = recall.reshape(-1, recall.shape[2])                                 # (B*T, D), each non-decreasing
        # the first position whose recall reaches threshold j = how many positions reach fewer than j + 1
        # thresholds: per row, a histogram of "thresholds <= recall" (exact float comparisons, as COCO's
        # searchsorted makes them), summed up
        reached = np.searchsorted(REC_THRESHOLDS, rows, side="right")             # (B*T, D) in 0..101
        bins = len(REC_THRESHOLDS) + 1
        flat = (np.arange(len(rows))[:, None] * bins + reached).ravel()
        position = np.cumsum(np.bincount(flat, minlength=len(rows) * bins).reshape(len(rows), bins), axis=1)[:, :-1]
        valid = position < rows.shape[1]
        values = np.take_along_axis(precision.reshape(len(rows), -1), np.minimum(position, rows.shape[1] - 1), axis=1)
        sums = np.where(valid, values, 0.0).reshape(len(weights), -1).sum(1)
        return np.where(positives > 0, sums, 0.0), present


def _category(evaluations: list[dict[str, Any] | None], position: dict[int, int], thresholds: int,
              positives_without: list[int] | None) -> dict[str, np.ndarray]:
    """One category's per-image evaluations (area "all"; None where an image has neither ground truth nor
    detections of it) flattened in score order, cut after its last true positive: after it precision only falls,
    so those detections never decide an interpolated precision."""
    image, scores, matched, ignored = [], [], [], []
    positives = np.asarray(positives_without if positives_without is not None else [0] * len(evaluations),
                           dtype=np.int64)
    for i, e in enumerate(evaluations):
        if e is None:
            continue
        image += [position[e["image_id"]]] * len(e["dtScores"][:MAX_DETS])
        scores.append(np.asarray(e["dtScores"][:MAX_DETS]))
        matched.append(np.asarray(e["dtMatches"])[:, :MAX_DETS] != 0)
        ignored.append(np.asarray(e["dtIgnore"])[:, :MAX_DETS].astype(bool))
        positives[i] = int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0))
    score = np.concatenate(scores) if scores else np.zeros(0)
    hit = np.concatenate(matched, 1) if matched else np.zeros((thresholds, 0), bool)
    skip = np.concatenate(ignored, 1) if ignored else np.zeros((thresholds, 0), bool)
    order = np.argsort(-score, kind="mergesort")
    hits = (hit & ~skip)[:, order].any(0)
    order = order[: int(np.flatnonzero(hits)[-1]) + 1] if hits.any() else order[:0]
    return {"image": np.asarray(image, dtype=np.int64)[order], "matched": hit[:, order], "ignored": skip[:, order],
            "positives": positives}


def _positives_without_detections(gt: dict[str, Any], category_id: int, image_id: int) -> int:
    return sum(1 for a in gt["annotations"] if a["image_id"] == image_id and a["category_id"] == category_id
               and not a.get("iscrowd", 0))


def resampled_metric(kind: str, pieces: Any, counts: np.ndarray, members: Sequence[int] | None = None) -> np.ndarray:
    """The primary metric of a task kind per resample, from its per-image pieces (``(hits, labels)``, confusion
    matrices, or ``CocoPieces``); with ``members``, over those classes only (top-1: on the images of those classes;
    mIoU: the mean IoU of those classes; mAP: the mean AP of those categories, given as category ids)."""
    if kind == "cls":
        hits, labels = pieces
        if members is None:
            return top1(hits, counts)
        chosen = np.isin(labels, list(members))
        return top1(np.asarray(hits)[chosen], counts[:, chosen])
    if kind == "seg":
        return miou(pieces, counts, members)
    return pieces.map(counts, category_ids=members)


def stack_confusions(confusions: list[torch.Tensor]) -> np.ndarray:
    return torch.stack(confusions).numpy() if confusions else np.zeros((0, 0, 0))
