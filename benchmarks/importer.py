"""`clbench data import SRC --out DIR`: a mini set in a user's layout → clbench's layout, with a manifest.

The source is only read. Each task's folder is found by its content (``layouts.find_tasks``); every image is
decoded and hashed, every mask and box checked; every problem is one line and nothing is written while there is
one; an image present in two splits (same bytes) is a leak, refused unless ``drop_leaked`` removes it from
train. Detection categories are reconciled by name across splits (students' files renumber ids per split).
"""

from __future__ import annotations

import io
import json
import subprocess
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from clbench import ClbenchError

from .coco import COCO_CATEGORIES, coco_problems, read_json
from .layouts import SPLITS, TASK_DIRS, ClsSplit, DetSplit, Found, SegSplit, find_tasks
from .prepare import DEFAULT_COCO_CLASSES, Writer, sha256_bytes
from .verify import find_leaks
from .voc import VOC_CLASSES, colours_to_indices, voc_palette

MAX_DET_CLASSES = 10


class ImportProblems(ClbenchError):
    """Every problem found in a source, one line each; nothing was written."""


@dataclass
class Item:
    """One image (and its mask or annotations) of a split, as it will be written."""

    source: Path
    target: str                       # path under the task folder of the output
    digest: str = ""
    mask: Path | None = None
    mask_bytes: bytes | None = None   # a converted mask (colour → palette); None: the mask is copied
    record: dict[str, Any] = field(default_factory=dict)   # detection: the COCO image entry + "annotations"


@dataclass
class TaskImport:
    found: Found
    items: dict[str, list[Item]]
    details: dict[str, Any]


class Problems:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        self.lines.append(line)


# reading and checking ------------------------------------------------------------------------------------

def decode(path: Path, problems: Problems) -> tuple[str, tuple[int, int]] | None:
    """(sha256 of the file, (width, height)) of a readable image; None (and a problem) otherwise."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return sha256_bytes(data), img.size
    except FileNotFoundError:
        problems.add(f"{path}: image file not found")
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        problems.add(f"{path}: unreadable or truncated image ({exc})")
    return None


def read_det(found: Found, problems: Problems) -> tuple[dict[str, list[Item]], dict[str, dict[int, str]]]:
    """Per split: the items (COCO image entries with their annotations) and the split's category id → name."""
    items, names = {}, {}
    for split in SPLITS:
        part: DetSplit = found.splits[split]
        data = read_json(part.annotation)
        lines = list(coco_problems(part.annotation, data))
        if lines:
            for line in lines:
                problems.add(line)
            items[split], names[split] = [], {}
            continue
        names[split] = {c["id"]: c["name"] for c in data["categories"]}
        anns: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for ann in data["annotations"]:
            anns[ann["image_id"]].append(ann)
        items[split] = []
        for img in sorted(data["images"], key=lambda i: i["id"]):
            item = Item(part.images / img["file_name"], f"{split}/images/{img['file_name']}",
                        record={**{k: img[k] for k in ("id", "file_name", "width", "height")},
                                "annotations": anns[img["id"]]})
            seen = decode(item.source, problems)
            if seen is None:
                continue
            item.digest = seen[0]
            if seen[1] != (img["width"], img["height"]):
                problems.add(f"{part.annotation}: image {img['id']} ({img['file_name']}) is {seen[1][0]}x{seen[1][1]} "
                             f"on disk, {img['width']}x{img['height']} in the JSON")
            items[split].append(item)
    return items, names


def coco_name_table() -> dict[str, int]:
    """COCO's 80 category names → their original ids."""
    return {name: i for i, name in COCO_CATEGORIES.items()}


