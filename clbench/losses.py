"""Task losses. Detection: YOLO-style assignment, balanced objectness BCE, GIoU box loss, class CE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, generalized_box_iou_loss

from clbench.decode import decode_boxes

DET_WEIGHTS = {"box": 2.0, "obj": 1.0, "cls": 1.0}


def assign_targets(targets: list[dict[str, torch.Tensor]], anchors_px: torch.Tensor, stride: int,
                   grid: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Each box goes to the cell holding its centre and the anchor whose shape best matches it (wh-IoU).

    Returns (image index, anchor index, gy, gx, box xyxy, label) for every assigned box.
    """
    rows = []
    for i, target in enumerate(targets):
        boxes = target["boxes"]
        if boxes.numel() == 0:
            continue
        cxcywh = box_convert(boxes, "xyxy", "cxcywh")
        wh = cxcywh[:, None, 2:]
        inter = torch.minimum(wh, anchors_px[None]).prod(-1)
        anchor = (inter / (wh.prod(-1) + anchors_px.prod(-1)[None] - inter)).argmax(1)
        gx = (cxcywh[:, 0] / stride).long().clamp(0, grid[1] - 1)
        gy = (cxcywh[:, 1] / stride).long().clamp(0, grid[0] - 1)
        rows.append((torch.full_like(anchor, i), anchor, gy, gx, boxes, target["labels"]))
    if not rows:
        empty = torch.zeros(0, dtype=torch.long, device=anchors_px.device)
        return empty, empty, empty, empty, torch.zeros(0, 4, device=anchors_px.device), empty
    return tuple(torch.cat(col) for col in zip(*rows))


def det_loss(raw: torch.Tensor, targets: list[dict[str, torch.Tensor]], anchors_px: torch.Tensor,
             stride: int) -> torch.Tensor:
    """raw (B, A, H, W, 5+C); targets: boxes xyxy in input pixels, labels 0..C-1."""
    b, a, h, w, _ = raw.shape
    img, anc, gy, gx, boxes, labels = assign_targets(targets, anchors_px, stride, (h, w))
    obj_target = torch.zeros(raw.shape[:4], device=raw.device, dtype=raw.dtype)
    obj_target[img, anc, gy, gx] = 1.0
    obj_bce = F.binary_cross_entropy_with_logits(raw[..., 4], obj_target, reduction="none")
    positive = obj_target.bool()
    # Balanced: positives are a handful among thousands of anchors; average each side separately.
    obj = obj_bce[~positive].mean() + (obj_bce[positive].mean() if positive.any() else obj_bce.new_zeros(()))
    if img.numel() == 0:
        return DET_WEIGHTS["obj"] * obj
    pred = raw[img, anc, gy, gx]
    pred_boxes = decode_boxes(raw, anchors_px, stride)[img, anc, gy, gx]
    box = generalized_box_iou_loss(pred_boxes, boxes, reduction="mean")
    cls = F.cross_entropy(pred[:, 5:], labels)
    return DET_WEIGHTS["box"] * box + DET_WEIGHTS["obj"] * obj + DET_WEIGHTS["cls"] * cls


def seg_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """logits (B, C, h, w) at head stride, masks (B, H, W) class indices with 255 = ignore."""
    if bool((masks == 255).all()):  # nothing to learn from; cross-entropy's mean would be 0/0
        return logits.sum() * 0.0
    return F.cross_entropy(upsample(logits, tuple(masks.shape[-2:])), masks.long(), ignore_index=255)


def upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling (align_corners=False). On CUDA under deterministic algorithms, as two matrix products
    with the interpolation weights: F.interpolate's bilinear backward on CUDA adds with atomics (no deterministic
    kernel), a matrix product's backward is another matrix product. Elsewhere F.interpolate itself."""
    if logits.is_cuda and torch.are_deterministic_algorithms_enabled():
        return upsample_by_matrices(logits, size)
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def upsample_by_matrices(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """F.interpolate(bilinear, align_corners=False) as rows · logits · colsᵀ (equal up to float rounding)."""
    rows, cols = (bilinear_weights(n_in, n_out, logits) for n_in, n_out in zip(logits.shape[-2:], size))
    return torch.einsum("Hh,bchw,Ww->bcHW", rows, logits, cols)


def bilinear_weights(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    """(n_out, n_in) weights of 1-D linear interpolation as F.interpolate computes it (align_corners=False):
    source = (i + 0.5) · n_in / n_out − 0.5, clamped at 0; the two neighbours weighted by distance."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    low = src.floor().long().clamp(max=n_in - 1)
    high = (low + 1).clamp(max=n_in - 1)
    frac = src - low
    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    weights.index_put_((torch.arange(n_out), low), 1 - frac, accumulate=True)
    weights.index_put_((torch.arange(n_out), high), frac, accumulate=True)
    return weights.to(device=like.device, dtype=like.dtype)


def cls_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)
