"""Every folder layout clbench knows, in one place.

clbench's own layout (what ``--data-root`` reads, what ``data prepare``, ``data import`` and ``data synth``
write)::

    <root>/mini_coco_det/{train,val}/annotations.json + images/
    <root>/mini_voc_seg/{train,val}/JPEGImages/*.jpg + SegmentationClass/*.png  [+ labels.txt]
    <root>/imagenette_160/{train,val}/<class>/*.jpg

The loaders also accept a few aliases inside it (``coco_split_files``, ``voc_split_dirs``). ``clbench data
import`` reads a task folder in any of the layouts students and tools produce (``find_det``, ``find_seg``,
``find_cls``: see ``LOOKED_FOR``) and writes clbench's. ``data prepare`` reads the official archives (zip/tar),
which are not folders; extracted, the official COCO layout is one ``data import`` reads too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Union

from clbench import ClbenchError

from .images import IMAGE_SUFFIXES

TASK_DIRS = {"seg": "mini_voc_seg", "det": "mini_coco_det", "cls": "imagenette_160"}
SPLITS = ("train", "val")
MASK_SUFFIX = ".png"

# The official downloads as `clbench data prepare` reads them (inside the archives or their extracted folders):
# the file that marks each one's root, and what it is.
OFFICIAL = {"coco": ("annotations/instances_val2017.json", "COCO 2017's annotations"),
            "voc": ("ImageSets/Segmentation/val.txt", "PASCAL VOC 2012 trainval"),
            "imagenette": ("val/<class>/<image>", "imagenette2-160")}
COCO_ARCHIVES = ("val2017.zip", "annotations_trainval2017.zip", "train2017.zip")

LOOKED_FOR = {
    "det": ("a FiftyOne export (<split>/labels.json + <split>/data/)",
            "a COCO JSON beside an image folder (COCO_train.json + train/)",
            "a COCO JSON inside each split folder (train/annotations.json + train/images/ or train/)",
            "the official layout (annotations/instances_val2017.json + val2017/)"),
    "seg": ("images and masks side by side (<split>/x.jpg + <split>/x.png)",
            "<split>/JPEGImages/ + <split>/SegmentationClass/",
            "JPEGImages/ + SegmentationClass/ split by list files (ImageSets/Segmentation/train.txt, or JSON/TXT "
            "lists of relative paths whose names say train or val)"),
    "cls": ("ImageFolder splits (<split>/<class>/<image>)",
            "class folders split by list files (<folder>/<class>/<image> + TXT/JSON lists whose names say train or "
            "val)"),
}


# clbench's own layout, as the loaders read it -------------------------------------------------------------

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


def voc_split_dirs(task_root: Path, split: str) -> tuple[Path, Path]:
    """(images, masks) folders of a split: ``JPEGImages/`` or ``images/``, ``SegmentationClass/`` or ``masks/``."""
    base = Path(task_root) / split
    images = next((base / n for n in ("JPEGImages", "images") if (base / n).is_dir()), base / "JPEGImages")
    masks = next((base / n for n in ("SegmentationClass", "masks") if (base / n).is_dir()), base / "SegmentationClass")
    return images, masks


# what a user's task folder holds --------------------------------------------------------------------------

@dataclass(frozen=True)
class DetSplit:
    annotation: Path
    images: Path


@dataclass(frozen=True)
class SegSplit:
    pairs: tuple[tuple[Path, Path], ...]      # (image, mask)


@dataclass(frozen=True)
class ClsSplit:
    samples: tuple[tuple[Path, str], ...]     # (image, class folder name)


Split = Union[DetSplit, SegSplit, ClsSplit]


@dataclass(frozen=True)
class Found:
    """A task folder's layout: which kind, where, and each split's files."""

    kind: str
    folder: Path
    layout: str                 # in words, with the paths found
    splits: dict[str, Split]


_VAL_WORDS = ("val", "valid", "validation", "test", "eval")


def split_of(name: str) -> str | None:
    """"train" or "val" when a file or folder name says so (``COCO_train.json``, ``val2017``,
    ``imagenetv2_val.txt``); None otherwise (``trainval.txt`` says neither)."""
    words = set(re.split(r"[^a-z]+", Path(name).stem.lower() if "." in name else name.lower()))
    if "train" in words or "training" in words:
        return "train"
    return "val" if words & set(_VAL_WORDS) else None


def _children(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


def _images_in(folder: Path) -> list[Path]:
    return [p for p in _children(folder) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]


def _rel(path: Path, base: Path) -> str:
    return path.relative_to(base).as_posix() if path != base else "."


def _one_per_split(found: dict[str, list], folder: Path, what: str) -> dict | None:
    """{split: the one candidate} when train and val each have exactly one; None when either has none; an error
    naming them when a split has several."""
    for split, items in found.items():
        if len(items) > 1:
            raise ClbenchError(f"{folder}: {len(items)} candidates for the {split} split's {what}: "
                               f"{', '.join(_rel(Path(str(i[0])), folder) for i in items)}; keep one")
    if all(found.get(s) for s in SPLITS):
        return {s: found[s][0] for s in SPLITS}
    return None


# detection ---------------------------------------------------------------------------------------------

def is_coco_json(path: Path) -> bool:
    """A COCO detection file, judged from its first 64 KB (a full parse of the official 450 MB file is not
    needed to recognise it): a JSON object with an "images" or "categories" key."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16).decode("utf-8", "replace").lstrip()
    except OSError:
        return False
    return head.startswith("{") and bool(re.search(r'"(images|categories)"\s*:', head))


