"""The synthetic twin of the three datasets (DESIGN.md §7), written in exactly the real on-disk formats.

Deterministic from a seed. Two image domains (``SynthSpec.domain``):

- ``distinct`` (the default): each task has its own image statistics (dark noisy detection scenes, bright
  segmentation scenes, saturated striped classification images), so BatchNorm drift between stages is large.
- ``shared``: the three tasks draw their images from one scene generator (the same backgrounds, the same
  striped objects in the same ten colours); only the annotations differ, as COCO, VOC and Imagenette are all
  natural photos. Detection boxes every object (its colour is its class), segmentation paints object colour
  k as class 1 + k // 2 (two colours per class), classification shows one or two objects of its class.

Either way, content a small network learns in minutes on a CPU: the class is carried by colour.

Two segmentation class sets (``SynthSpec.variant``): ``default`` (background + 5 classes, what every published
synthetic figure used) and ``voc21`` (VOC's 21 classes, for the class-incremental protocols: class c in 1..20 is
colour COLOURS[(c - 1) // 2] drawn as an ellipse when c is odd, a rectangle when even, in either domain). The
variant changes only the segmentation folder; detection and classification are drawn from the same streams.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from clbench import ClbenchError
from clbench.config import FIELDS

from .voc import VOC_CLASSES, voc_palette

FORMAT_VERSION = 1
COCO_NAMES = ("person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light")
IMAGENETTE_NAMES = ("tench", "English_springer", "cassette_player", "chain_saw", "church", "French_horn",
                    "garbage_truck", "gas_pump", "golf_ball", "parachute")
SEG_CLASSES = VOC_CLASSES[:6]
PALETTE = [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128)]
# Ten well-separated colours; class k of detection and classification is drawn in COLOURS[k].
COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (250, 250, 250), (128, 128, 0)]
SEG_COLOURS = [(200, 30, 30), (30, 160, 40), (30, 60, 200), (220, 200, 20), (140, 40, 170)]


DOMAINS = ("distinct", "shared")
VARIANTS = ("default", "voc21")


@dataclass(frozen=True)
class SynthSpec:
    seed: int = 0
    n_train: int = FIELDS["synth_train"].default   # one default, stated in RunConfig
    n_val: int = FIELDS["synth_val"].default
    min_side: int = 96
    max_side: int = 160
    domain: str = "distinct"   # or "shared": see the module docstring
    variant: str = "default"   # or "voc21": segmentation with VOC's 21 classes

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise ClbenchError(f"synthetic domain {self.domain!r}: expected one of {', '.join(DOMAINS)}")
        if self.variant not in VARIANTS:
            raise ClbenchError(f"synthetic variant {self.variant!r}: expected one of {', '.join(VARIANTS)}")

    @property
    def seg_classes(self) -> tuple[str, ...]:
        return VOC_CLASSES if self.variant == "voc21" else SEG_CLASSES

    def to_dict(self) -> dict:
        """synth.json's settings; ``variant`` only when not the default, so the default's file is as it was."""
        out = asdict(self)
        return out if self.variant != "default" else {k: v for k, v in out.items() if k != "variant"}


def generate(out: Path, spec: SynthSpec = SynthSpec()) -> Path:
    """Write mini_coco_det/, mini_voc_seg/, imagenette_160/ and synth.json under ``out``, atomically. ``out``
    must not exist or be an empty folder: nothing of the user's is ever replaced."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ClbenchError(f"--out {out}: {'is a file' if not out.is_dir() else 'is a folder that is not empty'}; "
                           "give a new or empty folder (nothing was changed)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    except OSError as exc:
        raise ClbenchError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
    try:
        for split, n, offset in (("train", spec.n_train, 0), ("val", spec.n_val, 1)):
            streams = [np.random.default_rng([spec.seed, offset, task]) for task in range(3)]  # one per task
            writers = list(SHARED_WRITERS if spec.domain == "shared" else (_write_det, _write_seg, _write_cls))
            if spec.variant == "voc21":
                writers[1] = _write_voc21
            for write, folder, rng in zip(writers, ("mini_coco_det", "mini_voc_seg", "imagenette_160"), streams):
                write(tmp / folder / split, n, spec, rng)
        (tmp / "mini_voc_seg" / "labels.txt").write_text("\n".join(spec.seg_classes) + "\n")
        (tmp / "synth.json").write_text(json.dumps({"format_version": FORMAT_VERSION, **spec.to_dict()}, indent=2))
        try:
            os.replace(tmp, out)  # onto an empty folder or none; another writer's files make this fail
        except OSError as exc:
            raise ClbenchError(f"--out {out}: could not move the generated data into place ({exc.strerror or exc}); "
                               "nothing there was changed") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def cached(spec: SynthSpec = SynthSpec()) -> Path:
    """The synthetic data root in the cache ($CLBENCH_CACHE or ~/.cache/clbench), generated on first use."""
    cache = Path(os.environ.get("CLBENCH_CACHE", Path.home() / ".cache" / "clbench"))
    root = cache / (f"synthetic-v{FORMAT_VERSION}-seed{spec.seed}-n{spec.n_train}-{spec.n_val}"
                    f"-side{spec.min_side}-{spec.max_side}" + ("" if spec.domain == "distinct" else f"-{spec.domain}")
                    + ("" if spec.variant == "default" else f"-{spec.variant}"))
    if not (root / "synth.json").exists():
        try:
            generate(root, spec)
        except ClbenchError:
            if not (root / "synth.json").exists():  # another process may have written it meanwhile
                raise
    return root


