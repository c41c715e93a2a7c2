"""Detection data in COCO format: ``<split>/annotations.json`` + ``<split>/images/<file_name>``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .images import read_image, resize_transform, train_transform
from clbench import ClbenchError


def load_coco_json(path: Path) -> dict[str, Any]:
    """Read and check a COCO detection file; every problem names the file and the offending entry."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ClbenchError(f"{path}: annotation file not found") from None
    except json.JSONDecodeError as exc:
        raise ClbenchError(f"{path}: not valid JSON ({exc})") from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict) or k not in data]
    if missing:
        raise ClbenchError(f"{path}: not a COCO detection file: missing {', '.join(missing)}")
    _check_annotations(path, data)
    return data


def _check_annotations(path: Path, data: dict[str, Any]) -> None:
    images = {img["id"]: img for img in data["images"]}
    categories = {c["id"] for c in data["categories"]}
    for ann in data["annotations"]:
        image = images.get(ann["image_id"])
        if image is None:
            raise ClbenchError(f"{path}: annotation {ann.get('id')} points to missing image id {ann['image_id']}")
        if ann["category_id"] not in categories:
            raise ClbenchError(f"{path}: annotation {ann.get('id')} has category_id {ann['category_id']} "
                               f"not in categories {sorted(categories)}")
        x, y, w, h = ann["bbox"]
        if w <= 0 or h <= 0:
            raise ClbenchError(f"{path}: image {image['id']} has bbox {ann['bbox']}: width and height must be > 0")
        if x < 0 or y < 0 or x + w > image["width"] + 1 or y + h > image["height"] + 1:
            raise ClbenchError(f"{path}: image {image['id']} has bbox {ann['bbox']} outside the "
                               f"{image['width']}x{image['height']} image")


def coco_split_files(task_root: Path, split: str) -> tuple[Path, Path]:
    """(annotation JSON, images folder) of a split. Accepted layouts, first match wins:
    ``<split>/annotations.json`` or ``<split>/instances_<split>.json`` or ``annotations/instances_<split>.json`` or
    ``<split>.json``; images in ``<split>/images/``, ``<split>/JPEGImages/`` or ``<split>/`` itself."""
    task_root = Path(task_root)
    candidates = [task_root / split / "annotations.json", task_root / split / f"instances_{split}.json",
                  task_root / "annotations" / f"instances_{split}.json", task_root / f"{split}.json"]
    annotation = next((p for p in candidates if p.is_file()), None)
    if annotation is None:
        raise ClbenchError(f"{task_root}: no annotation file for split {split!r} (looked for "
                           f"{', '.join(str(p.relative_to(task_root)) for p in candidates)})")
    folders = [task_root / split / "images", task_root / split / "JPEGImages", task_root / split]
    return annotation, next(p for p in folders if p.is_dir() or p == folders[-1])


class CocoDetection(Dataset):
    """Items: (image, {boxes xyxy in input pixels, labels 0..C-1, image_id, orig_size (h, w)}).

    Crowd boxes are not training targets (COCO's evaluation ignores detections matched to them).
    """

    def __init__(self, task_root: Path, split: str, *, image_size: int, augment: bool = False) -> None:
        self.annotation_file, self.images_dir = coco_split_files(task_root, split)
        self.coco = load_coco_json(self.annotation_file)
        self.category_ids = tuple(sorted(c["id"] for c in self.coco["categories"]))
        self.class_names = tuple(c["name"] for c in sorted(self.coco["categories"], key=lambda c: c["id"]))
        self._label = {cid: i for i, cid in enumerate(self.category_ids)}
        self.images = sorted(self.coco["images"], key=lambda img: img["id"])
        self._anns: dict[int, list[dict[str, Any]]] = {img["id"]: [] for img in self.images}
        for ann in self.coco["annotations"]:
            if not ann.get("iscrowd", 0):
                self._anns[ann["image_id"]].append(ann)
        if not self.images:
            raise ClbenchError(f"{self.annotation_file}: empty split, no images")
        self.transform = train_transform(image_size, boxes=True) if augment else resize_transform(image_size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        info = self.images[index]
        image = read_image(self.images_dir / info["file_name"])
        anns = self._anns[info["id"]]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes = tv_tensors.BoundingBoxes(torch.cat((xywh[:, :2], xywh[:, :2] + xywh[:, 2:]), 1), format="XYXY",
                                         canvas_size=(image.height, image.width))
        labels = torch.tensor([self._label[a["category_id"]] for a in anns], dtype=torch.long)
        x, target = self.transform(image, {"boxes": boxes, "labels": labels})
        return x, {"boxes": target["boxes"].as_subclass(torch.Tensor), "labels": target["labels"],
                   "image_id": info["id"], "orig_size": (image.height, image.width)}
