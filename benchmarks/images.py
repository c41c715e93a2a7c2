"""Shared pieces of the three loaders: strict image reading, the resize transform, one collate function."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

from clbench import ClbenchError
from clbench.pretrained import IMAGENET, IMAGENET_MEAN, IMAGENET_STD, Normalization  # noqa: F401 (re-exported)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


class Restrictable:
    """A task dataset whose items are lists (``ITEM_LISTS``, index-aligned) can be cut to some of them: the
    validation split and the training images left (``clbench.benchmarks.split_validation``)."""

    ITEM_LISTS: tuple[str, ...] = ()

    def restrict(self, indices: list[int]) -> Any:
        """A shallow copy holding only items ``indices`` (in that order)."""
        out = copy.copy(self)
        for name in self.ITEM_LISTS:
            items = getattr(self, name)
            setattr(out, name, [items[i] for i in indices])
        return out


def read_image(path: Path) -> Image.Image:
    """Open and fully decode an image as RGB; a missing, unreadable or truncated file is a ClbenchError."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError:
        raise ClbenchError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ClbenchError(f"{path}: unreadable or truncated image ({exc})") from None


def resize_transform(image_size: int, normalization: Normalization = IMAGENET) -> v2.Compose:
    """Resize to a square input (boxes and masks follow via tv_tensors), scale to float, normalise:
    ``decode_transform`` then ``to_float``, one image at a time."""
    return v2.Compose([
        decode_transform(image_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(normalization.mean, normalization.std),
    ])


def decode_transform(image_size: int) -> v2.Compose:
    """The image as uint8, resized to the square input (boxes and masks follow): what the in-memory path keeps."""
    return v2.Compose([v2.ToImage(), v2.Resize((image_size, image_size), antialias=True)])


def to_float(images: torch.Tensor, normalization: Normalization = IMAGENET) -> torch.Tensor:
    """Images in [0, 1] (any leading dims, any device) → normalised, as ``resize_transform``'s last step."""
    return v2.functional.normalize(images, normalization.mean, normalization.std)


def train_transform(image_size: int, *, boxes: bool = False, normalization: Normalization = IMAGENET) -> v2.Compose:
    """Training augmentation; boxes and masks follow every geometric step: random resized crop (scale
    0.5-1), horizontal flip, colour jitter. With ``boxes`` the input is (image, {"boxes", "labels", ...})
    and boxes cropped away are dropped together with their labels."""
    box_steps = [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=2.0)] if boxes else []
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop((image_size, image_size), scale=(0.5, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
        *box_steps,
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(normalization.mean, normalization.std),
    ])


def collate(items: list[tuple[Any, ...]]) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """(image, target, task_label) items → stacked images, targets stacked where they can be, task labels."""
    images, targets, task_labels = zip(*items)
    return torch.stack(images), _collate_targets(list(targets)), torch.as_tensor(task_labels)


def _collate_targets(targets: list[Any]) -> Any:
    if isinstance(targets[0], int):
        return torch.as_tensor(targets)
    if isinstance(targets[0], torch.Tensor) and all(t.shape == targets[0].shape for t in targets):
        return torch.stack(targets)
    return targets  # detection dicts, or evaluation masks of different original sizes


def list_images(folder: Path) -> list[Path]:
    """The image files of a folder, sorted; a name whose bytes are not valid UTF-8 is an error (it could not
    be recorded in JSON or printed faithfully)."""
    if not folder.is_dir():
        raise ClbenchError(f"{folder}: folder not found")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    for path in images:
        check_utf8_name(path)
    return images


def check_utf8_name(path: Path) -> None:
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:
        shown = path.name.encode("utf-8", "surrogateescape")
        raise ClbenchError(f"{path.parent}: file name {shown!r} is not valid UTF-8; rename it") from None
