"""`clbench data import`: small sets written in the layouts students have (never real images), imported, and
checked against what the builders know they wrote."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clbench import ClbenchError
from clbench.benchmarks import load_tasks
from clbench.benchmarks.importer import ImportOptions, import_data
from clbench.benchmarks.verify import verify
from clbench.benchmarks.voc import voc_palette
from clbench.cli import main

# COCO's original ids of a few names (cocodataset.org's category list), written here, not read from the code.
COCO_IDS = {"person": 1, "bicycle": 2, "car": 3, "airplane": 5, "dog": 18, "cat": 17, "backpack": 27, "banana": 52}
CLASSES = ("airplane", "backpack", "person")


def picture(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> Path:
    """A small, unique JPEG (its pixels drawn from ``seed``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def palette_mask(path: Path, indices: np.ndarray, *, colours: bool = False) -> Path:
    """A VOC mask: a palette PNG of class indices, or (``colours``) an RGB PNG in VOC's colours."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if colours:
        Image.fromarray(voc_palette()[indices]).save(path)
    else:
        image = Image.fromarray(indices.astype(np.uint8), mode="P")
        image.putpalette(voc_palette().flatten().tolist())
        image.save(path)
    return path


def mask_indices(seed: int, size: tuple[int, int] = (40, 30)) -> np.ndarray:
    indices = np.zeros((size[1], size[0]), dtype=np.uint8)
    indices[5:20, 5:25] = 1 + seed % 20
    indices[0, :] = 255
    return indices


def coco_file(path: Path, images: list[tuple[int, str]], boxes: dict[int, list[str]], names: list[str],
              size: tuple[int, int] = (40, 30)) -> None:
    """A COCO JSON whose category ids number ``names`` alphabetically from 1 (as FiftyOne exports do per split)."""
    ids = {n: i for i, n in enumerate(sorted(names), start=1)}
    anns = [{"id": 100 * image_id + k, "image_id": image_id, "category_id": ids[name], "bbox": [2, 3, 10 + k, 8],
             "area": 80.0, "iscrowd": 0} for image_id, labels in boxes.items() for k, name in enumerate(labels)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"info": {}, "categories": [{"id": i, "name": n} for n, i in ids.items()],
                                "images": [{"id": i, "file_name": f, "width": size[0], "height": size[1]} for i, f in images],
                                "annotations": anns}))


def det_split(folder: Path, json_path: Path, split: int, n: int, names: list[str],
              size: tuple[int, int] = (40, 30)) -> dict[int, list[str]]:
    images = [(1000 * split + i, f"{split}{i:03d}.jpg") for i in range(n)]
    boxes = {image_id: [CLASSES[i % 3]] + (["person"] if i % 2 else []) for i, (image_id, _) in enumerate(images)}
    for image_id, name in images:
        picture(folder / name, image_id, size)
    coco_file(json_path, images, boxes, names, size)
    return boxes


def student_a(src: Path, n: int = 6) -> dict:
    """FiftyOne COCO (ids renumbered per split: val also names 'dog'), VOC side by side, Imagenette WordNet ids."""
    truth = {}
    for k, split in enumerate(("train", "val")):
        names = [*CLASSES, *(["dog"] if split == "val" else [])]
        truth[split] = det_split(src / "mini_coco_det" / split / "data", src / "mini_coco_det" / split / "labels.json",
                                 k + 1, n, names)
        for i in range(n):
            seed = 5000 + 100 * k + i
            picture(src / "mini-voc-seg" / split / f"2007_{seed:06d}.jpg", seed)
            palette_mask(src / "mini-voc-seg" / split / f"2007_{seed:06d}.png", mask_indices(seed))
            for wnid in ("n01440764", "n02102040"):
                picture(src / "imagenette_160" / split / wnid / f"{wnid}_{seed}.JPEG", seed + hash(wnid) % 1000)
    (src / "mini_coco_det" / "labels.json").write_text(json.dumps({"images": [], "annotations": [],
                                                                   "categories": []}))  # describes no split
    return truth


def student_b(src: Path, n: int = 6, *, colours: bool = False, size: tuple[int, int] = (40, 30)) -> None:
    """COCO JSON beside image folders, VOC JPEGImages/SegmentationClass with JSON lists (colour masks when
    ``colours``), ImageNetV2 numeric class folders with TXT lists in Windows style; n images per split and task
    (2n for classification: two classes). perf/bench_import.py writes its set with it too."""
    for k, split in enumerate(("train", "val")):
        det_split(src / "coco_subset" / split, src / "coco_subset" / f"COCO_{split}.json", k + 1, n, list(CLASSES),
                  size)
        entries, lines = [], []
        for i in range(n):
            seed = 7000 + 1000 * k + i
            picture(src / "VOC_subset" / "JPEGImages" / f"{seed}.jpg", seed, size)
            palette_mask(src / "VOC_subset" / "SegmentationClass" / f"{seed}.png", mask_indices(seed, size),
                         colours=colours)
            entries.append({"image": f"JPEGImages/{seed}.jpg", "segmentation": f"SegmentationClass/{seed}.png",
                            "class_ids": [1]})
            for index in ("0", "3"):
                picture(src / "imagenetv2_subset" / "imagenetv2" / index / f"{index}_{seed}.jpeg", seed * 7 + int(index),
                        size)
                lines.append(f"{index}\\{index}_{seed}.jpeg {index}")
        (src / "VOC_subset" / f"{split}_list.json").write_text(json.dumps(entries))
        (src / "imagenetv2_subset" / f"imagenetv2_{split}.txt").write_text("\n".join(lines) + "\n")


def official(src: Path, n: int = 4) -> None:
    """Extracted official folders: COCO's annotations/instances_*.json (and captions_*.json) + train2017/ val2017/,
    VOCdevkit/VOC2012 with ImageSets/Segmentation lists of ids, ImageFolder class names."""
    for k, split in enumerate(("train", "val")):
        det_split(src / "coco" / f"{split}2017", src / "coco" / "annotations" / f"instances_{split}2017.json", k + 1, n,
                  list(CLASSES))
        (src / "coco" / "annotations" / f"captions_{split}2017.json").write_text(json.dumps({"images": [],
                                                                                          "annotations": []}))
        voc = src / "voc" / "VOCdevkit" / "VOC2012"
        ids = [f"2012_{9000 + 1000 * k + i:06d}" for i in range(n)]
        for i, name in enumerate(ids):
            picture(voc / "JPEGImages" / f"{name}.jpg", 9000 + 1000 * k + i)
            palette_mask(voc / "SegmentationClass" / f"{name}.png", mask_indices(i))
        (voc / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for name in ("cat", "dog"):
            for i in range(n):
                picture(src / "pets" / split / name / f"{i}.jpg", 20000 + 1000 * k + 100 * len(name) + i + ord(name[0]))
    (src / "voc" / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "trainval.txt").write_text("")


def tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path).encode() + path.read_bytes())
    return digest.hexdigest()


def run_import(src: Path, out: Path, **options) -> tuple[dict, list[str]]:
    said: list[str] = []
    manifest = import_data(src, out, ImportOptions(**options), say=said.append)
    return manifest, said


def test_student_a_layouts_are_found_and_categories_reconciled_by_name(tmp_path):
    truth = student_a(tmp_path / "src")
    before = tree_digest(tmp_path / "src")
    manifest, said = run_import(tmp_path / "src", tmp_path / "out")
    assert tree_digest(tmp_path / "src") == before                      # the source is only read
    assert any(line.startswith("det: ") and "FiftyOne export" in line for line in said)
    assert any(line.startswith("seg: ") and "side by side" in line for line in said)
    assert any(line.startswith("cls: ") and "ImageFolder" in line for line in said)
    assert "det: only in val: dog" in said
    for split in ("train", "val"):
        data = json.loads((tmp_path / "out" / "mini_coco_det" / split / "annotations.json").read_text())
        assert {c["name"]: c["id"] for c in data["categories"]} == {n: COCO_IDS[n] for n in CLASSES}
        names = {c["id"]: c["name"] for c in data["categories"]}
        written = sorted((a["image_id"], names[a["category_id"]]) for a in data["annotations"])
        assert written == sorted((i, name) for i, labels in truth[split].items() for name in labels)
    assert manifest["tasks"]["det"]["class_rule"] == "every category present in both splits"
    assert manifest["tasks"]["cls"]["classes"] == {"n01440764": "tench", "n02102040": "English_springer"}
    report = verify(tmp_path / "out")
    assert report["seg"]["train"]["images"] == 6 and report["cls"]["val"]["images"] == 12
    tasks = {t.spec.name: t for t in load_tasks(tmp_path / "out", ("seg", "det", "cls"), image_size=32)}
    assert tasks["det"].spec.category_ids == (1, 5, 27)


def test_student_b_layouts_with_lists_backslashes_and_numeric_imagenet_classes(tmp_path):
    student_b(tmp_path / "src")
    manifest, said = run_import(tmp_path / "src", tmp_path / "out")
    assert manifest["tasks"]["det"]["layout"].startswith("COCO JSON (COCO_train.json + train/")
    assert "train_list.json" in manifest["tasks"]["seg"]["layout"]
    assert "imagenetv2_train.txt" in manifest["tasks"]["cls"]["layout"]
    # ImageNet class 0 is the tench, class 3 the tiger shark (the ILSVRC-2012 class list)
    assert sorted(p.name for p in (tmp_path / "out" / "imagenette_160" / "train").iterdir()) == ["tench", "tiger_shark"]
    assert len(list((tmp_path / "out" / "imagenette_160" / "val" / "tiger_shark").iterdir())) == 6
    masks = sorted((tmp_path / "out" / "mini_voc_seg" / "train" / "SegmentationClass").iterdir())
    assert len(masks) == 6 and np.array_equal(np.array(Image.open(masks[0])), mask_indices(7000))


def test_the_official_folders_are_read_too(tmp_path):
    official(tmp_path / "src")
    manifest, _ = run_import(tmp_path / "src", tmp_path / "out")
    assert manifest["tasks"]["det"]["layout"] == ("official COCO layout (annotations/instances_train2017.json + "
                                                  "train2017/, annotations/instances_val2017.json + val2017/)")
    assert manifest["tasks"]["seg"]["layout"].startswith("VOCdevkit/VOC2012/JPEGImages/ + SegmentationClass/ split by "
                                                         "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt")
    assert manifest["tasks"]["cls"]["classes"] == {"cat": "cat", "dog": "dog"}
    assert verify(tmp_path / "out")["seg"]["val"]["images"] == 4


def test_colour_masks_are_converted_through_the_voc_palette(tmp_path):
    student_b(tmp_path / "src", colours=True)
    manifest, _ = run_import(tmp_path / "src", tmp_path / "out")
    assert manifest["tasks"]["seg"]["masks_converted_from_colours"] == 12
    for k, split in enumerate(("train", "val")):
        for i in range(6):
            seed = 7000 + 1000 * k + i
            mask = Image.open(tmp_path / "out" / "mini_voc_seg" / split / "SegmentationClass" / f"{seed}.png")
            assert mask.mode == "P" and np.array_equal(np.array(mask), mask_indices(seed))


def test_a_colour_outside_the_palette_is_refused_naming_it(tmp_path):
    student_b(tmp_path / "src", colours=True)
    mask = tmp_path / "src" / "VOC_subset" / "SegmentationClass" / "7003.png"
    pixels = np.array(Image.open(mask))
    pixels[10, 10] = (1, 2, 3)
    Image.fromarray(pixels).save(mask)
    with pytest.raises(ClbenchError, match=r"7003.png: colour mask holds \(1, 2, 3\)"):
        run_import(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_every_leak_is_listed_and_drop_leaked_removes_them_from_train(tmp_path):
    src = tmp_path / "src"
    student_a(src)
    leaked = [(src / "mini_coco_det" / "val" / "data" / "2000.jpg", src / "mini_coco_det" / "train" / "data" / "1003.jpg"),
              (src / "mini-voc-seg" / "val" / "2007_005101.jpg", src / "mini-voc-seg" / "train" / "2007_005004.jpg")]
    for val_file, train_file in leaked:
        train_file.write_bytes(val_file.read_bytes())
    with pytest.raises(ClbenchError) as caught:
        run_import(src, tmp_path / "out")
    lines = str(caught.value).splitlines()
    assert f"det: leak: {leaked[0][1]} = {leaked[0][0]}" in lines and f"seg: leak: {leaked[1][1]} = {leaked[1][0]}" in lines
    assert "2 images are in both train and val" in lines[-1] and not (tmp_path / "out").exists()
    manifest, said = run_import(src, tmp_path / "out", drop_leaked=True)
    assert "det: 1 leaked images dropped from train (--drop-leaked)" in said
    assert manifest["tasks"]["det"]["images"] == {"train": 5, "val": 6}
    assert manifest["tasks"]["seg"]["dropped_from_train"] == 1
    data = json.loads((tmp_path / "out" / "mini_coco_det" / "train" / "annotations.json").read_text())
    assert 1003 not in {img["id"] for img in data["images"]} | {a["image_id"] for a in data["annotations"]}
    verify(tmp_path / "out")                                 # clean now


def test_duplicates_inside_one_split_are_reported(tmp_path):
    src = tmp_path / "src"
    student_b(src)
    folder = src / "imagenetv2_subset" / "imagenetv2" / "0"
    (folder / "0_7001.jpeg").write_bytes((folder / "0_7000.jpeg").read_bytes())
    manifest, said = run_import(src, tmp_path / "out")
    assert manifest["tasks"]["cls"]["duplicates_within_a_split"] == [[str(folder / "0_7000.jpeg"),
                                                                      str(folder / "0_7001.jpeg")]]
    assert any(line.startswith("cls: duplicate inside one split") for line in said)


def test_every_bad_input_is_one_line_and_nothing_is_written(tmp_path, capsys):
    src = tmp_path / "src"
    student_b(src)
    (src / "coco_subset" / "train" / "1002.jpg").write_bytes(b"not a jpeg")
    palette_mask(src / "VOC_subset" / "SegmentationClass" / "7001.png", np.zeros((5, 5), dtype=np.uint8))
    data = json.loads((src / "coco_subset" / "COCO_val.json").read_text())
    data["annotations"][0]["bbox"] = [30, 20, 30, 20]
    (src / "coco_subset" / "COCO_val.json").write_text(json.dumps(data))
    shutil_rmtree_files(src / "imagenetv2_subset" / "imagenetv2" / "3", "3_80")   # class 3 has no val image left
    code = main(["data", "import", str(src), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and not (tmp_path / "out").exists()
    assert all(line.startswith("clbench: error: ") for line in err)
    expected = ["1002.jpg: unreadable or truncated image", "7001.png: mask is 5x5, its image is 40x30",
                "COCO_val.json: image 2000 has bbox [30, 20, 30, 20] outside the 40x30 image",
                "class '3' has no image in val (empty class)", "4 problems in"]
    for text in expected:
        assert sum(text in line for line in err) == 1, text


def shutil_rmtree_files(folder: Path, marker: str) -> None:
    for path in folder.iterdir():
        if marker in path.name:
            path.unlink()
    lists = folder.parents[1] / "imagenetv2_val.txt"
    lists.write_text("".join(line + "\n" for line in lists.read_text().splitlines() if marker not in line))


def test_two_folders_of_one_kind_are_ambiguous_until_named(tmp_path):
    src = tmp_path / "src"
    student_a(src)
    det_split(src / "coco_copy" / "train", src / "coco_copy" / "COCO_train.json", 1, 3, list(CLASSES))
    det_split(src / "coco_copy" / "val", src / "coco_copy" / "COCO_val.json", 2, 3, list(CLASSES))
    with pytest.raises(ClbenchError, match="2 folders hold detection .COCO. data: coco_copy .*; mini_coco_det .*; "
                                           "name one with --coco"):
        run_import(src, tmp_path / "out")
    manifest, _ = run_import(src, tmp_path / "out", named={"det": src / "coco_copy"})
    assert manifest["tasks"]["det"]["images"] == {"train": 3, "val": 3}


def test_a_missing_task_lists_what_was_looked_for(tmp_path):
    src = tmp_path / "src"
    student_a(src)
    for path in sorted((src / "imagenette_160").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    with pytest.raises(ClbenchError, match=r"no folder holds classification \(ImageFolder\) data; looked for "
                                           r"ImageFolder splits .* \(or name the folder with --cls\)"):
        run_import(src, tmp_path / "out")


@pytest.mark.parametrize("extra, rule", [
    ((), "the 10 most frequent (by images) present in both splits"),
    (("car", "bicycle"), "--classes"),
])
def test_detection_classes_most_frequent_or_named(tmp_path, extra, rule):
    """12 categories present in both splits, category k on k+1 images: the 10 most frequent are all but the two
    rarest (ties by id); --classes names them instead."""
    src = tmp_path / "src"
    student_b(src)
    names = ["bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
             "fire hydrant", "stop sign", "parking meter"]   # not person: COCO ids 1-10 are not all there
    for k, split in enumerate(("train", "val")):
        images = [(1000 * (k + 1) + i, f"{k + 1}{i:03d}.jpg") for i in range(6)]
        boxes = {image_id: [n for j, n in enumerate(names) if i <= j // 2] for i, (image_id, _) in enumerate(images)}
        coco_file(src / "coco_subset" / f"COCO_{split}.json", images, boxes, names)
    manifest, said = run_import(src, tmp_path / "out", classes=",".join(extra) or None)
    picked = [c["name"] for c in manifest["tasks"]["det"]["classes"]]
    assert manifest["tasks"]["det"]["class_rule"] == rule
    assert picked == (["bicycle", "car"] if extra else names[2:]) and any(rule in line for line in said)


def test_the_prepare_rule_applies_when_coco_ids_1_to_10_are_all_there(tmp_path):
    src = tmp_path / "src"
    student_b(src)
    names = ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
             "banana"]
    for k, split in enumerate(("train", "val")):
        images = [(1000 * (k + 1) + i, f"{k + 1}{i:03d}.jpg") for i in range(6)]
        coco_file(src / "coco_subset" / f"COCO_{split}.json", images, {i: ["banana"] * 3 + names[:10]
                                                                       for i, _ in images}, names)
    manifest, _ = run_import(src, tmp_path / "out")
    assert [c["id"] for c in manifest["tasks"]["det"]["classes"]] == list(range(1, 11))
    assert manifest["tasks"]["det"]["dropped_classes"] == ["banana"]
    assert "data prepare" in manifest["tasks"]["det"]["class_rule"]


def test_the_manifest_names_the_git_repository_and_commit_of_the_source(tmp_path):
    src = tmp_path / "src"
    student_b(src)
    git = ["git", "-C", str(src), "-c", "user.email=t@example.org", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "data"], check=True)
    subprocess.run([*git, "remote", "add", "origin", "https://example.org/student/mini.git"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    manifest, _ = run_import(src, tmp_path / "out")
    assert manifest["source"]["git"]["repository"] == "https://example.org/student/mini.git"
    assert manifest["source"]["git"]["commit"] == commit and manifest["source"]["git"]["dirty"] is False
    files = {f["path"]: f["sha256"] for f in manifest["files"]}
    written = tmp_path / "out" / "mini_coco_det" / "train" / "images" / "1000.jpg"
    assert files["mini_coco_det/train/images/1000.jpg"] == hashlib.sha256(written.read_bytes()).hexdigest()


def test_a_run_on_imported_data_names_its_source_in_env_json(tmp_path, tiny_args):
    from clbench.config import resolve
    from clbench.run import run
    student_b(tmp_path / "src")
    run_import(tmp_path / "src", tmp_path / "data")
    run_dir = run(resolve(None, {**tiny_args, "data_root": str(tmp_path / "data"), "image_size": "32",
                                 "order": "cls,det", "run_id": "imported"}))
    env = json.loads((run_dir / "env.json").read_text())
    manifest = tmp_path / "data" / "manifest.json"
    assert env["data_source"]["made_by"] == "clbench data import"
    assert env["data_source"]["source"]["path"] == str((tmp_path / "src").resolve())
    assert env["data_source"]["manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    from clbench.page import write_report
    page = write_report(run_dir).read_text()
    assert f"Data: {tmp_path / 'data'}, made by clbench data import from {(tmp_path / 'src').resolve()}." in page


@pytest.mark.parametrize("mask, message", [
    (lambda: Image.fromarray(np.full((30, 40), 30, dtype=np.uint8), mode="L"), r"mask values \[30\] outside 0..20 and 255"),
    (lambda: Image.new("LA", (40, 30)), "mask mode LA: expected a palette"),
])
def test_a_mask_of_the_wrong_values_or_mode_names_the_file(tmp_path, mask, message):
    student_a(tmp_path / "src")
    path = tmp_path / "src" / "mini-voc-seg" / "val" / "2007_005102.png"
    mask().save(path)
    with pytest.raises(ClbenchError, match=f"2007_005102.png: {message}"):
        run_import(tmp_path / "src", tmp_path / "out")
