import hashlib
import json
from pathlib import Path

import pytest
from official_fakes import WNIDS, make_coco, make_imagenette, make_voc, tar_folder, zip_folder

from clbench import ClbenchError
from clbench.benchmarks.prepare import Counts, choose, prepare
from clbench.benchmarks.verify import verify
from clbench.cli import main

COUNTS = Counts(train=9, val=6)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    return {"coco": make_coco(root / "coco"), "voc": make_voc(root / "voc"), "imagenette": make_imagenette(root / "inet")}


def data_files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def test_prepare_writes_the_three_subsets_with_the_asked_counts(official, tmp_path):
    out = prepare(**official, out=tmp_path / "data", counts=COUNTS, seed=0)
    report = verify(out)
    for task in ("det", "seg", "cls"):
        assert report[task]["train"]["images"] == 9 and report[task]["val"]["images"] == 6
    coco = json.loads((out / "mini_coco_det" / "val" / "annotations.json").read_text())
    assert [c["id"] for c in coco["categories"]] == list(range(1, 11))              # original ids 1-10
    assert all(1 <= a["category_id"] <= 10 and a["bbox"][2] > 0 for a in coco["annotations"])
    assert len({a["category_id"] for a in coco["annotations"]}) >= 6                 # coverage first
    assert sorted(p.name for p in (out / "imagenette_160" / "train").iterdir()) == sorted(WNIDS)


def test_splits_are_disjoint_and_val_comes_from_the_official_val_lists(official, tmp_path):
    out = prepare(**official, out=tmp_path / "data", counts=COUNTS, seed=0)
    train = {p.name for p in (out / "mini_coco_det" / "train" / "images").iterdir()}
    val = {p.name for p in (out / "mini_coco_det" / "val" / "images").iterdir()}
    assert train and val and not train & val
    assert all(p.stem.startswith("2009_") for p in (out / "mini_voc_seg" / "val" / "JPEGImages").iterdir())
    assert all(p.stem.startswith("2008_") for p in (out / "mini_voc_seg" / "train" / "JPEGImages").iterdir())
    assert all("_val" in p.name for p in (out / "imagenette_160" / "val").rglob("*.JPEG"))


def test_manifest_lists_every_file_with_its_checksum(official, tmp_path):
    out = prepare(**official, out=tmp_path / "data", counts=COUNTS, seed=3)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["counts"] == {"train": 9, "val": 6}
    listed = {f["path"]: f["sha256"] for f in manifest["files"]}
    assert listed == {k: hashlib.sha256(v).hexdigest() for k, v in data_files(out).items()}


def test_same_inputs_give_byte_identical_outputs_and_archives_equal_folders(official, tmp_path):
    a = prepare(**official, out=tmp_path / "a", counts=COUNTS, seed=0)
    b = prepare(**official, out=tmp_path / "b", counts=COUNTS, seed=0)
    assert data_files(a) == data_files(b) and (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()
    archives = tmp_path / "archives"
    (archives / "coco").mkdir(parents=True)
    zip_folder(official["coco"] / "val2017", archives / "coco" / "val2017.zip", "val2017/")
    zip_folder(official["coco"] / "annotations", archives / "coco" / "annotations_trainval2017.zip", "annotations/")
    voc_tar = tar_folder(official["voc"], archives / "VOCtrainval_11-May-2012.tar", "w")
    inet_tgz = tar_folder(official["imagenette"], archives / "imagenette2-160.tgz", "w:gz")
    c = prepare(coco=archives / "coco" / "val2017.zip", voc=voc_tar, imagenette=inet_tgz, out=tmp_path / "c",
                counts=COUNTS, seed=0)
    assert data_files(c) == data_files(a)
    sources = json.loads((c / "manifest.json").read_text())["sources"]
    assert sources["voc"]["archive"] == "VOCtrainval_11-May-2012.tar" and len(sources["voc"]["sha256"]) == 64
    assert {s["archive"] for s in sources["coco"]} == {"val2017.zip", "annotations_trainval2017.zip"}


def test_other_seed_other_choice(official, tmp_path):
    a = prepare(**official, out=tmp_path / "a", counts=COUNTS, seed=0)
    b = prepare(**official, out=tmp_path / "b", counts=COUNTS, seed=1)
    assert data_files(a) != data_files(b)


def test_classes_by_name(official, tmp_path):
    out = prepare(**official, out=tmp_path / "d", counts=Counts(4, 3), seed=0, coco_classes="cat2,cat5,11")
    coco = json.loads((out / "mini_coco_det" / "train" / "annotations.json").read_text())
    assert [c["id"] for c in coco["categories"]] == [2, 5, 11]


def test_too_many_asked_fails_and_leaves_nothing_behind(official, tmp_path):
    with pytest.raises(ClbenchError, match="only .* images qualify, 500 asked for"):
        prepare(**official, out=tmp_path / "out", counts=Counts(500, 6), seed=0)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_is_never_overwritten(official, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ClbenchError, match="exists and is not empty"):
        prepare(**official, out=tmp_path / "out", counts=COUNTS, seed=0)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_cli_prepare_then_verify(official, tmp_path, capsys):
    args = ["data", "prepare", "--coco", str(official["coco"]), "--voc", str(official["voc"]), "--imagenette",
            str(official["imagenette"]), "--out", str(tmp_path / "data"), "--counts", "9,6"]
    assert main(args) == 0
    assert "det train: 9 images; per class:" in capsys.readouterr().out
    assert main(["data", "verify", str(tmp_path / "data")]) == 0
    assert "cls val: 6 images; per class: n01440764 2, n02102040 2, n02979186 2" in capsys.readouterr().out


def test_choose_covers_every_class_before_filling():
    candidates = {i: {"a"} for i in range(10)} | {10: {"b"}, 11: {"c"}}
    chosen = choose(candidates, 3, seed=0, classes=["a", "b", "c"], where="x")
    assert 10 in chosen and 11 in chosen and len(chosen) == 3
