"""Task losses. Detection: YOLO-style assignment, balanced objectness BCE, GIoU box loss, class CE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, generalized_box_iou_loss

from clbench.decode import decode_boxes

DET_WEIGHTS = {"box": 2.0, "obj": 1.0, "cls": 1.0}


ASSIGNMENTS = ("centre", "yolov5")
ANCHOR_RATIO = 4.0   # yolov5: an anchor takes a box whose sides are within this factor of its own (YOLOv5's anchor_t)


def assign_targets(targets: list[dict[str, torch.Tensor]], anchors_px: torch.Tensor, stride: int,
                   grid: tuple[int, int], assign: str = "centre") -> tuple[torch.Tensor, ...]:
    """Which predictions learn which box. ``centre``: the cell holding the box's centre, with the anchor whose shape
    best matches it (wh-IoU): one prediction per box. ``yolov5`` (YOLOv5's build_targets): every anchor whose sides
    are within ``ANCHOR_RATIO`` of the box's (the best one when none is), in the centre's cell and in the two
    neighbouring cells nearest the centre (the decode reaches 0.5 cell beyond its own): up to 3 × A per box.

    Returns (image index, anchor index, gy, gx, box xyxy, label) for every assigned (box, prediction) pair.
    """
    rows = []
    for i, target in enumerate(targets):
        boxes = target["boxes"]
        if boxes.numel() == 0:
            continue
        cxcywh = box_convert(boxes, "xyxy", "cxcywh")
        wh = cxcywh[:, None, 2:]
        inter = torch.minimum(wh, anchors_px[None]).prod(-1)
        best = (inter / (wh.prod(-1) + anchors_px.prod(-1)[None] - inter)).argmax(1)
        centre = cxcywh[:, :2] / stride
        box_index, anchor = torch.arange(len(boxes), device=boxes.device), best
        if assign == "yolov5":
            ratio = torch.maximum(wh / anchors_px[None], anchors_px[None] / wh).amax(-1)   # (boxes, anchors)
            fits = (ratio < ANCHOR_RATIO) | F.one_hot(best, len(anchors_px)).bool()
            box_index, anchor = fits.nonzero(as_tuple=True)
        cells = candidate_cells(centre[box_index], neighbours=assign == "yolov5")
        limits = centre.new_tensor([grid[1] - 1, grid[0] - 1])
        for cell in cells:
            inside = ((cell >= 0) & (cell <= limits)).all(1) if len(cells) > 1 else torch.ones_like(box_index, dtype=torch.bool)
            cell = torch.minimum(cell.clamp(min=0), limits).long()
            b, a, c = box_index[inside], anchor[inside], cell[inside]
            rows.append((torch.full_like(a, i), a, c[:, 1], c[:, 0], boxes[b], target["labels"][b]))
    if not rows:
        empty = torch.zeros(0, dtype=torch.long, device=anchors_px.device)
        return empty, empty, empty, empty, torch.zeros(0, 4, device=anchors_px.device), empty
    return tuple(torch.cat(col) for col in zip(*rows))


def candidate_cells(centre: torch.Tensor, *, neighbours: bool) -> list[torch.Tensor]:
    """(x, y) grid cells that learn a box centred at ``centre`` (in cells): its own, and with ``neighbours`` the
    horizontal and the vertical neighbour nearest the centre."""
    own = centre.floor()
    cells = [own]
    if neighbours:
        for axis in (0, 1):
            cell = own.clone()
            cell[:, axis] += torch.where(centre[:, axis] - own[:, axis] < 0.5, -1.0, 1.0)
            cells.append(cell)
    return cells


def det_loss(raw: torch.Tensor, targets: list[dict[str, torch.Tensor]], anchors_px: torch.Tensor,
             stride: int, assign: str = "centre") -> torch.Tensor:
    """raw (B, A, H, W, 5+C); targets: boxes xyxy in input pixels, labels 0..C-1."""
    b, a, h, w, _ = raw.shape
    img, anc, gy, gx, boxes, labels = assign_targets(targets, anchors_px, stride, (h, w), assign)
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
