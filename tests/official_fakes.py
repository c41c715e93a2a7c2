"""Tiny stand-ins for the official downloads, in their real layouts (and as archives)."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

WNIDS = ("n01440764", "n02102040", "n02979186")


def jpeg(rng: np.random.Generator, w: int, h: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def make_coco(root: Path, n_images: int = 30, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, annotations = [], []
    for i in range(n_images):
        image_id = 1000 + 7 * i
        w, h = int(rng.integers(40, 64)), int(rng.integers(40, 64))
        name = f"{image_id:012d}.jpg"
        (root / "val2017" / name).write_bytes(jpeg(rng, w, h))
        images.append({"id": image_id, "file_name": name, "width": w, "height": h, "license": 1})
        for _ in range(int(rng.integers(1, 4))):
            bw, bh = int(rng.integers(4, w // 2)), int(rng.integers(4, h // 2))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(rng.integers(1, 14)),
                                "bbox": [1.0, 2.0, float(bw), float(bh)], "area": float(bw * bh),
                                "iscrowd": int(rng.random() < 0.1), "segmentation": []})
    annotations.append({"id": len(annotations) + 1, "image_id": images[0]["id"], "category_id": 1,
                        "bbox": [1.0, 1.0, 0.0, 5.0], "area": 0.0, "iscrowd": 0, "segmentation": []})  # degenerate
    categories = [{"id": k, "name": f"cat{k}", "supercategory": "x"} for k in range(1, 14)]
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(
        {"info": {}, "images": images, "annotations": annotations, "categories": categories}))
    return root


def make_voc(root: Path, n_train: int = 14, n_val: int = 10, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    ids = {"train": [f"2008_{i:06d}" for i in range(n_train)], "val": [f"2009_{i:06d}" for i in range(n_val)]}
    for split, names in ids.items():
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
        for name in names:
            w, h = int(rng.integers(40, 60)), int(rng.integers(40, 60))
            (voc / "JPEGImages" / f"{name}.jpg").write_bytes(jpeg(rng, w, h))
            mask = np.zeros((h, w), dtype=np.uint8)
            mask[5:20, 5:25] = int(rng.integers(1, 21))
            mask[4, 4:26] = 255
            png = Image.fromarray(mask, mode="P")
            png.putpalette([0, 0, 0] * 255 + [224, 224, 192])
            png.save(voc / "SegmentationClass" / f"{name}.png")
    return root / "VOCdevkit"


def make_imagenette(root: Path, per_class: int = 6, seed: int = 2) -> Path:
    rng = np.random.default_rng(seed)
    top = root / "imagenette2-160"
    for split in ("train", "val"):
        for wnid in WNIDS:
            (top / split / wnid).mkdir(parents=True)
            for i in range(per_class):
                (top / split / wnid / f"{wnid}_{split}{i}.JPEG").write_bytes(jpeg(rng, 48, 40))
    (top / "noisy_imagenette.csv").write_text("path,noisy_labels_0\n")
    return top


def zip_folder(folder: Path, target: Path, arc_root: str = "") -> Path:
    with zipfile.ZipFile(target, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, arc_root + path.relative_to(folder).as_posix())
    return target


def tar_folder(folder: Path, target: Path, mode: str) -> Path:
    with tarfile.open(target, mode) as tf:
        tf.add(folder, arcname=folder.name)
    return target
