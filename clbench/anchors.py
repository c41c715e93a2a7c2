"""Detection anchors: the fixed defaults, given ones, or fitted to the training boxes (``--anchors kmeans``).

Anchors are (w, h) fractions of the input side, so they scale with ``--image-size``. The fit is YOLOv2's k-means
on box shapes with 1 − IoU as the distance (boxes and centroids aligned at one corner, so only w and h count):
deterministic (centroids start at the area quantiles of the boxes), each centroid the median of its boxes (the
median, as a robust choice on small sets: a handful of huge boxes does not drag a centroid), iterated until the
assignment no longer changes. The fitted anchors are saved in the checkpoint's ``model_config`` (and in
``config.yaml`` as values), so ``clbench eval`` rebuilds the same network.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from clbench import ClbenchError

DEFAULT_ANCHORS: tuple[tuple[float, float], ...] = ((0.08, 0.10), (0.22, 0.28), (0.50, 0.50))
KMEANS = "kmeans"
MAX_ITERATIONS = 300
Anchors = tuple[tuple[float, float], ...]


def parse_anchors(value: Any) -> str:
    """``default``, ``kmeans``, or anchors as ``W,H;W,H;...`` fractions of the input side in (0, 1] (a YAML list of
    pairs too); returned as that text (``format_anchors``)."""
    if isinstance(value, (list, tuple)):
        return format_anchors(_pairs([tuple(pair) for pair in value]))
    text = str(value).strip().lower()
    if text in ("default", KMEANS):
        return text
    try:
        pairs = [tuple(float(v) for v in part.split(",")) for part in text.split(";") if part.strip()]
    except ValueError:
        raise ValueError("expected default, kmeans or W,H;W,H;... (fractions of the input side)") from None
    return format_anchors(_pairs(pairs))


def _pairs(pairs: list[tuple]) -> Anchors:
    if not pairs or any(len(p) != 2 or not all(0 < float(v) <= 1 for v in p) for p in pairs):
        raise ValueError("expected default, kmeans or W,H;W,H;... with every W and H in (0, 1]")
    return tuple((float(w), float(h)) for w, h in pairs)


def format_anchors(anchors: Sequence[tuple[float, float]]) -> str:
    return ";".join(f"{w:.6g},{h:.6g}" for w, h in anchors)


def given_anchors(setting: str) -> Anchors:
    """The anchors a parsed setting names (``kmeans`` must be fitted first: ``fit_anchors``)."""
    if setting == "default":
        return DEFAULT_ANCHORS
    if setting == KMEANS:
        raise ClbenchError("anchors: kmeans must be fitted to the training boxes before the network is built")
    return tuple(tuple(float(v) for v in part.split(",")) for part in setting.split(";"))  # type: ignore[misc]


def shape_iou(boxes: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """IoU of (N, 2) and (K, 2) box shapes aligned at one corner: (N, K)."""
    inter = torch.minimum(boxes[:, None], centroids[None]).prod(-1)
    return inter / (boxes.prod(-1)[:, None] + centroids.prod(-1)[None] - inter)


def fit_anchors(sizes: torch.Tensor, k: int = len(DEFAULT_ANCHORS)) -> Anchors:
    """k anchors fitted to (N, 2) box (w, h) fractions (see the module's docstring), sorted by area."""
    sizes = sizes.double()
    if len(sizes) < k:
        raise ClbenchError(f"anchors: kmeans needs at least {k} training boxes, the detection tasks have {len(sizes)}")
    order = sizes.prod(1).argsort()
    centroids = sizes[order[((torch.arange(k, dtype=torch.float64) + 0.5) / k * len(sizes)).long()]].clone()
    assignment = None
    for _ in range(MAX_ITERATIONS):
        new = shape_iou(sizes, centroids).argmax(1)
        if assignment is not None and torch.equal(new, assignment):
            break
        assignment = new
        for j in range(k):
            members = sizes[assignment == j]
            if len(members):
                centroids[j] = members.median(0).values
    centroids = centroids[centroids.prod(1).argsort()]
    return tuple((round(float(w), 6), round(float(h), 6)) for w, h in centroids)


def mean_best_iou(sizes: torch.Tensor, anchors: Sequence[tuple[float, float]]) -> float:
    """The mean over boxes of their best anchor's shape IoU: how well anchors fit boxes (env.json records it)."""
    return float(shape_iou(sizes.double(), torch.tensor(anchors, dtype=torch.float64)).amax(1).mean())
