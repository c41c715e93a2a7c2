"""The training augmentation applied to a whole batch on its device (the in-memory data path).

The same augmentation as the per-image path (``clbench.benchmarks.images.train_transform``): a random resized
crop (area 0.5-1 of the image, aspect ratio 3/4-4/3, drawn as torchvision's RandomResizedCrop draws it), a
horizontal flip with probability 1/2, colour jitter (brightness, contrast, saturation factors in 0.8-1.2), boxes
and masks following every geometric step, boxes cropped below 2 px dropped with their labels. Every image gets
its own draw. What differs, by design: the crop is cut from the image already resized to the input side (the
per-image path cuts it from the original), so it is upsampled by at most 1/sqrt(0.5) = 1.41; crop and flip are
one bilinear resampling (``grid_sample``) of the whole batch; the jitter's three steps run in one random order
per batch (torchvision draws an order per image). Draws come from torch's global generator (seeded by the run,
saved in every checkpoint), so a seed gives the same augmentation on every rerun on the same device.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

SCALE = (0.5, 1.0)
RATIO = (3 / 4, 4 / 3)
JITTER = 0.2
MIN_BOX = 2.0
TRIES = 10


def crop_params(batch: int, side: int) -> torch.Tensor:
    """(batch, 4) crops (top, left, height, width) in pixels of a side x side image, as RandomResizedCrop draws
    them: up to 10 tries of area x ratio whose crop fits, then a random position; the whole image if none fits."""
    area = side * side * torch.empty(batch, TRIES).uniform_(*SCALE)
    ratio = torch.exp(torch.empty(batch, TRIES).uniform_(math.log(RATIO[0]), math.log(RATIO[1])))
    w = torch.sqrt(area * ratio).round()
    h = torch.sqrt(area / ratio).round()
    fits = (w > 0) & (w <= side) & (h > 0) & (h <= side)
    first = fits.float().argmax(1, keepdim=True)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    none = ~fits.any(1)
    w[none], h[none] = side, side
    top = (torch.rand(batch) * (side - h + 1)).floor()
    left = (torch.rand(batch) * (side - w + 1)).floor()
    return torch.stack((top, left, h, w), 1)


def crop_flip_grid(crops: torch.Tensor, flips: torch.Tensor, side: int, device: torch.device) -> torch.Tensor:
    """The sampling grid (align_corners=False) that resizes each crop to side x side, mirrored where ``flips``."""
    top, left, h, w = crops.unbind(1)
    sign = 1.0 - 2.0 * flips.float()
    theta = torch.zeros(len(crops), 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = sign * w / side, (2 * left + w) / side - 1
    theta[:, 1, 1], theta[:, 1, 2] = h / side, (2 * top + h) / side - 1
    return F.affine_grid(theta.to(device), [len(crops), 1, side, side], align_corners=False)


def crop_flip_boxes(boxes: torch.Tensor, labels: torch.Tensor, crop: torch.Tensor, flip: bool,
                    side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """xyxy boxes of one image through its crop (resized to side) and flip, clamped to the image; boxes
    narrower or lower than 2 px afterwards are dropped with their labels (ClampBoundingBoxes +
    SanitizeBoundingBoxes(min_size=2))."""
    top, left, h, w = crop.tolist()
    scale = boxes.new_tensor([side / w, side / h, side / w, side / h])
    out = (boxes - boxes.new_tensor([left, top, left, top])) * scale
    if flip:
        out = torch.stack((side - out[:, 2], out[:, 1], side - out[:, 0], out[:, 3]), 1)
    out = out.clamp(0, side)
    keep = ((out[:, 2] - out[:, 0]) >= MIN_BOX) & ((out[:, 3] - out[:, 1]) >= MIN_BOX)
    return out[keep], labels[keep]


def jitter(images: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation with a factor in [1 - 0.2, 1 + 0.2] per image, in one random order;
    images in [0, 1], (B, 3, H, W)."""
    factors = torch.empty(3, len(images), 1, 1, 1).uniform_(1 - JITTER, 1 + JITTER).to(images.device)
    for step in torch.randperm(3).tolist():
        f = factors[step]
        if step == 0:
            images = images * f
        elif step == 1:
            mean = TF.rgb_to_grayscale(images).mean((1, 2, 3), keepdim=True)
            images = f * images + (1 - f) * mean
        else:
            images = f * images + (1 - f) * TF.rgb_to_grayscale(images)
        images = images.clamp(0, 1)
    return images


def augment_batch(images: torch.Tensor, targets: Any, kind: str) -> tuple[torch.Tensor, Any]:
    """Augment a batch: ``images`` float in [0, 1], (B, 3, S, S) on any device; ``targets`` as the task's
    collate makes them (seg: (B, S, S) masks; det: a list of dicts with xyxy ``boxes`` and ``labels``; cls:
    labels, unchanged). Returns the augmented images and targets."""
    batch, side = len(images), images.shape[-1]
    crops, flips = crop_params(batch, side), torch.rand(batch) < 0.5
    grid = crop_flip_grid(crops, flips, side, images.device).to(images.dtype)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if kind == "seg":
        masks = F.grid_sample(targets[:, None].float(), grid, mode="nearest", padding_mode="border",
                              align_corners=False)
        targets = masks[:, 0].round().to(targets.dtype)
    elif kind == "det":
        moved = []
        for target, crop, flip in zip(targets, crops, flips.tolist()):
            boxes, labels = crop_flip_boxes(target["boxes"], target["labels"], crop, flip, side)
            moved.append({**target, "boxes": boxes, "labels": labels})
        targets = moved
    return jitter(images), targets
