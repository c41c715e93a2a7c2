"""The three task datasets (real or synthetic, same on-disk formats) and the Avalanche stream.

The data root's layout, and every other layout clbench reads, is in ``clbench.benchmarks.layouts``.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset

from clbench import ClbenchError
from clbench.tasks import TaskSpec

from .coco import CocoDetection
from .imagefolder import ImageFolderClassification, class_folders
from .images import IMAGENET, Normalization
from .layouts import TASK_DIRS
from .voc import VocSegmentation, read_class_list

DATASET_NAMES = {"seg": "Mini-VOC-Seg", "det": "Mini-COCO-Det", "cls": "Imagenette-160"}


@dataclass(frozen=True)
class TaskData:
    spec: TaskSpec
    train: Dataset
    test: Dataset
    validation: Dataset | None = None   # carved from the training images (--val-fraction), evaluated like test

    @property
    def coco_gt(self) -> dict | None:
        """The test split's COCO JSON (detection's evaluation reference); None for other kinds."""
        return self.test.coco if self.spec.kind == "det" else None

    @property
    def validation_coco(self) -> dict | None:
        """The validation split's COCO JSON (cut from the training split's); None for other kinds or without one."""
        return self.validation.coco if self.spec.kind == "det" and self.validation is not None else None


def validation_indices(n: int, fraction: float, seed: int, task: str, labels: list[int] | None = None) -> list[int]:
    """Which of a task's ``n`` training items form its validation split: ``round(fraction * n)`` of them (at least
    one), drawn with a generator seeded from ``seed`` and the task's name only, so every strategy and run seed
    holds out the same images. With ``labels`` (classification) stratified: ``round(fraction * n_c)`` of each
    class's n_c items (at least one of a class with two or more), so every class keeps training images. Sorted."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(task.encode()))
    groups = [list(range(n))] if labels is None else \
        [[i for i, label in enumerate(labels) if label == c] for c in sorted(set(labels))]
    held = []
    for members in groups:
        count = min(max(round(fraction * len(members)), 1 if labels is None or len(members) > 1 else 0),
                    len(members) - 1)
        order = torch.randperm(len(members), generator=generator)[:count].tolist()
        held += [members[i] for i in order]
    return sorted(held)


def split_validation(data: TaskData, evaluation_view: Dataset, fraction: float, seed: int) -> TaskData:
    """``data`` with a validation split carved from its training items (``validation_indices``): those items read
    as the test set is (``evaluation_view``: the training split without augmentation, targets at the original
    resolution), the rest left for training."""
    labels = [label for _, label in data.train.samples] if data.spec.kind == "cls" else None
    held = validation_indices(len(data.train), fraction, seed, data.spec.name, labels)
    if not held:
        raise ClbenchError(f"--val-fraction {fraction:g}: task {data.spec.name!r} has {len(data.train)} training "
                           "images, too few to hold out a validation split")
    kept = sorted(set(range(len(data.train))) - set(held))
    return dataclasses.replace(data, train=data.train.restrict(kept), validation=evaluation_view.restrict(held))


def load_task(root: Path, kind: str, *, image_size: int, augment: bool = False,
              normalization: Normalization = IMAGENET, name: str | None = None, folder: str | None = None,
              val_fraction: float = 0.0, val_seed: int = 0) -> TaskData:
    """One task's spec and its train (resized targets, optionally augmented) / test (original-resolution
    targets, never augmented) datasets, both normalised with ``normalization`` (the weights'). ``name``: the
    task's name (default: its kind); ``folder``: its folder in the data root (default: its kind's own). With
    ``val_fraction`` a validation split held out of the training images (``split_validation``)."""
    data, evaluation_view = _load_task(root, kind, image_size=image_size, augment=augment,
                                       normalization=normalization, name=name, folder=folder)
    return split_validation(data, evaluation_view(), val_fraction, val_seed) if val_fraction else data


def _load_task(root: Path, kind: str, *, image_size: int, augment: bool, normalization: Normalization,
               name: str | None, folder: str | None) -> tuple[TaskData, Callable[[], Dataset]]:
    """The task, and how to read its training split as the test split is read."""
    folder = None if folder == TASK_DIRS[kind] else folder
    task_root = Path(root) / (folder or TASK_DIRS[kind])
    name, dataset = name or kind, folder or DATASET_NAMES[kind]
    common = {"image_size": image_size, "normalization": normalization}
    if kind == "det":
        train = CocoDetection(task_root, "train", augment=augment, **common)
        test = CocoDetection(task_root, "val", **common)
        spec = TaskSpec(name, "det", dataset, train.class_names, train.category_ids, folder)
        view: Callable[[], Dataset] = partial(CocoDetection, task_root, "train", **common)
    elif kind == "seg":
        classes = read_class_list(task_root)
        train = VocSegmentation(task_root, "train", classes=classes, train=True, augment=augment, **common)
        test = VocSegmentation(task_root, "val", classes=classes, train=False, **common)
        spec = TaskSpec(name, "seg", dataset, classes, folder=folder)
        view = partial(VocSegmentation, task_root, "train", classes=classes, train=False, **common)
    else:
        classes = class_folders(task_root / "train")
        train = ImageFolderClassification(task_root / "train", classes=classes, augment=augment, **common)
        test = ImageFolderClassification(task_root / "val", classes=classes, **common)
        spec = TaskSpec(name, "cls", dataset, classes, folder=folder)
        view = partial(ImageFolderClassification, task_root / "train", classes=classes, **common)
    return TaskData(spec, train, test), view


def load_tasks(root: Path, stream: list[tuple[str, str, str | None]], *, image_size: int,
               augment: dict[str, bool] | None = None, normalization: Normalization = IMAGENET,
               val_fraction: float = 0.0, val_seed: int = 0) -> list[TaskData]:
    """The tasks of ``stream`` ((name, kind, folder or None) each, as ``RunConfig.stream`` gives them), in order;
    a plain kind stands for the task of that name and kind in its own folder."""
    return [load_task(root, kind, image_size=image_size, augment=(augment or {}).get(name, False),
                      normalization=normalization, name=name, folder=folder, val_fraction=val_fraction,
                      val_seed=val_seed)
            for name, kind, folder in (_entry(e) for e in stream)]


def _entry(entry: str | tuple[str, str, str | None]) -> tuple[str, str, str | None]:
    return (entry, entry, None) if isinstance(entry, str) else entry


def task_folder(root: Path, spec: TaskSpec) -> Path:
    """Where a task's data lives in the data root."""
    return Path(root) / (spec.folder or TASK_DIRS[spec.kind])
