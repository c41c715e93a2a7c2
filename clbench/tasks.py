"""TaskSpec: what a task is (its kind, classes, primary metric and loss), independent of data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from clbench.incremental import ClassSteps

Kind = Literal["det", "seg", "cls"]

PRIMARY_METRIC: dict[str, str] = {"det": "mAP", "seg": "mIoU", "cls": "top1"}
KIND_LABELS: dict[str, tuple[str, str]] = {"det": ("Detection", "mAP@[.5:.95]"), "seg": ("Segmentation", "mIoU"),
                                           "cls": ("Classification", "Top-1")}
LOSS_NAME: dict[str, str] = {
    "det": "yolo (balanced objectness BCE + GIoU + class CE)",
    "seg": "cross-entropy, 255 ignored",
    "cls": "cross-entropy",
}


@dataclass(frozen=True)
class TaskSpec:
    """One problem of the stream. ``name`` is also the name of its slice of the output conv."""

    name: str
    kind: Kind
    dataset: str
    classes: tuple[str, ...]
    category_ids: tuple[int, ...] = ()  # detection: original COCO category id of each class index
    folder: str | None = None           # its folder of the data root when not its kind's own (mini_voc_seg, ...)
    steps: tuple[tuple[int, ...], ...] = ()   # class-incremental: the class indices each of its experiences introduces
    mode: str | None = None             # class-incremental segmentation: overlapped | disjoint | sequential

    @property
    def class_steps(self) -> ClassSteps:
        """How its classes arrive: its ``steps``, or all at once."""
        return ClassSteps(self.steps or (tuple(range(self.num_classes)),))

    @property
    def incremental(self) -> bool:
        return len(self.steps) > 1

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def metric(self) -> str:
        return PRIMARY_METRIC[self.kind]

    @property
    def direction(self) -> str:
        return "higher"

    @property
    def loss(self) -> str:
        return LOSS_NAME[self.kind]

    @property
    def label(self) -> str:
        """How tables name the task: its kind's name, with the task's own name when that differs."""
        kind = KIND_LABELS[self.kind][0]
        return kind if self.name == self.kind else f"{self.name} ({kind})"

    @property
    def metric_label(self) -> str:
        return KIND_LABELS[self.kind][1]

    def to_dict(self) -> dict:
        out = {"name": self.name, "kind": self.kind, "dataset": self.dataset, "classes": list(self.classes),
               "category_ids": list(self.category_ids)}
        out = {**out, "folder": self.folder} if self.folder else out
        return {**out, "steps": [list(s) for s in self.steps], "mode": self.mode} if self.incremental else out

    @classmethod
    def from_dict(cls, data: dict) -> "TaskSpec":
        return cls(name=data["name"], kind=data["kind"], dataset=data["dataset"], classes=tuple(data["classes"]),
                   category_ids=tuple(data.get("category_ids", ())), folder=data.get("folder"),
                   steps=tuple(tuple(s) for s in data.get("steps", ())), mode=data.get("mode"))