def reconcile(names: dict[str, dict[int, str]]) -> tuple[dict[str, int], str]:
    """One id per category name over both splits: COCO's original ids when every name is COCO's, otherwise
    1..N in name order."""
    every = sorted({n for split in names.values() for n in split.values()})
    coco = coco_name_table()
    if every and all(n in coco for n in every):
        return {n: coco[n] for n in every}, "COCO's original ids (every name is a COCO category)"
    return {n: i for i, n in enumerate(every, start=1)}, "ids 1..N in name order (not all names are COCO's)"


def images_per_class(items: dict[str, list[Item]], names: dict[str, dict[int, str]]) -> dict[str, Counter]:
    out = {}
    for split in SPLITS:
        out[split] = Counter(n for item in items[split] for n in
                             {names[split][a["category_id"]] for a in item.record["annotations"]})
    return out


def pick_classes(text: str | None, ids: dict[str, int], counts: dict[str, Counter]) -> tuple[list[str], str]:
    """The detection classes (names, in id order) and the rule that picked them."""
    both = [n for n in ids if counts["train"][n] and counts["val"][n]]
    if text:
        by_id = {str(i): n for n, i in ids.items()}
        picked = []
        for item in (t.strip() for t in text.split(",") if t.strip()):
            if item not in ids and item not in by_id:
                raise ClbenchError(f"--classes: {item!r} is not a category of the source (it has "
                                   f"{', '.join(sorted(ids))})")
            picked.append(by_id.get(item, item))
        return sorted(set(picked), key=ids.get), "--classes"
    default = [n for n, i in ids.items() if i in DEFAULT_COCO_CLASSES]
    if len(default) == len(DEFAULT_COCO_CLASSES) and all(n in both for n in default):
        return sorted(default, key=ids.get), "COCO ids 1-10 (the rule of `clbench data prepare`)"
    ranked = sorted(both, key=lambda n: (-(counts["train"][n] + counts["val"][n]), ids[n]))[:MAX_DET_CLASSES]
    return sorted(ranked, key=ids.get), (f"the {MAX_DET_CLASSES} most frequent (by images) present in both splits"
                                         if len(both) > MAX_DET_CLASSES else "every category present in both splits")


def import_det(found: Found, problems: Problems, classes_text: str | None) -> TaskImport:
    items, names = read_det(found, problems)
    ids, id_rule = reconcile(names)
    counts = images_per_class(items, names)
    one_split = {s: sorted({*names[s].values()} - {*names[o].values()}) for s, o in (("train", "val"), ("val", "train"))}
    picked, rule = pick_classes(classes_text, ids, counts)
    for name in picked:
        if not counts["train"][name]:
            problems.add(f"{found.splits['train'].annotation}: class {name!r} has no box in train")
    kept = {ids[n] for n in picked}
    for split in SPLITS:
        next_id = 1
        for item in items[split]:
            anns = []
            for ann in item.record["annotations"]:
                category = ids[names[split][ann["category_id"]]]
                if category in kept:
                    x, y, w, h = ann["bbox"]
                    anns.append({"id": next_id, "image_id": item.record["id"], "category_id": category,
                                 "bbox": ann["bbox"], "area": ann.get("area", w * h), "iscrowd": ann.get("iscrowd", 0)})
                    next_id += 1
            item.record["annotations"] = anns
    details = {"category_ids": id_rule, "classes": [{"id": ids[n], "name": n} for n in picked], "class_rule": rule,
               "dropped_classes": sorted(set(ids) - set(picked)), "only_in_one_split": one_split,
               "images_per_class": {s: dict(sorted(counts[s].items())) for s in SPLITS}}
    return TaskImport(found, items, details)


def import_seg(found: Found, problems: Problems) -> TaskImport:
    items, converted = {}, 0
    for split in SPLITS:
        part: SegSplit = found.splits[split]
        items[split] = []
        for image, mask in part.pairs:
            item = Item(image, f"{split}/JPEGImages/{image.stem}{image.suffix.lower()}", mask=mask)
            seen = decode(image, problems)
            if seen is None:
                continue
            item.digest = seen[0]
            item.mask_bytes, ok = check_mask(mask, seen[1], problems)
            converted += item.mask_bytes is not None
            if ok:
                items[split].append(item)
    return TaskImport(found, items, {"classes": list(VOC_CLASSES), "masks_converted_from_colours": converted})


