"""`clbench data prepare`: the three mini subsets from the official downloads, deterministic and verifiable (the
official layouts are named in ``clbench.benchmarks.layouts.OFFICIAL``).

val is drawn from the official validation split of every dataset; train from the official training
split (COCO: from train2017 when given, otherwise from the val2017 images not chosen for val).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image

from clbench import ClbenchError

from .layouts import COCO_ARCHIVES, OFFICIAL
from .sources import MultiSource, Source, find_prefix, open_source

DEFAULT_COCO_CLASSES = tuple(range(1, 11))  # person … traffic light, COCO's own ids


@dataclass(frozen=True)
class Counts:
    train: int = 240
    val: int = 60


def choose(candidates: dict[Any, set[Any]], n: int, seed: int, classes: Iterable[Any], where: str) -> list[Any]:
    """``n`` keys, every class represented where possible (one image per class first, in a seeded order),
    the rest filled in the same seeded order; sorted. Deterministic in (candidates, n, seed)."""
    order = sorted(candidates)
    random.Random(seed).shuffle(order)
    if len(order) < n:
        raise ClbenchError(f"{where}: only {len(order)} images qualify, {n} asked for (see --counts)")
    chosen: list[Any] = []
    for cls in classes:
        if not any(cls in candidates[k] for k in chosen):
            first = next((k for k in order if cls in candidates[k] and k not in chosen), None)
            if first is not None and len(chosen) < n:
                chosen.append(first)
    taken = set(chosen)
    chosen += [k for k in order if k not in taken][: n - len(chosen)]
    return sorted(chosen)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Writer:
    """Writes into a temporary folder and moves it into place only when everything succeeded."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        if self.out.exists() and any(self.out.iterdir()):
            raise ClbenchError(f"{self.out}: exists and is not empty; choose a new --out (nothing was overwritten)")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}-", dir=self.out.parent))
        self.files: list[dict[str, str]] = []

    def write(self, relative: str, data: bytes, source: str) -> None:
        path = self.tmp / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.files.append({"path": relative, "sha256": sha256_bytes(data), "source": source})

    def finish(self) -> Path:
        if self.out.exists():
            self.out.rmdir()
        os.replace(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def coco_source(path: Path) -> Source:
    """A folder with val2017/ + annotations/ (+ train2017/), a folder with the official zips, or one zip."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    zips = [folder / name for name in COCO_ARCHIVES if (folder / name).is_file()]
    if zips and not (folder / "val2017").is_dir():
        return MultiSource([open_source(z) for z in zips])
    return open_source(folder)


def parse_classes(text: str | None, categories: list[dict[str, Any]]) -> list[int]:
    """--classes as COCO names or ids (comma-separated); default ids 1–10."""
    if not text:
        return list(DEFAULT_COCO_CLASSES)
    by_name = {c["name"]: c["id"] for c in categories}
    ids = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if item.isdigit() and int(item) in by_name.values():
            ids.append(int(item))
        elif item in by_name:
            ids.append(by_name[item])
        else:
            raise ClbenchError(f"--classes: {item!r} is neither a COCO category name nor id")
    return sorted(set(ids))


def prepare_coco(src: Source, writer: Writer, counts: Counts, seed: int, classes_text: str | None) -> dict[str, Any]:
    names = src.names()
    marker, what = OFFICIAL["coco"]
    prefix = find_prefix(names, marker, what, src.path)
    val_json = json.loads(src.read(prefix + marker))
    classes = parse_classes(classes_text, val_json["categories"])
    train_key = prefix + "annotations/instances_train2017.json"
    has_train = train_key in names and any(n.startswith(prefix + "train2017/") for n in names)
    val_ids = _write_coco_split(src, writer, val_json, prefix + "val2017/", "val", classes, counts.val, seed, set())
    train_json = json.loads(src.read(train_key)) if has_train else val_json
    train_dir = prefix + ("train2017/" if has_train else "val2017/")
    _write_coco_split(src, writer, train_json, train_dir, "train", classes, counts.train, seed + 1,
                      set() if has_train else set(val_ids))
    return {"classes": classes, "train_from": "train2017" if has_train else "val2017 (images not in val)"}


def _write_coco_split(src: Source, writer: Writer, coco: dict[str, Any], image_dir: str, split: str,
                      classes: list[int], n: int, seed: int, exclude: set[int]) -> list[int]:
    wanted = set(classes)
    valid = [a for a in coco["annotations"] if a["category_id"] in wanted and a["bbox"][2] > 0 and a["bbox"][3] > 0]
    per_image: dict[int, set[int]] = {}
    for ann in valid:
        if not ann.get("iscrowd", 0) and ann["image_id"] not in exclude:
            per_image.setdefault(ann["image_id"], set()).add(ann["category_id"])
    chosen = choose(per_image, n, seed, classes, f"COCO {split} ({image_dir})")
    keep = set(chosen)
    images = sorted((img for img in coco["images"] if img["id"] in keep), key=lambda i: i["id"])
    data = src.read_many(image_dir + img["file_name"] for img in images)
    for img in images:
        writer.write(f"mini_coco_det/{split}/images/{img['file_name']}", data[image_dir + img["file_name"]],
                     f"coco:{img['id']}")
    subset = {"images": [{k: img[k] for k in ("id", "file_name", "width", "height")} for img in images],
              "annotations": sorted((a for a in valid if a["image_id"] in keep), key=lambda a: a["id"]),
              "categories": [c for c in sorted(coco["categories"], key=lambda c: c["id"]) if c["id"] in wanted]}
    writer.write(f"mini_coco_det/{split}/annotations.json", json.dumps(subset, sort_keys=True).encode(), "coco")
    return chosen


def prepare_voc(src: Source, writer: Writer, counts: Counts, seed: int) -> dict[str, Any]:
    names = src.names()
    prefix = find_prefix(names, *OFFICIAL["voc"], src.path)
    for split, n, offset in (("val", counts.val, 0), ("train", counts.train, 1)):
        ids = src.read(prefix + f"ImageSets/Segmentation/{split}.txt").decode().split()
        masks = src.read_many(prefix + f"SegmentationClass/{i}.png" for i in ids)
        present = {i: set(np.unique(np.array(Image.open(io.BytesIO(masks[prefix + f"SegmentationClass/{i}.png"]))))
                          .tolist()) - {0, 255} for i in ids}
        chosen = choose(present, n, seed + offset, range(1, 21), f"VOC {split}")
        images = src.read_many(prefix + f"JPEGImages/{i}.jpg" for i in chosen)
        for i in chosen:
            writer.write(f"mini_voc_seg/{split}/JPEGImages/{i}.jpg", images[prefix + f"JPEGImages/{i}.jpg"], f"voc:{i}")
            writer.write(f"mini_voc_seg/{split}/SegmentationClass/{i}.png", masks[prefix + f"SegmentationClass/{i}.png"],
                         f"voc:{i}")
    return {"classes": 21}


def prepare_imagenette(src: Source, writer: Writer, counts: Counts, seed: int) -> dict[str, Any]:
    names = src.names()
    prefix = _imagenette_prefix(names, src.path)
    splits = {}
    for split in ("train", "val"):
        files: dict[str, list[str]] = {}
        for name in names:
            rest = name[len(prefix):] if name.startswith(prefix) else None
            if rest and rest.startswith(split + "/") and rest.count("/") == 2:
                files.setdefault(rest.split("/")[1], []).append(name)
        splits[split] = files
    if sorted(splits["train"]) != sorted(splits["val"]) or not splits["train"]:
        raise ClbenchError(f"{src.path}: train and val class folders differ or are missing")
    classes = sorted(splits["train"])
    for split, n, offset in (("val", counts.val, 0), ("train", counts.train, 1)):
        rng = random.Random(seed + offset)
        chosen = []
        for k, cls in enumerate(classes):
            pool = sorted(splits[split][cls])
            rng.shuffle(pool)
            take = n // len(classes) + (1 if k < n % len(classes) else 0)
            if len(pool) < take:
                raise ClbenchError(f"{src.path}: {split}/{cls} has {len(pool)} images, {take} needed")
            chosen += sorted(pool[:take])
        data = src.read_many(chosen)
        for name in chosen:
            cls, file = name.split("/")[-2:]
            writer.write(f"imagenette_160/{split}/{cls}/{file}", data[name], f"imagenette:{split}/{cls}/{file}")
    return {"classes": classes}


def _imagenette_prefix(names: list[str], where: Path) -> str:
    for name in names:
        parts = name.split("/")
        if len(parts) >= 3 and parts[-3] == "val":
            return "/".join(parts[:-3]) + ("/" if len(parts) > 3 else "")
    raise ClbenchError(f"{where}: no {OFFICIAL['imagenette'][0]} found; expected {OFFICIAL['imagenette'][1]}")


def prepare(*, coco: Path, voc: Path, imagenette: Path, out: Path, counts: Counts = Counts(), seed: int = 0,
            coco_classes: str | None = None) -> Path:
    """Write all three subsets and manifest.json under ``out``; on any error nothing is left behind."""
    sources = {"coco": coco_source(coco), "voc": open_source(voc), "imagenette": open_source(imagenette)}
    writer = Writer(out)
    try:
        details = {"coco": prepare_coco(sources["coco"], writer, counts, seed, coco_classes),
                   "voc": prepare_voc(sources["voc"], writer, counts, seed),
                   "imagenette": prepare_imagenette(sources["imagenette"], writer, counts, seed)}
        manifest = {"seed": seed, "counts": {"train": counts.train, "val": counts.val}, "details": details,
                    "sources": {k: s.describe() for k, s in sources.items()},
                    "files": sorted(writer.files, key=lambda f: f["path"])}
        writer.write("manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode(), "clbench")
        return writer.finish()
    except BaseException:
        writer.abort()
        raise
