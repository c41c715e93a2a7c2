"""TaskSpec: what a task is (its kind, classes, primary metric and loss), independent of data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["det", "seg", "cls"]

PRIMARY_METRIC: dict[str, str] = {"det": "mAP", "seg": "mIoU", "cls": "top1"}
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
