import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from clbench import ClbenchError
from clbench.benchmarks import load_task, load_tasks
from clbench.benchmarks.coco import load_coco_json
from clbench.benchmarks.images import collate
from clbench.benchmarks.synthetic import SynthSpec, generate
from clbench.benchmarks.voc import read_mask


def files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_data_is_deterministic_per_seed(tmp_path):
    spec = SynthSpec(seed=5, n_train=4, n_val=2, min_side=40, max_side=48)
    a, b = generate(tmp_path / "a", spec), generate(tmp_path / "b", spec)
    assert files(a) == files(b)
    c = generate(tmp_path / "c", SynthSpec(seed=6, n_train=4, n_val=2, min_side=40, max_side=48))
    assert files(a) != files(c)


def test_synthetic_data_is_in_the_real_formats(tiny_root):
    coco = load_coco_json(tiny_root / "mini_coco_det" / "val" / "annotations.json")
    assert {c["id"] for c in coco["categories"]} == set(range(1, 11))
    assert min(a["id"] for a in coco["annotations"]) == 1
    with Image.open(next((tiny_root / "mini_voc_seg" / "train" / "SegmentationClass").glob("*.png"))) as mask:
        assert mask.mode == "P"
        values = set(np.unique(np.array(mask)).tolist())
    assert 255 in values and values <= {0, 1, 2, 3, 4, 5, 255}
    assert len([p for p in (tiny_root / "imagenette_160" / "train").iterdir() if p.is_dir()]) == 10


def test_task_statistics_differ_so_batchnorm_drift_is_real(tiny_root):
    tasks = {t.spec.name: t for t in load_tasks(tiny_root, ("seg", "det", "cls"), image_size=32)}
    means = {name: torch.stack([t.train[i][0] for i in range(4)]).mean().item() for name, t in tasks.items()}
    assert means["det"] < means["cls"] < means["seg"]


def test_shared_domain_draws_every_task_from_one_scene_generator(tmp_path):
    spec = SynthSpec(seed=5, n_train=12, n_val=10, min_side=40, max_side=48, domain="shared")
    root = generate(tmp_path / "shared", spec)
    assert files(root) == files(generate(tmp_path / "again", spec))  # deterministic
    assert json.loads((root / "synth.json").read_text())["domain"] == "shared"
    tasks = {t.spec.name: t for t in load_tasks(root, ("seg", "det", "cls"), image_size=32)}
    stats = {name: torch.stack([t.train[i][0] for i in range(12)]) for name, t in tasks.items()}
    means = [s.mean().item() for s in stats.values()]
    assert max(means) - min(means) < 0.15, means  # the distinct domain's task means differ by > 1 (normalised)
    distinct = {t.spec.name: torch.stack([t.train[i][0] for i in range(4)]).mean().item()
                for t in load_tasks(generate(tmp_path / "distinct", SynthSpec(seed=5, n_train=4, n_val=10, min_side=40,
                                                                             max_side=48)), ("seg", "det"), image_size=32)}
    assert distinct["seg"] - distinct["det"] > 1.0
    # segmentation paints object colour k as class 1 + k // 2: inside each class, the stripes' colour is one of two
    from clbench.benchmarks.synthetic import COLOURS
    for image, mask in zip(sorted((root / "mini_voc_seg" / "train" / "JPEGImages").glob("*.jpg")),
                           sorted((root / "mini_voc_seg" / "train" / "SegmentationClass").glob("*.png"))):
        pixels = np.asarray(Image.open(image), dtype=np.float64)
        labels = np.asarray(Image.open(mask))
        for c in set(np.unique(labels).tolist()) - {0, 255}:
            colour = pixels[labels == c].mean(axis=0)
            nearest = min(range(10), key=lambda k: np.abs(np.array(COLOURS[k]) - colour).sum())
            assert 1 + nearest // 2 == c or (labels == c).sum() < 30  # a sliver under a later object may blend


def test_synth_domain_is_a_run_setting_and_names_the_benchmark(tmp_path, monkeypatch):
    from clbench.runtime import data_root
    monkeypatch.setenv("CLBENCH_CACHE", str(tmp_path))
    root, name = data_root(None, 4, 2, "shared")
    assert name == "synthetic-shared" and root.name.endswith("-shared")
    assert data_root(str(root), 4, 2)[1] == "synthetic-shared"
    with pytest.raises(ClbenchError, match="synth_domain"):
        from clbench.config import RunConfig
        RunConfig(synth_domain="natural")