def check_mask(path: Path, size: tuple[int, int], problems: Problems) -> tuple[bytes | None, bool]:
    """(palette PNG bytes of a colour mask converted through VOC's palette, or None to copy the file as it is;
    whether the mask is usable)."""
    try:
        with Image.open(path) as mask:
            mask.load()
            mode, array = mask.mode, np.array(mask)
    except FileNotFoundError:
        problems.add(f"{path}: mask file not found")
        return None, False
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        problems.add(f"{path}: unreadable mask ({exc})")
        return None, False
    if array.shape[:2] != (size[1], size[0]):
        problems.add(f"{path}: mask is {array.shape[1]}x{array.shape[0]}, its image is {size[0]}x{size[1]}")
        return None, False
    converted = None
    if mode in ("RGB", "RGBA"):
        array, unknown = colours_to_indices(array[..., :3], len(VOC_CLASSES))
        if unknown:
            problems.add(f"{path}: colour mask holds {unknown[0]} (and {len(unknown) - 1} more) that is not a VOC "
                         "palette colour; expected palette colours only, or a palette PNG of class indices")
            return None, False
        converted = palette_png(array)
    elif mode not in ("P", "L"):
        problems.add(f"{path}: mask mode {mode}: expected a palette (P) or single-channel PNG of class indices, or "
                     "an RGB mask in VOC's colours")
        return None, False
    bad = np.setdiff1d(np.unique(array), np.r_[np.arange(len(VOC_CLASSES)), 255])
    if bad.size:
        problems.add(f"{path}: mask values {bad.tolist()} outside 0..{len(VOC_CLASSES) - 1} and 255")
        return None, False
    return converted, True


def palette_png(indices: np.ndarray) -> bytes:
    image = Image.fromarray(indices.astype(np.uint8), mode="P")
    image.putpalette(voc_palette().flatten().tolist())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def class_names(folders: list[str]) -> tuple[dict[str, str], str]:
    """Output class folder per source class folder: ImageNet names for WordNet ids or numeric ImageNet indices
    (timm's offline class list), the folder's own name otherwise."""
    from timm.data import ImageNetInfo
    info = ImageNetInfo()
    synsets = {info.index_to_label_name(i): i for i in range(info.num_classes())}
    if all(f in synsets for f in folders):
        indices, rule = {f: synsets[f] for f in folders}, "WordNet ids named from ImageNet's class list (timm)"
    elif all(f.isdigit() and int(f) < info.num_classes() for f in folders):
        indices, rule = {f: int(f) for f in folders}, "numeric ImageNet indices named from ImageNet's class list (timm)"
    else:
        return {f: f for f in folders}, "the folders' own names"
    names = {f: info.index_to_description(i).split(",")[0].strip().replace(" ", "_") for f, i in indices.items()}
    repeated = {n for n, k in Counter(names.values()).items() if k > 1}  # ImageNet has two 'crane's, two 'maillot's
    return {f: f"{n}_{info.index_to_label_name(indices[f])}" if n in repeated else n for f, n in names.items()}, rule


def import_cls(found: Found, problems: Problems) -> TaskImport:
    folders = sorted({c for split in SPLITS for _, c in found.splits[split].samples})
    names, rule = class_names(folders)
    items = {}
    for split in SPLITS:
        part: ClsSplit = found.splits[split]
        items[split] = []
        for path, folder in part.samples:
            seen = decode(path, problems)
            if seen is not None:
                items[split].append(Item(path, f"{split}/{names[folder]}/{path.name}", digest=seen[0]))
        present = Counter(item.target.split("/")[1] for item in items[split])
        for folder in folders:
            if not present[names[folder]]:
                problems.add(f"{found.folder}: class {folder!r} has no image in {split} (empty class)")
    return TaskImport(found, items, {"classes": {f: names[f] for f in folders}, "class_names": rule})