def _image_folder(base: Path) -> Path:
    """Where a split's images live under ``base``: data/ (FiftyOne), images/, JPEGImages/, or ``base`` itself."""
    return next((base / n for n in ("data", "images", "JPEGImages") if (base / n).is_dir()), base)


def find_det(folder: Path) -> Found | None:
    found: dict[str, list[tuple[Path, Path]]] = {s: [] for s in SPLITS}
    split_dirs = {p: split_of(p.name) for p in _children(folder) if p.is_dir()}
    for json_path in _coco_jsons(folder):
        parent = json_path.parent
        if parent != folder and split_dirs.get(parent):          # inside a split folder
            found[split_dirs[parent]].append((json_path, _image_folder(parent)))
            continue
        split = split_of(json_path.name)
        if split is None or parent not in (folder, folder / "annotations"):
            continue
        dirs = [p for p, s in split_dirs.items() if s == split]
        if len(dirs) == 1:
            found[split].append((json_path, _image_folder(dirs[0])))
    for split, candidates in found.items():   # the official folder also holds captions_*.json, person_keypoints_*
        instances = [c for c in candidates if c[0].name.startswith("instances_")]
        found[split] = instances or candidates
    chosen = _one_per_split(found, folder, "COCO JSON")
    if chosen is None:
        return None
    layout = ", ".join(f"{_rel(a, folder)} + {_rel(i, folder)}/" for a, i in chosen.values())
    name = "FiftyOne export" if all(a.name == "labels.json" and i.name == "data" for a, i in chosen.values()) else \
        "official COCO layout" if all(a.name.startswith("instances_") for a, _ in chosen.values()) else "COCO JSON"
    return Found("det", folder, f"{name} ({layout})", {s: DetSplit(*chosen[s]) for s in SPLITS})


def _coco_jsons(folder: Path) -> list[Path]:
    """COCO JSON files at most one folder deep."""
    candidates = [p for p in _children(folder) if p.suffix.lower() == ".json"]
    candidates += [p for d in _children(folder) if d.is_dir() for p in _children(d) if p.suffix.lower() == ".json"]
    return [p for p in candidates if is_coco_json(p)]


# segmentation ------------------------------------------------------------------------------------------

def _paired(images: Iterable[Path], masks_dir: Path) -> list[tuple[Path, Path]]:
    return [(p, masks_dir / f"{p.stem}{MASK_SUFFIX}") for p in images
            if p.suffix.lower() != MASK_SUFFIX and (masks_dir / f"{p.stem}{MASK_SUFFIX}").is_file()]


def find_seg(folder: Path) -> Found | None:
    for finder in (_seg_split_folders, _seg_lists):
        found = finder(folder)
        if found is not None:
            return found
    return None