def test_boxes_follow_the_resize_and_keep_original_size(tiny_root):
    task = load_task(tiny_root, "det", image_size=32)
    coco = task.train.coco
    index = next(i for i, img in enumerate(task.train.images) if any(
        a["image_id"] == img["id"] for a in coco["annotations"]))
    info = task.train.images[index]
    ann = next(a for a in coco["annotations"] if a["image_id"] == info["id"])
    x, target = task.train[index]
    assert x.shape == (3, 32, 32) and target["orig_size"] == (info["height"], info["width"])
    bx, by, bw, bh = ann["bbox"]
    sx, sy = 32 / info["width"], 32 / info["height"]
    torch.testing.assert_close(target["boxes"][0], torch.tensor([bx * sx, by * sy, (bx + bw) * sx, (by + bh) * sy]))


def test_eval_masks_keep_original_resolution_train_masks_are_resized(tiny_root):
    task = load_task(tiny_root, "seg", image_size=32)
    _, train_mask = task.train[0]
    _, test_mask = task.test[0]
    with Image.open(task.test.masks[0]) as original:
        assert tuple(test_mask.shape) == (original.height, original.width)
        assert torch.equal(test_mask, torch.from_numpy(np.array(original)))
    assert train_mask.shape == (32, 32) and set(train_mask.unique().tolist()) <= {0, 1, 2, 3, 4, 5, 255}


def test_collate_stacks_what_it_can_and_lists_the_rest():
    det = [(torch.zeros(3, 4, 4), {"boxes": torch.zeros(n, 4)}, 1) for n in (0, 2)]
    images, targets, tasks = collate(det)
    assert images.shape == (2, 3, 4, 4) and isinstance(targets, list) and tasks.tolist() == [1, 1]
    _, labels, _ = collate([(torch.zeros(3, 4, 4), 3, 2), (torch.zeros(3, 4, 4), 5, 2)])
    assert labels.tolist() == [3, 5]
    _, masks, _ = collate([(torch.zeros(3, 4, 4), torch.zeros(5, 6), 0), (torch.zeros(3, 4, 4), torch.zeros(7, 6), 0)])
    assert [m.shape[0] for m in masks] == [5, 7]


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("categories"), "not a COCO detection file: missing categories"),
    (lambda d: d["annotations"][0].update(image_id=999), "points to missing image id 999"),
    (lambda d: d["annotations"][0].update(bbox=[10, 5, -3, 8]), r"bbox \[10, 5, -3, 8\]: width and height must be > 0"),
    (lambda d: d["annotations"][0].update(category_id=77), "category_id 77 not in categories"),
    (lambda d: d["annotations"][0].update(bbox=[0, 0, 5000, 10]), "outside the"),
])
def test_bad_coco_json_names_the_file_and_the_problem(tiny_root, tmp_path, edit, message):
    data = json.loads((tiny_root / "mini_coco_det" / "train" / "annotations.json").read_text())
    edit(data)
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ClbenchError, match=f"annotations.json: .*{message}"):
        load_coco_json(path)


def test_rgb_masks_and_out_of_range_values_are_rejected(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "rgb.png")
    with pytest.raises(ClbenchError, match="rgb.png: mask mode RGB: expected a palette"):
        read_mask(tmp_path / "rgb.png", 6, (4, 4))
    Image.fromarray(np.full((4, 4), 9, dtype=np.uint8), mode="L").save(tmp_path / "nine.png")
    with pytest.raises(ClbenchError, match=r"nine.png: mask values \[9\] outside 0..5 and 255"):
        read_mask(tmp_path / "nine.png", 6, (4, 4))
    with pytest.raises(ClbenchError, match="nine.png: mask is 4x4, its image is 5x4"):
        read_mask(tmp_path / "nine.png", 10, (4, 5))


def test_truncated_image_is_a_clear_error(tiny_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tiny_root, root)
    image = sorted((root / "imagenette_160" / "val").rglob("*.jpg"))[0]
    image.write_bytes(image.read_bytes()[:200])
    task = load_task(root, "cls", image_size=32)
    index = [p for p, _ in task.test.samples].index(image)
    with pytest.raises(ClbenchError, match=f"{image.name}: unreadable or truncated image"):
        task.test[index]


def test_class_folders_must_match_between_splits(tiny_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tiny_root, root)
    (root / "imagenette_160" / "val" / "tench").rename(root / "imagenette_160" / "val" / "trench")
    with pytest.raises(ClbenchError, match="class folders .* differ from the training split's"):
        load_task(root, "cls", image_size=32)


def test_cli_data_synth_writes_the_three_datasets(tmp_path, capsys):
    from clbench.cli import main
    assert main(["data", "synth", "--out", str(tmp_path / "s"), "--n-train", "10", "--n-val", "10"]) == 0
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["imagenette_160", "mini_coco_det", "mini_voc_seg",
                                                                  "synth.json"]
    assert "synthetic benchmark written to" in capsys.readouterr().out