def _canvas(rng: np.random.Generator, spec: SynthSpec, mean: float, std: float) -> np.ndarray:
    h, w = (int(v) for v in rng.integers(spec.min_side, spec.max_side + 1, size=2))
    ramp = np.linspace(-20, 20, w)[None, :, None]
    return np.clip(rng.normal(mean, std, size=(h, w, 3)) + ramp, 0, 255)


def _random_box(rng: np.random.Generator, h: int, w: int, lo: float, hi: float) -> tuple[int, int, int, int]:
    bw, bh = (int(max(6, s * rng.uniform(lo, hi))) for s in (w, h))
    x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
    return x0, y0, bw, bh


def _draw_shape(draw: ImageDraw.ImageDraw, ellipse: bool, box: tuple[int, int, int, int],
                fill: int | tuple[int, ...], outline: int | None = None) -> None:
    x0, y0, bw, bh = box
    shape = draw.ellipse if ellipse else draw.rectangle
    shape((x0, y0, x0 + bw - 1, y0 + bh - 1), fill=fill, outline=outline, width=2 if outline is not None else 0)


def _voc_palette() -> list[int]:
    """VOC's colours for our classes, VOC's cream (224, 224, 192) for the 255 'void' border."""
    colours = PALETTE + [(0, 0, 0)] * (255 - len(PALETTE)) + [(224, 224, 192)]
    return [v for rgb in colours for v in rgb]