def _seg_split_folders(folder: Path) -> Found | None:
    """<split>/x.jpg + <split>/x.png, or <split>/JPEGImages + <split>/SegmentationClass (or images/ + masks/)."""
    found: dict[str, list[tuple[Path, str, SegSplit]]] = {s: [] for s in SPLITS}
    for split_dir in (p for p in _children(folder) if p.is_dir() and split_of(p.name)):
        images_dir, masks_dir = voc_split_dirs(folder, split_dir.name)
        if images_dir.is_dir() and masks_dir.is_dir():
            pairs, how = _paired(_images_in(images_dir), masks_dir), "{s}/%s + {s}/%s" % (images_dir.name, masks_dir.name)
        else:
            pairs, how = _paired(_images_in(split_dir), split_dir), "side by side ({s}/x.jpg + {s}/x.png)"
        if pairs:
            found[split_of(split_dir.name)].append((split_dir, how.format(s=split_dir.name), SegSplit(tuple(pairs))))
    chosen = _one_per_split(found, folder, "images and masks")
    if chosen is None:
        return None
    return Found("seg", folder, "images and masks " + "; ".join(h for _, h, _ in chosen.values()),
                 {s: c[2] for s, c in chosen.items()})


def _seg_lists(folder: Path) -> Found | None:
    """JPEGImages/ + SegmentationClass/ (possibly under VOCdevkit/VOC2012/) and list files naming each split."""
    base = next((p.parent for p in (folder / "JPEGImages", *folder.glob("*/JPEGImages"), *folder.glob("*/*/JPEGImages"))
                 if p.is_dir() and (p.parent / "SegmentationClass").is_dir()), None)
    if base is None:
        return None
    lists = {s: [] for s in SPLITS}
    for path in [*_children(base / "ImageSets" / "Segmentation"), *_children(folder), *_children(base)]:
        if path.is_file() and path.suffix.lower() in (".txt", ".json") and split_of(path.name) and path not in \
                [p for v in lists.values() for p in v]:
            lists[split_of(path.name)].append(path)
    chosen = _one_per_split({s: [(p,) for p in v] for s, v in lists.items()}, folder, "list file")
    if chosen is None:
        return None
    splits = {s: SegSplit(tuple(_seg_list_pairs(chosen[s][0], base))) for s in SPLITS}
    layout = f"{_rel(base / 'JPEGImages', folder)}/ + SegmentationClass/ split by " + \
        ", ".join(_rel(chosen[s][0], folder) for s in SPLITS)
    return Found("seg", folder, layout, splits)


def _seg_list_pairs(list_file: Path, base: Path) -> list[tuple[Path, Path]]:
    """(image, mask) of each entry: a VOC id, a relative image path, 'image mask' paths, or JSON objects with an
    image and a segmentation path. Windows backslashes are read as separators."""
    pairs = []
    for entry in read_list(list_file):
        image, mask = (entry + [None])[:2]
        image_path = _resolve(image, list_file, base, default_dir="JPEGImages", suffix=".jpg")
        mask_path = _resolve(mask, list_file, base, default_dir="SegmentationClass", suffix=MASK_SUFFIX) if mask \
            else base / "SegmentationClass" / f"{image_path.stem}{MASK_SUFFIX}"
        pairs.append((image_path, mask_path))
    return pairs


