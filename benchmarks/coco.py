"""Detection data in COCO format: ``<split>/annotations.json`` + ``<split>/images/<file_name>``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .images import read_image, resize_transform
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


class CocoDetection(Dataset):
    """Items: (image, {boxes xyxy in input pixels, labels 0..C-1, image_id, orig_size (h, w)}).

    Crowd boxes are not training targets (COCO's evaluation ignores detections matched to them).
    """

    def __init__(self, split_dir: Path, *, image_size: int) -> None:
        self.split_dir = Path(split_dir)
        self.annotation_file = self.split_dir / "annotations.json"
        self.coco = load_coco_json(self.annotation_file)
        self.category_ids = tuple(sorted(c["id"] for c in self.coco["categories"]))
        self.class_names = tuple(c["name"] for c in sorted(self.coco["categories"], key=lambda c: c["id"]))
        self._label = {cid: i for i, cid in enumerate(self.category_ids)}
        self.images = sorted(self.coco["images"], key=lambda img: img["id"])
        self._anns: dict[int, list[dict[str, Any]]] = {img["id"]: [] for img in self.images}
        for ann in self.coco["annotations"]:
            if not ann.get("iscrowd", 0):
                self._anns[ann["image_id"]].append(ann)
        self.transform = resize_transform(image_size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        info = self.images[index]
        image = read_image(self.split_dir / "images" / info["file_name"])
        anns = self._anns[info["id"]]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes = tv_tensors.BoundingBoxes(torch.cat((xywh[:, :2], xywh[:, :2] + xywh[:, 2:]), 1), format="XYXY",
                                         canvas_size=(image.height, image.width))
        x, boxes = self.transform(image, boxes)
        labels = torch.tensor([self._label[a["category_id"]] for a in anns], dtype=torch.long)
        return x, {"boxes": boxes.as_subclass(torch.Tensor), "labels": labels, "image_id": info["id"],
                   "orig_size": (image.height, image.width)}
