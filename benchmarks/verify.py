"""`clbench data verify`: check a data root completely (every image decoded, every mask checked, no image in
two splits) and count images per split and class. `clbench run` calls it before training."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from clbench import ClbenchError

from .coco import load_coco_json
from .imagefolder import class_folders
from .images import list_images, read_image
from .layouts import SPLITS, TASK_DIRS, coco_split_files, voc_split_dirs
from .sources import file_digest
from .voc import read_class_list, read_mask


def verify(root: Path, tasks: list[tuple[str, str, str | None]] | None = None) -> dict[str, dict[str, Any]]:
    """task → split → {"images": n, "per_class": {class: count}} for each (name, kind, folder or None) of
    ``tasks`` (default: the three kinds in their own folders); the first problem is a ClbenchError."""
    root = Path(root)
    checks = {"det": _verify_det, "seg": _verify_seg, "cls": _verify_cls}
    tasks = tasks if tasks is not None else [(kind, kind, None) for kind in ("det", "seg", "cls")]
    return {name: checks[kind](root / (folder or TASK_DIRS[kind])) for name, kind, folder in tasks}


def _check_disjoint(task_root: Path, files: dict[str, list[Path]]) -> None:
    """Every image whose bytes are in two splits, all of them in one line (not only the first)."""
    leaks = find_leaks({split: [(p, file_digest(p)) for p in files[split]] for split in SPLITS})
    if leaks:
        raise ClbenchError(f"{task_root}: {len(leaks)} images are in both splits (same bytes): "
                           + "; ".join(f"{a.relative_to(task_root)} = {b.relative_to(task_root)}" for a, b in leaks)
                           + " (`clbench data import --drop-leaked` writes a copy without them in train)")


def find_leaks(hashed: dict[str, list[tuple[Path, str]]]) -> list[tuple[Path, Path]]:
    """(train file, val file) of every val image whose content hash is also in train, in val's order."""
    train: dict[str, Path] = {}
    for path, digest in hashed["train"]:
        train.setdefault(digest, path)
    return [(train[digest], path) for path, digest in hashed["val"] if digest in train]


def _nonempty(task_root: Path, split: str, count: int) -> None:
    if count == 0:
        raise ClbenchError(f"{task_root}/{split}: empty split, no images")


def _verify_det(task_root: Path) -> dict[str, Any]:
    out, files, categories = {}, {}, {}
    for split in SPLITS:
        annotation_file, images_dir = coco_split_files(task_root, split)
        coco = load_coco_json(annotation_file)
        categories[split] = coco["categories"]
        _nonempty(task_root, split, len(coco["images"]))
        files[split] = [images_dir / img["file_name"] for img in coco["images"]]
        for path, info in zip(files[split], coco["images"]):
            image = read_image(path)
            if (image.width, image.height) != (info["width"], info["height"]):
                raise ClbenchError(f"{annotation_file}: image {info['id']} is {image.width}x{image.height} on disk, "
                                   f"{info['width']}x{info['height']} in the JSON")
        names = {c["id"]: c["name"] for c in coco["categories"]}
        per_class = Counter(names[a["category_id"]] for a in coco["annotations"] if not a.get("iscrowd", 0))
        out[split] = {"images": len(coco["images"]), "per_class": dict(sorted(per_class.items()))}
    if categories["train"] != categories["val"]:
        raise ClbenchError(f"{task_root}: train and val have different categories")
    _check_disjoint(task_root, files)
    return out


def _verify_seg(task_root: Path) -> dict[str, Any]:
    classes = read_class_list(task_root)
    out, files = {}, {}
    for split in SPLITS:
        images_dir, masks_dir = voc_split_dirs(task_root, split)
        files[split] = list_images(images_dir)
        _nonempty(task_root, split, len(files[split]))
        per_class: Counter = Counter()
        for path in files[split]:
            image = read_image(path)
            mask = read_mask(masks_dir / f"{path.stem}.png", len(classes), (image.height, image.width))
            per_class.update(classes[v] for v in set(mask.flatten().tolist()) - {255})
        out[split] = {"images": len(files[split]), "per_class": dict(sorted(per_class.items()))}
    _check_disjoint(task_root, files)
    return out


def _verify_cls(task_root: Path) -> dict[str, Any]:
    classes = class_folders(task_root / "train")
    if class_folders(task_root / "val") != classes:
        raise ClbenchError(f"{task_root / 'val'}: class folders {list(class_folders(task_root / 'val'))} differ "
                           f"from the training split's {list(classes)}")
    out, files = {}, {}
    for split in SPLITS:
        per_class = {name: list_images(task_root / split / name) for name in classes}
        files[split] = [p for paths in per_class.values() for p in paths]
        _nonempty(task_root, split, len(files[split]))
        for path in files[split]:
            read_image(path)
        out[split] = {"images": len(files[split]), "per_class": {k: len(v) for k, v in per_class.items()}}
    _check_disjoint(task_root, files)
    return out


def format_report(report: dict[str, dict[str, Any]]) -> str:
    lines = []
    for task, splits in report.items():
        for split, info in splits.items():
            counts = ", ".join(f"{k} {v}" for k, v in info["per_class"].items())
            lines.append(f"{task} {split}: {info['images']} images; per class: {counts}")
    return "\n".join(lines)
