"""Training sets decoded once per run and kept in memory as uint8; batches assembled by indexing, moved to the
device, augmented and normalised there (``clbench.augment``), so a GPU never waits for JPEG decoding.

The mini sets hold at most a few hundred images per task (at 512 px: 0.75 MiB an image, 1 MiB with its mask).
Which tasks fit is decided before a run starts, in task order, against ``--train-in-memory-mb``; a task that does
not fit what is left is read image by image as before. Without augmentation the two paths give the same batches
bit for bit (same shuffles, same resize, same normalisation: tested), so a CPU run's results do not change.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader
from torchvision.transforms.v2.functional import to_dtype

from clbench.augment import augment_batch
from clbench.benchmarks.images import IMAGENET, Normalization, decode_transform, to_float
from clbench.tensors import to_device

MB = 2**20


def footprint_bytes(n: int, kind: str, image_size: int) -> int:
    """Bytes a task's training set takes in memory: uint8 images, plus uint8 masks for segmentation."""
    return n * image_size * image_size * (4 if kind == "seg" else 3)


def plan(sizes: list[tuple[str, str, int]], image_size: int, budget_mb: int) -> dict[str, bool]:
    """Per task (name, kind, n), in order: whether its set is kept in memory (fits what the earlier ones left)."""
    left, chosen = budget_mb * MB, {}
    for name, kind, n in sizes:
        need = footprint_bytes(n, kind, image_size)
        chosen[name] = need <= left
        left -= need if chosen[name] else 0
    return chosen


@dataclass
class DecodedSet:
    """A task's training set, resized to the input side: ``images`` (N, 3, S, S) uint8 (pinned when the run is on
    CUDA) and its targets (seg: (N, S, S) uint8 masks; cls: (N,) labels; det: per image xyxy boxes and labels)."""

    kind: str
    images: torch.Tensor
    targets: Any
    augment: bool
    seconds: float  # decoding and resizing, once
    normalization: Normalization = IMAGENET   # the dataset's own (the weights')

    @classmethod
    def decode(cls, dataset: Any, kind: str, image_size: int, *, augment: bool, pin: bool) -> "DecodedSet":
        """Every item of a task dataset (CocoDetection, VocSegmentation or ImageFolderClassification) through its
        own reading code, with the resize but without the float conversion."""
        start = time.perf_counter()
        plain = copy.copy(dataset)
        plain.transform = decode_transform(image_size)
        items = [plain[i] for i in range(len(plain))]
        images = torch.stack([image.as_subclass(torch.Tensor) for image, _ in items])
        raw = [target for _, target in items]
        if kind == "seg":
            targets: Any = torch.stack(raw)
        elif kind == "cls":
            targets = torch.as_tensor(raw)
        else:
            targets = raw
        if pin:
            images = images.pin_memory()
            targets = targets.pin_memory() if isinstance(targets, torch.Tensor) else targets
        return cls(kind, images, targets, augment, time.perf_counter() - start,
                   getattr(dataset, "normalization", IMAGENET))

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, index: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, Any]:
        """Items ``index`` as (network input, targets) on ``device``: gathered into pinned memory on CUDA and
        copied without blocking, augmented there (when the task trains augmented), normalised."""
        pin = device.type == "cuda"
        images = gather(self.images, index, pin).to(device, non_blocking=True)
        if self.kind == "det":
            targets = to_device([self.targets[i] for i in index.tolist()], device)
        else:
            targets = gather(self.targets, index, pin).to(device, non_blocking=True)
        images = to_dtype(images, torch.float32, scale=True)
        if self.augment:
            images, targets = augment_batch(images, targets, self.kind)
        return to_float(images, self.normalization), targets


def gather(source: torch.Tensor, index: torch.Tensor, pin: bool) -> torch.Tensor:
    """source[index] along dim 0, written into pinned memory when ``pin`` (so the copy to the GPU is asynchronous)."""
    if not pin:
        return source.index_select(0, index)
    out = torch.empty((len(index), *source.shape[1:]), dtype=source.dtype, pin_memory=True)
    return torch.index_select(source, 0, index, out=out)


class MemoryLoader:
    """``ctx.train_loader`` for a set held in memory: iterating yields (images, targets, task labels) already on
    the device. The shuffles are the per-image path's: a DataLoader over the indices with the same generator
    draws the same orders. ``dataset`` is the per-image dataset (rehearsal buffers read items from it).
    ``decode`` gives the DecodedSet, called on the first iteration (a stage restored from the stage-1 cache
    never iterates, and decodes nothing)."""

    def __init__(self, decode: Callable[[], DecodedSet], dataset: Any, *, batch_size: int, seed: int,
                 device: torch.device, task_label: int) -> None:
        self._decode, self.dataset, self.device, self.task_label = decode, dataset, device, task_label
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._indices = DataLoader(range(len(dataset)), batch_size=batch_size, shuffle=True,
                                   generator=self.generator, collate_fn=torch.tensor)

    @property
    def decoded(self) -> DecodedSet:
        return self._decode()

    def __len__(self) -> int:
        return len(self._indices)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Any, torch.Tensor]]:
        for index in self._indices:
            images, targets = self.decoded.batch(index, self.device)
            yield images, targets, torch.full((len(index),), self.task_label, dtype=torch.long)
