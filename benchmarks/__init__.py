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
              normalization: Normalization = IMAGENET, name: str | None = None, folder: str | None = None) -> TaskData:
    """One task's spec and its train (resized targets, optionally augmented) / test (original-resolution
    targets, never augmented) datasets, both normalised with ``normalization`` (the weights'). ``name``: the
    task's name (default: its kind); ``folder``: its folder in the data root (default: its kind's own)."""
    folder = None if folder == TASK_DIRS[kind] else folder
    task_root = Path(root) / (folder or TASK_DIRS[kind])
    name, dataset = name or kind, folder or DATASET_NAMES[kind]
    common = {"image_size": image_size, "normalization": normalization}
    if kind == "det":
        train = CocoDetection(task_root, "train", augment=augment, **common)
        test = CocoDetection(task_root, "val", **common)
        spec = TaskSpec(name, "det", dataset, train.class_names, train.category_ids, folder)
    elif kind == "seg":
        classes = read_class_list(task_root)
        train = VocSegmentation(task_root, "train", classes=classes, train=True, augment=augment, **common)
        test = VocSegmentation(task_root, "val", classes=classes, train=False, **common)
        spec = TaskSpec(name, "seg", dataset, classes, folder=folder)
    else:
        classes = class_folders(task_root / "train")
        train = ImageFolderClassification(task_root / "train", classes=classes, augment=augment, **common)
        test = ImageFolderClassification(task_root / "val", classes=classes, **common)
        spec = TaskSpec(name, "cls", dataset, classes, folder=folder)
    return TaskData(spec, train, test)


def load_tasks(root: Path, stream: list[tuple[str, str, str | None]], *, image_size: int,
               augment: dict[str, bool] | None = None, normalization: Normalization = IMAGENET) -> list[TaskData]:
    """The tasks of ``stream`` ((name, kind, folder or None) each, as ``RunConfig.stream`` gives them), in order;
    a plain kind stands for the task of that name and kind in its own folder."""
    return [load_task(root, kind, image_size=image_size, augment=(augment or {}).get(name, False),
                      normalization=normalization, name=name, folder=folder)
            for name, kind, folder in (_entry(e) for e in stream)]


def _entry(entry: str | tuple[str, str, str | None]) -> tuple[str, str, str | None]:
    return (entry, entry, None) if isinstance(entry, str) else entry


def task_folder(root: Path, spec: TaskSpec) -> Path:
    """Where a task's data lives in the data root."""
    return Path(root) / (spec.folder or TASK_DIRS[spec.kind])