def _voc21_object(label: int) -> tuple[tuple[int, int, int], bool]:
    """Class ``label`` (1..20) of the voc21 variant: its colour and whether it is an ellipse."""
    return COLOURS[(label - 1) // 2], label % 2 == 1


def _write_voc21(split_dir: Path, n: int, spec: SynthSpec, rng: np.random.Generator) -> None:
    """Segmentation with VOC's 21 classes: 1 to 3 objects of uniformly drawn classes on the domain's background
    (bright plain scenes, or the shared textured ones), VOC-style void borders."""
    palette = [int(v) for rgb in voc_palette()[:255] for v in rgb] + [224, 224, 192]
    for i in range(n):
        labels = [int(v) for v in rng.integers(1, 21, size=int(rng.integers(1, 4)))]
        canvas = _canvas(rng, spec, mean=185, std=12) if spec.domain == "distinct" else \
            _canvas(rng, spec, mean=120, std=25)
        h, w = canvas.shape[:2]
        picture, mask = Image.fromarray(canvas.astype(np.uint8)), Image.new("P", (w, h), 0)
        mask.putpalette(palette)
        for label in labels:
            box = _random_box(rng, h, w, 0.2, 0.55)
            colour, ellipse = _voc21_object(label)
            _draw_shape(ImageDraw.Draw(picture), ellipse, box, fill=colour)
            _draw_shape(ImageDraw.Draw(mask), ellipse, box, fill=label, outline=255)
        stem = f"{i + 1:06d}"
        _save_jpeg(np.asarray(picture), split_dir / "JPEGImages" / f"{stem}.jpg")
        (split_dir / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        mask.save(split_dir / "SegmentationClass" / f"{stem}.png")


def _save_jpeg(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path, quality=90)


def _write_det(split_dir: Path, n: int, spec: SynthSpec, rng: np.random.Generator) -> None:
    images, annotations = [], []
    for i in range(n):
        canvas = _canvas(rng, spec, mean=50, std=18)
        h, w = canvas.shape[:2]
        picture = Image.fromarray(canvas.astype(np.uint8))
        draw = ImageDraw.Draw(picture)
        count = 0 if i % 20 == 19 else int(rng.integers(1, 4))  # every 20th image has no object
        for _ in range(count):
            box, label = _random_box(rng, h, w, 0.15, 0.5), int(rng.integers(0, 10))
            _draw_shape(draw, bool(rng.random() < 0.5), box, fill=COLOURS[label])
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": label + 1,
                                "bbox": [float(v) for v in box], "area": float(box[2] * box[3]), "iscrowd": 0})
        images.append({"id": i + 1, "file_name": f"{i + 1:06d}.jpg", "width": w, "height": h})
        _save_jpeg(np.asarray(picture), split_dir / "images" / f"{i + 1:06d}.jpg")
    categories = [{"id": k + 1, "name": name, "supercategory": "synthetic"} for k, name in enumerate(COCO_NAMES)]
    (split_dir / "annotations.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": categories}, indent=1))


