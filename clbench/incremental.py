"""Class-incremental rules (DESIGN.md §8): which images join a step and how their labels read, as the papers define
them. Pure functions of class indices; the datasets apply them (``clbench.benchmarks``).

Segmentation follows MiB (Cermelli et al., CVPR 2020) and the "sequential" setting of PLOP/SSUL:

- **overlapped**: an image joins step t if it holds any class of step t; pixels of every other class (past and
  future) are labelled background.
- **disjoint**: an image joins step t if it holds a class of step t and every class it holds is old, current or
  background; only the current classes are labelled (old ones become background).
- **sequential**: disjoint's image filter, old classes keep their labels.

At test time after step t every class seen so far is revealed: an image is evaluated if it holds any seen
foreground class; pixels of classes not yet seen are ignored (255), as MiB's test sets do. Background (0) belongs
to the first step. The 255 border stays ignored everywhere (MiB's released code turns it into background in
training steps; VOC defines it as void, and so do we).

Detection follows the incremental-detection protocols (Faster-ILOD, ERD, CL-DETR): a step's training images are
those holding at least one of its classes, annotated with that step's classes only; evaluation covers every
class seen so far.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

IGNORE = 255
BACKGROUND = 0
SEG_MODES = ("overlapped", "disjoint", "sequential")


@dataclass(frozen=True)
class ClassSteps:
    """How one task's classes arrive: ``steps[k]`` the class indices its k-th experience introduces (sorted,
    disjoint, together every class of the task)."""

    steps: tuple[tuple[int, ...], ...]

    @property
    def incremental(self) -> bool:
        return len(self.steps) > 1

    def new(self, step: int) -> tuple[int, ...]:
        return self.steps[step]

    def old(self, step: int) -> tuple[int, ...]:
        return tuple(sorted(c for s in self.steps[:step] for c in s))

    def seen(self, step: int) -> tuple[int, ...]:
        """Classes introduced up to and including ``step`` (-1: none yet)."""
        return tuple(sorted(c for s in self.steps[: step + 1] for c in s))

    def future(self, step: int) -> tuple[int, ...]:
        return tuple(sorted(c for s in self.steps[step + 1:] for c in s))

    @property
    def all(self) -> tuple[int, ...]:
        return self.seen(len(self.steps) - 1)


def seg_joins(present: Iterable[int], old: Iterable[int], new: Iterable[int], mode: str) -> bool:
    """Whether an image holding the labels ``present`` (255 and background included or not) joins a training step
    that introduces ``new`` after ``old``."""
    present, new = set(present) - {BACKGROUND, IGNORE}, set(new) - {BACKGROUND}
    if not present & new:
        return False
    return mode == "overlapped" or present <= set(old) | new


def seg_train_table(num_classes: int, old: Iterable[int], new: Iterable[int], mode: str) -> np.ndarray:
    """The (256,) uint8 lookup table a training step's masks go through: current classes (and, in sequential
    mode, old ones) keep their index, every other class becomes background, 255 stays 255."""
    kept = set(new) | (set(old) if mode == "sequential" else set())
    table = np.full(256, BACKGROUND, dtype=np.uint8)
    for c in kept | {BACKGROUND}:
        table[c] = c
    table[IGNORE] = IGNORE
    table[num_classes:IGNORE] = BACKGROUND
    return table


def seg_test_joins(present: Iterable[int], seen: Iterable[int]) -> bool:
    """Whether a test image is evaluated after the step that made ``seen`` the seen classes."""
    return bool((set(present) - {BACKGROUND, IGNORE}) & (set(seen) - {BACKGROUND}))


def seg_test_table(num_classes: int, seen: Iterable[int]) -> np.ndarray:
    """The (256,) uint8 lookup table test masks go through: seen classes (background with them) kept, classes
    not yet seen ignored (255)."""
    table = np.full(256, IGNORE, dtype=np.uint8)
    for c in set(seen) | {BACKGROUND}:
        table[c] = c
    return table


def det_joins(present: Iterable[int], new: Iterable[int]) -> bool:
    """Whether an image whose boxes have the class indices ``present`` joins the step introducing ``new``."""
    return bool(set(present) & set(new))


def kept_boxes(labels: np.ndarray, keep: Iterable[int]) -> np.ndarray:
    """A boolean mask over an image's box labels: those of the classes ``keep``."""
    return np.isin(np.asarray(labels), np.fromiter(keep, dtype=np.int64))


def group_name(classes: Iterable[int]) -> str:
    """A class group as the papers write it: an index range ``0-15`` when contiguous, else the indices joined."""
    ordered = sorted(classes)
    if not ordered:
        return "none"
    if ordered == list(range(ordered[0], ordered[-1] + 1)):
        return str(ordered[0]) if len(ordered) == 1 else f"{ordered[0]}-{ordered[-1]}"
    return ",".join(str(c) for c in ordered)


def grouped(name: str, classes: Iterable[int]) -> str:
    """A task's or metric's name for one class group: ``mIoU[0-15]``, ``seg[16-20]``."""
    return f"{name}[{group_name(classes)}]"


MASKED = -1e4   # a logit no class reaches: its softmax share is 0 in float32, and 0 · log p stays finite


def restrict_logits(output: torch.Tensor, kind: str, allowed: Iterable[int] | None) -> torch.Tensor:
    """A task's output with the logits of every class not in ``allowed`` set to ``MASKED``: classes not yet
    introduced take no part in training or prediction. Segmentation (B, C, H, W) and classification (B, C): dim 1;
    detection (..., 5 + C): the class logits after box and objectness. ``allowed`` None: the output itself."""
    if allowed is None:
        return output
    offset, dim = (5, output.dim() - 1) if kind == "det" else (0, 1)
    classes = output.shape[dim] - offset
    allowed = set(allowed)
    if len(allowed) == classes:
        return output
    blocked = torch.tensor([offset + c for c in range(classes) if c not in allowed], device=output.device)
    return output.index_fill(dim, blocked, MASKED)


def select_classes(output: torch.Tensor, kind: str, classes: Iterable[int] | None) -> torch.Tensor:
    """A task's output cut to some classes' logits (detection keeps its box and objectness channels too): what a
    distillation of those classes compares. ``classes`` None: the output itself."""
    if classes is None:
        return output
    index = list(classes)
    if kind == "det":
        return output[..., list(range(5)) + [5 + c for c in index]]
    return output[:, index]
