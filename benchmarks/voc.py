"""Segmentation data, VOC style: ``<split>/JPEGImages/*.jpg`` + ``<split>/SegmentationClass/*.png``.

Masks are palette (or single-channel) PNGs read as class indices, never through RGB; 255 = ignore.
The class list is ``labels.txt`` beside the splits (one name a line, index = line) or VOC's 21.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .images import list_images, read_image, resize_transform, train_transform
from clbench import ClbenchError

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


def read_class_list(task_root: Path) -> tuple[str, ...]:
    labels = task_root / "labels.txt"
    if not labels.exists():
        return VOC_CLASSES
    names = tuple(line.strip() for line in labels.read_text().splitlines() if line.strip())
    if len(names) < 2:
        raise ClbenchError(f"{labels}: expected at least 2 class names (background first), got {len(names)}")
    return names


def read_mask(path: Path, num_classes: int, image_size: tuple[int, int]) -> np.ndarray:
    """A (H, W) uint8 class-index mask; RGB masks, wrong sizes and unknown values are errors."""
    try:
        with Image.open(path) as mask:
            if mask.mode not in ("P", "L"):
                raise ClbenchError(f"{path}: mask mode {mask.mode}: expected a palette (P) or single-channel PNG "
                                   "of class indices, not colours")
            array = np.array(mask)
    except FileNotFoundError:
        raise ClbenchError(f"{path}: mask file not found") from None
    if array.shape != image_size:
        raise ClbenchError(f"{path}: mask is {array.shape[1]}x{array.shape[0]}, its image is "
                           f"{image_size[1]}x{image_size[0]}")
    bad = np.setdiff1d(np.unique(array), np.r_[np.arange(num_classes), 255])
    if bad.size:
        raise ClbenchError(f"{path}: mask values {bad.tolist()} outside 0..{num_classes - 1} and 255")
    return array


def voc_split_dirs(task_root: Path, split: str) -> tuple[Path, Path]:
    """(images, masks) folders of a split: ``JPEGImages/`` or ``images/``, ``SegmentationClass/`` or ``masks/``."""
    base = Path(task_root) / split
    images = next((base / n for n in ("JPEGImages", "images") if (base / n).is_dir()), base / "JPEGImages")
    masks = next((base / n for n in ("SegmentationClass", "masks") if (base / n).is_dir()), base / "SegmentationClass")
    return images, masks


class VocSegmentation(Dataset):
    """Items: (image, mask). Training masks are resized (nearest) to the input; evaluation masks stay
    at the original resolution so mIoU is computed there."""

    def __init__(self, task_root: Path, split: str, *, image_size: int, classes: tuple[str, ...], train: bool,
                 augment: bool = False) -> None:
        images_dir, masks_dir = voc_split_dirs(task_root, split)
        self.classes = classes
        self.train = train
        self.images = list_images(images_dir)
        if not self.images:
            raise ClbenchError(f"{images_dir}: empty split, no images")
        self.masks = [masks_dir / f"{p.stem}.png" for p in self.images]
        self.transform = train_transform(image_size) if augment and train else resize_transform(image_size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        image = read_image(self.images[index])
        mask = torch.from_numpy(read_mask(self.masks[index], len(self.classes), (image.height, image.width)))
        if not self.train:
            return self.transform(image), mask  # the plain resize: evaluation is never augmented
        x, resized = self.transform(image, tv_tensors.Mask(mask))
        return x, resized.as_subclass(torch.Tensor)
