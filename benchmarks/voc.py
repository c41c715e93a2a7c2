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

from clbench import ClbenchError

from .images import IMAGENET, Normalization, Restrictable, list_images, read_image, resize_transform, train_transform
from .layouts import voc_split_dirs

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


def voc_palette() -> np.ndarray:
    """VOC's 256 palette colours (256, 3): class k's colour from the bits of k (VOC devkit's ``labelcolormap``);
    255, the 'void' border, is cream (224, 224, 192)."""
    k = np.arange(256)
    colours = np.zeros((256, 3), dtype=np.int64)
    for shift in range(8):
        for channel in range(3):
            colours[:, channel] |= ((k >> channel) & 1) << (7 - shift)
        k = k >> 3
    return colours.astype(np.uint8)


def colours_to_indices(rgb: np.ndarray, num_classes: int) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """An (H, W, 3) colour mask as class indices through VOC's palette (classes 0..num_classes-1 and 255); the
    second value lists the colours that are none of those (then the indices are meaningless)."""
    palette = voc_palette()
    allowed = [*range(num_classes), 255]
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    table = {int(c[0]) << 16 | int(c[1]) << 8 | int(c[2]): i for i, c in ((i, palette[i]) for i in allowed)}
    found, inverse = np.unique(codes, return_inverse=True)
    unknown = [((int(c) >> 16) & 255, (int(c) >> 8) & 255, int(c) & 255) for c in found if int(c) not in table]
    indices = np.array([table.get(int(c), 0) for c in found], dtype=np.uint8)[inverse].reshape(codes.shape)
    return indices, unknown


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


class VocSegmentation(Restrictable, Dataset):
    """Items: (image, mask). Training masks are resized (nearest) to the input; evaluation masks stay
    at the original resolution so mIoU is computed there."""

    ITEM_LISTS = ("images", "masks")
    label_table: np.ndarray | None = None   # a class-incremental step's (256,) lookup table (clbench.incremental)

    def __init__(self, task_root: Path, split: str, *, image_size: int, classes: tuple[str, ...], train: bool,
                 augment: bool = False, normalization: Normalization = IMAGENET) -> None:
        self.normalization = normalization
        images_dir, masks_dir = voc_split_dirs(task_root, split)
        self.classes = classes
        self.train = train
        self.images = list_images(images_dir)
        if not self.images:
            raise ClbenchError(f"{images_dir}: empty split, no images")
        self.masks = [masks_dir / f"{p.stem}.png" for p in self.images]
        self.transform = train_transform(image_size, normalization=normalization) if augment and train else \
            resize_transform(image_size, normalization)

    def __len__(self) -> int:
        return len(self.images)

    def present_labels(self) -> list[set[int]]:
        """The label values (background and 255 included) each item's mask holds, as stored on disk."""
        return [set(np.unique(np.array(Image.open(path))).tolist()) for path in self.masks]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        image = read_image(self.images[index])
        array = read_mask(self.masks[index], len(self.classes), (image.height, image.width))
        mask = torch.from_numpy(array if self.label_table is None else self.label_table[array])
        if not self.train:
            return self.transform(image), mask  # the plain resize: evaluation is never augmented
        x, resized = self.transform(image, tv_tensors.Mask(mask))
        return x, resized.as_subclass(torch.Tensor)