# leaks and duplicates -------------------------------------------------------------------------------------

def leaks_and_duplicates(task: TaskImport) -> tuple[list[tuple[Item, Item]], list[list[str]]]:
    """(train item, val item) of every leak; groups of files with the same bytes inside one split."""
    by_digest = {s: {i.digest: i for i in task.items[s]} for s in SPLITS}
    pairs = find_leaks({s: [(i.source, i.digest) for i in task.items[s]] for s in SPLITS})
    val = {i.source: i for i in task.items["val"]}
    leaks = [(by_digest["train"][val[v].digest], val[v]) for _, v in pairs]
    duplicates = []
    for split in SPLITS:
        groups: dict[str, list[str]] = defaultdict(list)
        for item in task.items[split]:
            groups[item.digest].append(str(item.source))
        duplicates += [paths for paths in groups.values() if len(paths) > 1]
    return leaks, duplicates


def same_target(task: TaskImport, problems: Problems) -> None:
    """Two source files that would be written to one output path (same name in one class or split)."""
    for split in SPLITS:
        seen: dict[str, Path] = {}
        for item in task.items[split]:
            if item.target in seen:
                problems.add(f"{item.source}: same output name as {seen[item.target]} ({item.target}); rename one")
            seen.setdefault(item.target, item.source)


# writing ------------------------------------------------------------------------------------------------

def write_task(writer: Writer, kind: str, task: TaskImport) -> None:
    folder = TASK_DIRS[kind]
    for split in SPLITS:
        for item in task.items[split]:
            data = item.source.read_bytes()
            if sha256_bytes(data) != item.digest:
                raise ClbenchError(f"{item.source}: changed while importing; run the import again")
            writer.write(f"{folder}/{item.target}", data, str(item.source))
            if item.mask is not None:
                mask = item.mask_bytes if item.mask_bytes is not None else item.mask.read_bytes()
                writer.write(f"{folder}/{split}/SegmentationClass/{Path(item.target).stem}.png", mask, str(item.mask))
        if kind == "det":
            writer.write(f"{folder}/{split}/annotations.json", coco_json(task, split), str(task.found.splits[split]
                                                                                            .annotation))
    if kind == "seg":
        writer.write(f"{folder}/labels.txt", ("\n".join(VOC_CLASSES) + "\n").encode(), "VOC's 21 classes")


def coco_json(task: TaskImport, split: str) -> bytes:
    images = [{k: v for k, v in item.record.items() if k != "annotations"} for item in task.items[split]]
    anns = [a for item in task.items[split] for a in item.record["annotations"]]
    for new_id, ann in enumerate(anns, start=1):
        ann["id"] = new_id
    categories = [{"id": c["id"], "name": c["name"]} for c in task.details["classes"]]
    return json.dumps({"images": images, "annotations": anns, "categories": categories}, sort_keys=True).encode()


