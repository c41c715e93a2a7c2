"""Detection data in COCO format: ``<split>/annotations.json`` + ``<split>/images/<file_name>`` (aliases:
``clbench.benchmarks.layouts.coco_split_files``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from clbench import ClbenchError

from .images import IMAGENET, Normalization, Restrictable, read_image, resize_transform, train_transform
from .layouts import coco_split_files

# COCO 2017's 80 detection categories by their original ids (the annotation files' own table).
COCO_CATEGORIES: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck", 9: "boat",
    10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench", 16: "bird",
    17: "cat", 18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear", 24: "zebra",
    25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee",
    35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat", 40: "baseball glove",
    41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass", 47: "cup", 48: "fork",
    49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple", 54: "sandwich", 55: "orange", 56: "broccoli",
    57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant",
    65: "bed", 67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard",
    77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 84: "book",
    85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush"
}


def load_coco_json(path: Path) -> dict[str, Any]:
    """Read and check a COCO detection file; the first problem names the file and the offending entry."""
    data = read_json(path)
    problem = next(coco_problems(path, data), None)
    if problem is not None:
        raise ClbenchError(problem)
    return data


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ClbenchError(f"{path}: annotation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ClbenchError(f"{path}: not valid JSON ({exc})") from None


def coco_problems(path: Path, data: Any) -> Iterator[str]:
    """Every problem of a parsed COCO detection file, one line each (the structure first: nothing is checked
    inside a file whose lists are missing)."""
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict) or k not in data]
    if missing:
        yield f"{path}: not a COCO detection file: missing {', '.join(missing)}"
        return
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list) or not all(isinstance(item, dict) for item in data[key]):
            yield f"{path}: {key!r} must be a list of objects, got {type(data[key]).__name__}"
            return
    images: dict[int, dict[str, Any]] = {}
    categories: set[int] = set()
    yield from _check_images(path, data["images"], images)
    yield from _check_categories(path, data["categories"], categories)
    yield from _check_annotations(path, data["annotations"], images, categories)


_KIND_NAMES = {int: "an integer", str: "a string"}


def _field(path: Path, what: str, entry: dict[str, Any], key: str, kind: type) -> Any:
    """``entry[key]``, which must be of ``kind`` (a bool is not an integer)."""
    if key not in entry:
        raise ClbenchError(f"{path}: {what} has no {key!r}: expected {_KIND_NAMES[kind]}")
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ClbenchError(f"{path}: {what} has {key} = {value!r}: expected {_KIND_NAMES[kind]}")
    return value


def _entries(entries: list[dict[str, Any]], check: Callable[[int, dict[str, Any]], None]) -> Iterator[str]:
    """``check`` every entry (it raises on the entry's first problem): each problem as one line."""
    for index, entry in enumerate(entries):
        try:
            check(index, entry)
        except ClbenchError as exc:
            yield str(exc)


def _check_images(path: Path, entries: list[dict[str, Any]], images: dict[int, dict[str, Any]]) -> Iterator[str]:
    names: dict[str, int] = {}

    def check(index: int, img: dict[str, Any]) -> None:
        image_id = _field(path, f"images[{index}]", img, "id", int)
        what = f"image {image_id}"
        name = _field(path, what, img, "file_name", str)
        if not _is_utf8(name):
            raise ClbenchError(f"{path}: {what} has file_name {name!r}: not valid UTF-8")
        for key in ("width", "height"):
            if _field(path, what, img, key, int) <= 0:
                raise ClbenchError(f"{path}: {what} has {key} {img[key]}: must be > 0")
        if image_id in images:
            raise ClbenchError(f"{path}: image id {image_id} appears twice in 'images' (ids must be unique)")
        if name in names:
            raise ClbenchError(f"{path}: images {names[name]} and {image_id} share file_name {name!r}")
        images[image_id], names[name] = img, image_id
    return _entries(entries, check)


def _check_categories(path: Path, entries: list[dict[str, Any]], ids: set[int]) -> Iterator[str]:
    def check(index: int, category: dict[str, Any]) -> None:
        category_id = _field(path, f"categories[{index}]", category, "id", int)
        _field(path, f"category {category_id}", category, "name", str)
        if category_id in ids:
            raise ClbenchError(f"{path}: category id {category_id} appears twice in 'categories'")
        ids.add(category_id)
    return _entries(entries, check)


def _check_annotations(path: Path, entries: list[dict[str, Any]], images: dict[int, dict[str, Any]],
                       categories: set[int]) -> Iterator[str]:
    def check(index: int, ann: dict[str, Any]) -> None:
        what = f"annotation {ann.get('id', f'#{index}')}"
        image = images.get(_field(path, what, ann, "image_id", int))
        if image is None:
            raise ClbenchError(f"{path}: {what} points to missing image id {ann['image_id']}")
        if _field(path, what, ann, "category_id", int) not in categories:
            raise ClbenchError(f"{path}: {what} has category_id {ann['category_id']} not in categories "
                               f"{sorted(categories)}")
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
            raise ClbenchError(f"{path}: {what} (image {image['id']}) has bbox {bbox!r}: expected [x, y, width, "
                               "height], four finite numbers")
        x, y, w, h = bbox
        if w <= 0 or h <= 0:
            raise ClbenchError(f"{path}: image {image['id']} has bbox {bbox}: width and height must be > 0")
        if x < 0 or y < 0 or x + w > image["width"] + 1 or y + h > image["height"] + 1:
            raise ClbenchError(f"{path}: image {image['id']} has bbox {bbox} outside the "
                               f"{image['width']}x{image['height']} image")
    return _entries(entries, check)


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def images_only(coco: dict[str, Any], image_ids: set[int]) -> dict[str, Any]:
    """A COCO ground truth cut to some images (their annotations; every category kept)."""
    return {**coco, "images": [img for img in coco["images"] if img["id"] in image_ids],
            "annotations": [a for a in coco["annotations"] if a["image_id"] in image_ids]}


class CocoDetection(Restrictable, Dataset):
    """Items: (image, {boxes xyxy in input pixels, labels 0..C-1, image_id, orig_size (h, w)}).

    Crowd boxes are not training targets (COCO's evaluation ignores detections matched to them).
    """

    ITEM_LISTS = ("images",)
    keep: frozenset[int] | None = None   # a class-incremental step: the class indices whose boxes are targets

    def restrict(self, indices: list[int]) -> "CocoDetection":
        """The items ``indices``, with ``coco`` (the evaluation's ground truth) cut to their images."""
        out = super().restrict(indices)
        out.coco = images_only(self.coco, {img["id"] for img in out.images})
        return out

    def __init__(self, task_root: Path, split: str, *, image_size: int, augment: bool = False,
                 normalization: Normalization = IMAGENET) -> None:
        self.normalization = normalization
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
        self.transform = train_transform(image_size, boxes=True, normalization=normalization) if augment else \
            resize_transform(image_size, normalization)

    def __len__(self) -> int:
        return len(self.images)

    def present_labels(self) -> list[set[int]]:
        """The class indices of each item's (non-crowd) boxes."""
        return [{self._label[a["category_id"]] for a in self._anns[img["id"]]} for img in self.images]

    def box_sizes(self) -> torch.Tensor:
        """(N, 2) every training box's (w, h) as fractions of its image's width and height: the shape it has in the
        square network input (``clbench.anchors``), read from the annotations without decoding an image."""
        sizes = [(a["bbox"][2] / img["width"], a["bbox"][3] / img["height"])
                 for img in self.images for a in self._anns[img["id"]]]
        return torch.tensor(sizes, dtype=torch.float64).reshape(-1, 2)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        info = self.images[index]
        image = read_image(self.images_dir / info["file_name"])
        anns = self._anns[info["id"]]
        if self.keep is not None:
            anns = [a for a in anns if self._label[a["category_id"]] in self.keep]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes = tv_tensors.BoundingBoxes(torch.cat((xywh[:, :2], xywh[:, :2] + xywh[:, 2:]), 1), format="XYXY",
                                         canvas_size=(image.height, image.width))
        labels = torch.tensor([self._label[a["category_id"]] for a in anns], dtype=torch.long)
        x, target = self.transform(image, {"boxes": boxes, "labels": labels})
        return x, {"boxes": target["boxes"].as_subclass(torch.Tensor), "labels": target["labels"],
                   "image_id": info["id"], "orig_size": (image.height, image.width)}
