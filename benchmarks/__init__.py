"""The three task datasets (real or synthetic, same on-disk formats) and the Avalanche stream.

The data root's layout, and every other layout clbench reads, is in ``clbench.benchmarks.layouts``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

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

    @property
    def coco_gt(self) -> dict | None:
        """The test split's COCO JSON (detection's evaluation reference); None for other kinds."""
        return self.test.coco if self.spec.kind == "det" else None


def load_task(root: Path, kind: str, *, image_size: int, augment: bool = False,
              normalization: Normalization = IMAGENET) -> TaskData:
    """One task's spec and its train (resized targets, optionally augmented) / test (original-resolution
    targets, never augmented) datasets, both normalised with ``normalization`` (the weights')."""
    task_root = Path(root) / TASK_DIRS[kind]
    common = {"image_size": image_size, "normalization": normalization}
    if kind == "det":
        train = CocoDetection(task_root, "train", augment=augment, **common)
        test = CocoDetection(task_root, "val", **common)
        spec = TaskSpec("det", "det", DATASET_NAMES[kind], train.class_names, train.category_ids)
    elif kind == "seg":
        classes = read_class_list(task_root)
        train = VocSegmentation(task_root, "train", classes=classes, train=True, augment=augment, **common)
        test = VocSegmentation(task_root, "val", classes=classes, train=False, **common)
        spec = TaskSpec("seg", "seg", DATASET_NAMES[kind], classes)
    else:
        classes = class_folders(task_root / "train")
        train = ImageFolderClassification(task_root / "train", classes=classes, augment=augment, **common)
        test = ImageFolderClassification(task_root / "val", classes=classes, **common)
        spec = TaskSpec("cls", "cls", DATASET_NAMES[kind], classes)
    return TaskData(spec, train, test)


def load_tasks(root: Path, order: tuple[str, ...], *, image_size: int, augment: dict[str, bool] | None = None,
               normalization: Normalization = IMAGENET) -> list[TaskData]:
    return [load_task(root, kind, image_size=image_size, augment=(augment or {}).get(kind, False),
                      normalization=normalization) for kind in order]