def git_origin(src: Path) -> dict[str, Any] | None:
    """The repository, commit and dirtiness of the git checkout holding ``src``; None when it is not in one."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(src), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None
    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    status = git("status", "--porcelain", "--", ".")
    return {"repository": git("remote", "get-url", "origin"), "commit": commit,
            "dirty": bool(status) if status is not None else None, "top": git("rev-parse", "--show-toplevel")}


# the command --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImportOptions:
    classes: str | None = None
    drop_leaked: bool = False
    named: dict[str, Path | None] = field(default_factory=dict)   # --coco / --voc / --cls


def import_data(src: Path, out: Path, options: ImportOptions = ImportOptions(),
                say: Callable[[str], None] = print) -> dict[str, Any]:
    """Read ``src``, check everything, write ``out`` in clbench's layout with manifest.json; returns the manifest."""
    start = time.perf_counter()
    src = Path(src)
    found = find_tasks(src, {k: options.named.get(k) for k in ("det", "seg", "cls")})
    for kind, f in found.items():
        say(f"{kind}: {f.folder} — {f.layout}")
    problems = Problems()
    tasks = {"det": import_det(found["det"], problems, options.classes), "seg": import_seg(found["seg"], problems),
             "cls": import_cls(found["cls"], problems)}
    for task in tasks.values():
        same_target(task, problems)
    if problems.lines:
        raise ImportProblems("\n".join([*problems.lines, f"{len(problems.lines)} problems in {src}; nothing was "
                                        "written"]))
    leaks = resolve_leaks(tasks, options.drop_leaked, say)
    describe(tasks, say)
    manifest = write_all(src, out, tasks, leaks, start)
    say(f"written to {out} in {manifest['seconds']:.1f} s (manifest.json: source, layouts, classes, leaks, sha256 of "
        "every file)")
    return manifest


def resolve_leaks(tasks: dict[str, TaskImport], drop: bool, say: Callable[[str], None]) -> dict[str, Any]:
    found, lines = {}, []
    for kind, task in tasks.items():
        leaks, duplicates = leaks_and_duplicates(task)
        found[kind] = {"leaks": [{"train": str(a.source), "val": str(b.source)} for a, b in leaks],
                       "duplicates_within_a_split": duplicates}
        lines += [f"{kind}: leak: {a.source} = {b.source}" for a, b in leaks]
        for group in duplicates:
            say(f"{kind}: duplicate inside one split (kept): {' = '.join(group)}")
        if leaks and drop:
            leaked = {a.digest for a, _ in leaks}
            task.items["train"] = [i for i in task.items["train"] if i.digest not in leaked]
            found[kind]["dropped_from_train"] = len(leaked)
            say(f"{kind}: {len(leaked)} leaked images dropped from train (--drop-leaked)")
    if lines and not drop:
        raise ClbenchError("\n".join([*lines, f"{len(lines)} images are in both train and val (same bytes); nothing "
                                     "was written: rerun with --drop-leaked to remove them from train"]))
    for line in lines:
        say(line)
    if not lines:
        say("leaks: none (no image's bytes are in both train and val of any task)")
    return found


def describe(tasks: dict[str, TaskImport], say: Callable[[str], None]) -> None:
    det, cls = tasks["det"].details, tasks["cls"].details
    say(f"det: classes ({det['class_rule']}; {det['category_ids']}): "
        + ", ".join(f"{c['name']} ({c['id']})" for c in det["classes"]))
    for split, names in det["only_in_one_split"].items():
        if names:
            say(f"det: only in {split}: {', '.join(names)}")
    say(f"cls: {len(cls['classes'])} classes, {cls['class_names']}")
    for kind, task in tasks.items():
        say(f"{kind}: " + ", ".join(f"{s} {len(task.items[s])} images" for s in SPLITS))


def write_all(src: Path, out: Path, tasks: dict[str, TaskImport], leaks: dict[str, Any], start: float) -> dict[str, Any]:
    writer = Writer(out)
    try:
        for kind, task in tasks.items():
            write_task(writer, kind, task)
        manifest = {"made_by": "clbench data import",
                    "source": {"path": str(src.resolve()), "git": git_origin(src)},
                    "tasks": {kind: {"folder": str(t.found.folder), "layout": t.found.layout,
                                     "images": {s: len(t.items[s]) for s in SPLITS}, **t.details, **leaks[kind]}
                              for kind, t in tasks.items()},
                    "seconds": round(time.perf_counter() - start, 2),
                    "files": sorted(writer.files, key=lambda f: f["path"])}
        writer.write("manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode(), "clbench")
        writer.finish()
        return manifest
    except BaseException:
        writer.abort()
        raise