def _write_seg(split_dir: Path, n: int, spec: SynthSpec, rng: np.random.Generator) -> None:
    for i in range(n):
        canvas = _canvas(rng, spec, mean=185, std=12)
        h, w = canvas.shape[:2]
        picture, mask = Image.fromarray(canvas.astype(np.uint8)), Image.new("P", (w, h), 0)
        mask.putpalette(_voc_palette())
        for _ in range(int(rng.integers(1, 4))):
            box, label = _random_box(rng, h, w, 0.2, 0.6), int(rng.integers(1, len(SEG_CLASSES)))
            ellipse = bool(rng.random() < 0.5)
            _draw_shape(ImageDraw.Draw(picture), ellipse, box, fill=SEG_COLOURS[label - 1])
            _draw_shape(ImageDraw.Draw(mask), ellipse, box, fill=label, outline=255)  # VOC-style void border
        stem = f"{i + 1:06d}"
        _save_jpeg(np.asarray(picture), split_dir / "JPEGImages" / f"{stem}.jpg")
        (split_dir / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        mask.save(split_dir / "SegmentationClass" / f"{stem}.png")


def _write_cls(split_dir: Path, n: int, spec: SynthSpec, rng: np.random.Generator) -> None:
    for i in range(n):
        label = i % len(IMAGENETTE_NAMES)
        canvas = _canvas(rng, spec, mean=120, std=25)
        h, w = canvas.shape[:2]
        period, vertical = int(rng.integers(8, 20)), rng.random() < 0.5
        coord = np.arange(w)[None, :] if vertical else np.arange(h)[:, None]
        stripes = ((coord // (period // 2)) % 2 == 0)
        colour = np.array(COLOURS[label], dtype=np.float64)
        canvas = np.where(np.broadcast_to(stripes, (h, w))[..., None], 0.35 * canvas + 0.65 * colour, canvas)
        _save_jpeg(canvas, split_dir / IMAGENETTE_NAMES[label] / f"{i + 1:06d}.jpg")


def _shared_scene(rng: np.random.Generator, spec: SynthSpec,
                  labels: list[int]) -> tuple[np.ndarray, list[tuple[int, tuple[int, int, int, int], bool]]]:
    """The ``shared`` domain's one scene generator: a textured background and striped objects of colour
    COLOURS[label], drawn in order (later ones cover earlier ones). Returns the image and (label, box, ellipse)."""
    canvas = _canvas(rng, spec, mean=120, std=25)
    h, w = canvas.shape[:2]
    objects = []
    for label in labels:
        box, ellipse = _random_box(rng, h, w, 0.15, 0.55), bool(rng.random() < 0.5)
        shape = Image.new("L", (w, h), 0)
        _draw_shape(ImageDraw.Draw(shape), ellipse, box, fill=255)
        period, vertical = int(rng.integers(6, 15)), rng.random() < 0.5
        coord = np.arange(w)[None, :] if vertical else np.arange(h)[:, None]
        stripes = np.broadcast_to((coord // (period // 2)) % 2 == 0, (h, w))[..., None]
        colour, inside = np.array(COLOURS[label], dtype=np.float64), (np.asarray(shape) > 0)[..., None]
        canvas = np.where(inside, np.where(stripes, 0.85 * colour + 0.15 * canvas, 0.55 * colour + 0.45 * canvas),
                          canvas)
        objects.append((label, box, ellipse))
    return canvas, objects


def _some_labels(rng: np.random.Generator) -> list[int]:
    return [int(v) for v in rng.integers(0, 10, size=int(rng.integers(1, 4)))]


def _write_shared_det(split_dir: Path, n: int, spec: SynthSpec, rng: np.random.Generator) -> None:
    images, annotations = [], []
    for i in range(n):
        canvas, objects = _shared_scene(rng, spec, [] if i % 20 == 19 else _some_labels(rng))
        h, w = canvas.shape[:2]
        for label, box, _ in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": label + 1,
                                "bbox": [float(v) for v in box], "area": float(box[2] * box[3]), "iscrowd": 0})
        images.append({"id": i + 1, "file_name": f"{i + 1:06d}.jpg", "width": w, "height": h})
        _save_jpeg(canvas, split_dir / "images" / f"{i + 1:06d}.jpg")
    categories = [{"id": k + 1, "name": name, "supercategory": "synthetic"} for k, name in enumerate(COCO_NAMES)]
    (split_dir / "annotations.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": categories}, indent=1))


def _write_shared_seg(split_dir: Path, n: int, spec: SynthSpec, rng: np.random.Generator) -> None:
    for i in range(n):
        canvas, objects = _shared_scene(rng, spec, _some_labels(rng))
        h, w = canvas.shape[:2]
        mask = Image.new("P", (w, h), 0)
        mask.putpalette(_voc_palette())
        for label, box, ellipse in objects:  # colour k is class 1 + k // 2; VOC-style void border
            _draw_shape(ImageDraw.Draw(mask), ellipse, box, fill=1 + label // 2, outline=255)
        stem = f"{i + 1:06d}"
        _save_jpeg(canvas, split_dir / "JPEGImages" / f"{stem}.jpg")
        (split_dir / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        mask.save(split_dir / "SegmentationClass" / f"{stem}.png")


def _write_shared_cls(split_dir: Path, n: int, spec: SynthSpec, rng: np.random.Generator) -> None:
    for i in range(n):
        label = i % len(IMAGENETTE_NAMES)
        canvas, _ = _shared_scene(rng, spec, [label] * int(rng.integers(1, 3)))
        _save_jpeg(canvas, split_dir / IMAGENETTE_NAMES[label] / f"{i + 1:06d}.jpg")


SHARED_WRITERS = (_write_shared_det, _write_shared_seg, _write_shared_cls)