def read_list(path: Path) -> list[list[str]]:
    """A list file's entries, each as [path, (second path or label)]: JSON (strings, or objects whose first two
    string values are the paths) or TXT (whitespace-separated on each line; blank lines and # comments skipped)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ClbenchError(f"{path}: unreadable list file ({exc})") from None
    if path.suffix.lower() != ".json":
        return [line.split() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ClbenchError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, list):
        raise ClbenchError(f"{path}: expected a JSON list of paths or of objects with paths")
    entries = []
    for index, item in enumerate(data):
        values = [item] if isinstance(item, str) else [v for v in item.values() if isinstance(v, str)] \
            if isinstance(item, dict) else []
        if not values:
            raise ClbenchError(f"{path}: entry {index} is {item!r}: expected a path or an object with paths")
        entries.append(values[:2])
    return entries


def _resolve(entry: str, list_file: Path, base: Path, *, default_dir: str, suffix: str) -> Path:
    """A list entry as a path: relative to the data's base folder or to the list file's folder; a bare id is
    ``<default_dir>/<id><suffix>``."""
    relative = entry.replace("\\", "/").lstrip("./") if not entry.startswith("../") else entry.replace("\\", "/")
    if "/" not in relative and "." not in Path(relative).name:
        return base / default_dir / f"{relative}{suffix}"
    for root in (base, list_file.parent):
        if (root / relative).is_file():
            return root / relative
    return base / relative


# classification ----------------------------------------------------------------------------------------

def _class_folders(folder: Path) -> list[Path]:
    return [p for p in _children(folder) if p.is_dir() and _images_in(p)]


def find_cls(folder: Path) -> Found | None:
    return _cls_split_folders(folder) or _cls_lists(folder)


def _cls_split_folders(folder: Path) -> Found | None:
    found: dict[str, list[tuple[Path, ClsSplit]]] = {s: [] for s in SPLITS}
    for split_dir in (p for p in _children(folder) if p.is_dir() and split_of(p.name)):
        classes = _class_folders(split_dir)
        if len(classes) >= 2:
            samples = tuple((img, c.name) for c in classes for img in _images_in(c))
            found[split_of(split_dir.name)].append((split_dir, ClsSplit(samples)))
    chosen = _one_per_split(found, folder, "class folders")
    if chosen is None:
        return None
    layout = "ImageFolder (" + ", ".join(f"{_rel(d, folder)}/<class>/" for d, _ in chosen.values()) + ")"
    return Found("cls", folder, layout, {s: c[1] for s, c in chosen.items()})


def _cls_lists(folder: Path) -> Found | None:
    """One folder of class folders (the folder itself or a child) and a list file per split."""
    roots = [d for d in (folder, *(p for p in _children(folder) if p.is_dir())) if len(_class_folders(d)) >= 2]
    lists = {s: [p for p in _children(folder) if p.is_file() and p.suffix.lower() in (".txt", ".json")
                 and split_of(p.name) == s] for s in SPLITS}
    if len(roots) != 1:
        return None
    chosen = _one_per_split({s: [(p,) for p in v] for s, v in lists.items()}, folder, "list file")
    if chosen is None:
        return None
    root = roots[0]
    splits = {}
    for split in SPLITS:
        samples = []
        for entry in read_list(chosen[split][0]):
            path = _resolve(entry[0], chosen[split][0], root, default_dir=".", suffix="")
            samples.append((path, path.parent.name))
        splits[split] = ClsSplit(tuple(samples))
    layout = f"class folders {_rel(root, folder)}/<class>/ split by " + \
        ", ".join(_rel(chosen[s][0], folder) for s in SPLITS)
    return Found("cls", folder, layout, splits)


FINDERS = {"det": find_det, "seg": find_seg, "cls": find_cls}
KIND_WORDS = {"det": "detection (COCO)", "seg": "segmentation (VOC)", "cls": "classification (ImageFolder)"}
FLAGS = {"det": "--coco", "seg": "--voc", "cls": "--cls"}


def classify_folder(folder: Path) -> Found | None:
    """The first kind whose layout the folder holds, detection before segmentation before classification (a
    COCO folder's image folders, or VOC's JPEGImages/SegmentationClass, could pass for class folders)."""
    for finder in FINDERS.values():
        found = finder(folder)
        if found is not None:
            return found
    return None


def find_tasks(src: Path, named: dict[str, Path | None]) -> dict[str, Found]:
    """Each task's folder and layout under ``src``, found by content (``named``: folders the user gave)."""
    src = Path(src)
    if not src.is_dir():
        raise ClbenchError(f"{src}: folder not found")
    out: dict[str, Found] = {}
    for kind, folder in named.items():
        if folder is not None:
            found = FINDERS[kind](Path(folder))
            if found is None:
                raise ClbenchError(f"{FLAGS[kind]} {folder}: no {KIND_WORDS[kind]} layout found; looked for "
                                   + "; ".join(LOOKED_FOR[kind]))
            out[kind] = found
    candidates: dict[str, list[Found]] = {k: [] for k in FINDERS if k not in out}
    given = {f.folder.resolve() for f in out.values()}
    for child in (p for p in _children(src) if p.is_dir() and p.resolve() not in given):
        found = classify_folder(child)
        if found is not None and found.kind in candidates:
            candidates[found.kind].append(found)
    for kind, options in candidates.items():
        if len(options) > 1:
            raise ClbenchError(f"{src}: {len(options)} folders hold {KIND_WORDS[kind]} data: "
                               + "; ".join(f"{f.folder.name} ({f.layout})" for f in options)
                               + f"; name one with {FLAGS[kind]}")
        if not options:
            raise ClbenchError(f"{src}: no folder holds {KIND_WORDS[kind]} data; looked for "
                               + "; ".join(LOOKED_FOR[kind]) + f" (or name the folder with {FLAGS[kind]})")
        out[kind] = options[0]
    return {k: out[k] for k in ("det", "seg", "cls")}
