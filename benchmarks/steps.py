"""A class-incremental task's data (DESIGN.md §8): the training images of each of its experiences, and its test
(or validation) images as a stage has seen its classes, by the rules of ``clbench.incremental``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from clbench import ClbenchError
from clbench.incremental import (
    det_joins,
    group_name,
    seg_joins,
    seg_test_joins,
    seg_test_table,
    seg_train_table,
)
from clbench.tasks import TaskSpec


def step_training_set(spec: TaskSpec, train: Any, step: int) -> Any:
    """The training images of ``spec``'s experience ``step`` with the labels it trains on: segmentation by its
    mode, detection with only the step's boxes, classification the step's classes' images. A task trained by one
    experience: ``train`` itself."""
    if not spec.incremental:
        return train
    steps = spec.class_steps
    old, new, present = steps.old(step), steps.new(step), train.present_labels()
    if spec.kind == "seg":
        joins = [i for i, labels in enumerate(present) if seg_joins(labels, old, new, str(spec.mode))]
    elif spec.kind == "det":
        joins = [i for i, labels in enumerate(present) if det_joins(labels, new)]
    else:
        joins = [i for i, labels in enumerate(present) if labels & set(new)]
    if not joins:
        raise ClbenchError(f"task {spec.name!r}: its experience {step + 1} (classes {group_name(new)}) has no "
                           "training image" + (f" in {spec.mode} mode" if spec.kind == "seg" else ""))
    out = train.restrict(joins)
    if spec.kind == "seg":
        out.label_table = seg_train_table(spec.num_classes, old, new, str(spec.mode))
    elif spec.kind == "det":
        out.keep = frozenset(new)
    return out


@dataclass(frozen=True)
class ClassView:
    """A task's evaluation images as a stage sees them: which items (None: all), the seen classes, the mask lookup
    table (segmentation) and the COCO ground truth cut to the seen categories (detection)."""

    seen: tuple[int, ...]
    indices: tuple[int, ...] | None = None
    table: np.ndarray | None = None
    coco: dict[str, Any] | None = None


def class_view(spec: TaskSpec, present: list[set[int]], seen: tuple[int, ...], coco: dict[str, Any] | None) -> ClassView:
    """The images of an evaluation split (their labels: ``present``) after a stage that has introduced ``seen``:
    segmentation evaluates images holding a seen foreground class, future classes ignored; detection every image
    against the seen categories' boxes; classification the seen classes' images."""
    if spec.kind == "seg":
        return ClassView(seen, tuple(i for i, labels in enumerate(present) if seg_test_joins(labels, seen)),
                         seg_test_table(spec.num_classes, seen))
    if spec.kind == "det":
        ids = {spec.category_ids[c] for c in seen}
        cut = None if coco is None else {**coco, "categories": [c for c in coco["categories"] if c["id"] in ids],
                                         "annotations": [a for a in coco["annotations"] if a["category_id"] in ids]}
        return ClassView(seen, None, None, cut)
    return ClassView(seen, tuple(i for i, labels in enumerate(present) if labels & set(seen)))


class Viewed(Dataset):
    """``dataset``'s items through a ``ClassView``: only its items, masks through its table."""

    def __init__(self, dataset: Any, view: ClassView) -> None:
        self.dataset, self.view = dataset, view
        self.indices = list(range(len(dataset))) if view.indices is None else list(view.indices)
        self.table = None if view.table is None else torch.from_numpy(view.table)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        x, y = self.dataset[self.indices[index]]
        return (x, self.table[y.long()]) if self.table is not None else (x, y)


def group_support(spec: TaskSpec, present: list[set[int]], view: ClassView, group: tuple[int, ...]) -> int:
    """How many of a view's images hold a class of ``group`` (background aside): a group's n."""
    members = set(group) - ({0} if spec.kind == "seg" else set())
    indices = range(len(present)) if view.indices is None else view.indices
    return sum(bool(present[i] & members) for i in indices)
