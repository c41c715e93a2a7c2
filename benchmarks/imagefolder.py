"""Classification data as ImageFolder: ``<split>/<class name>/<image>``; train and val share the classes."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from clbench import ClbenchError

from .images import (
    IMAGE_SUFFIXES,
    IMAGENET,
    Normalization,
    Restrictable,
    check_utf8_name,
    list_images,
    read_image,
    resize_transform,
    train_transform,
)


def class_folders(split_dir: Path) -> tuple[str, ...]:
    """The class names of an ImageFolder split: its sub-folders, each holding at least one image. A symlink
    loop, or a class folder without images, is an error (never a class with 0 images)."""
    if not split_dir.is_dir():
        raise ClbenchError(f"{split_dir}: folder not found")
    classes = []
    for entry in sorted(split_dir.iterdir()):
        check_utf8_name(entry)
        if entry.is_symlink() and not entry.exists():
            raise ClbenchError(f"{entry}: a broken symlink or a symlink loop, expected a class folder")
        if entry.is_dir():
            if entry.is_symlink() and split_dir.resolve() in (entry.resolve(), *entry.resolve().parents):
                raise ClbenchError(f"{entry}: a symlink loop (points to {entry.resolve()}), expected a class folder")
            if not list_images(entry):
                raise ClbenchError(f"{entry}: class folder holds no images (expected {', '.join(sorted(IMAGE_SUFFIXES))})")
            classes.append(entry.name)
    return tuple(classes)


class ImageFolderClassification(Restrictable, Dataset):
    """Items: (image, class index)."""

    ITEM_LISTS = ("samples",)

    def __init__(self, split_dir: Path, *, image_size: int, classes: tuple[str, ...], augment: bool = False,
                 normalization: Normalization = IMAGENET) -> None:
        self.normalization = normalization
        self.split_dir = Path(split_dir)
        found = class_folders(self.split_dir)
        if found != classes:
            raise ClbenchError(f"{self.split_dir}: class folders {list(found)} differ from the training split's "
                               f"{list(classes)}")
        self.samples = [(path, i) for i, name in enumerate(classes) for path in list_images(self.split_dir / name)]
        if not self.samples:
            raise ClbenchError(f"{self.split_dir}: empty split, no images")
        self.transform = train_transform(image_size, normalization=normalization) if augment else \
            resize_transform(image_size, normalization)

    def __len__(self) -> int:
        return len(self.samples)

    def present_labels(self) -> list[set[int]]:
        return [{label} for _, label in self.samples]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(read_image(path)), label
