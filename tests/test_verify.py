import json
import shutil

import pytest
import torch
from torchvision import tv_tensors

from clbench import ClbenchError
from clbench.benchmarks import load_task
from clbench.benchmarks.images import train_transform
from clbench.benchmarks.verify import verify
from clbench.config import resolve
from clbench.run import run


@pytest.fixture
def root(tiny_root, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(tiny_root, copy)
    return copy


def test_verify_counts_images_per_split_and_class(root):
    report = verify(root)
    assert report["cls"]["val"]["images"] == 10 and sum(report["cls"]["val"]["per_class"].values()) == 10
    assert report["seg"]["train"]["images"] == 12 and "background" in report["seg"]["train"]["per_class"]
    assert report["det"]["train"]["images"] == 12


def test_common_layout_variants_are_accepted(root):
    det = root / "mini_coco_det"
    (det / "annotations").mkdir()
    for split in ("train", "val"):
        (det / split / "annotations.json").rename(det / "annotations" / f"instances_{split}.json")
        (det / split / "images").rename(det / split / "JPEGImages")
        seg = root / "mini_voc_seg" / split
        (seg / "JPEGImages").rename(seg / "images")
        (seg / "SegmentationClass").rename(seg / "masks")
    report = verify(root)
    assert report["det"]["val"]["images"] == 10 and report["seg"]["val"]["images"] == 10
    assert len(load_task(root, "det", image_size=32).train) == 12


def test_every_image_in_two_splits_is_listed_not_only_the_first(root):
    cls = root / "imagenette_160"
    sources = sorted((cls / "train" / "tench").iterdir())[:2] + sorted((cls / "train" / "church").iterdir())[:1]
    copies = [cls / "val" / src.parent.name / f"copy{i}.jpg" for i, src in enumerate(sources)]
    for src, copy in zip(sources, copies):
        shutil.copy(src, copy)
    with pytest.raises(ClbenchError) as caught:
        verify(root)
    message = str(caught.value)
    assert "3 images are in both splits" in message and len(message.splitlines()) == 1
    for src, copy in zip(sources, copies):
        assert f"train/{src.parent.name}/{src.name} = val/{copy.parent.name}/{copy.name}" in message


def test_an_empty_split_is_refused(root):
    shutil.rmtree(root / "mini_voc_seg" / "val" / "JPEGImages")
    (root / "mini_voc_seg" / "val" / "JPEGImages").mkdir()
    with pytest.raises(ClbenchError, match="mini_voc_seg/val: empty split, no images"):
        verify(root)


def test_a_missing_mask_names_the_file(root):
    mask = sorted((root / "mini_voc_seg" / "train" / "SegmentationClass").iterdir())[2]
    mask.unlink()
    with pytest.raises(ClbenchError, match=f"{mask.name}: mask file not found"):
        verify(root)


def test_json_that_is_not_coco_is_refused(root):
    (root / "mini_coco_det" / "val" / "annotations.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ClbenchError, match="annotations.json: not a COCO detection file: missing annotations, categories"):
        verify(root)


def test_run_refuses_bad_data_before_training_and_writes_nothing(root, tiny_args, tmp_path):
    image = sorted((root / "mini_coco_det" / "val" / "images").iterdir())[0]
    image.write_bytes(image.read_bytes()[:100])
    out = tmp_path / "out"
    with pytest.raises(ClbenchError, match=f"{image.name}: unreadable or truncated image"):
        run(resolve(None, {**tiny_args, "data_root": str(root), "out": str(out)}))
    assert not out.exists()


def test_augmentation_moves_boxes_and_masks_with_the_pixels():
    torch.manual_seed(0)
    picture = torch.zeros(3, 60, 80, dtype=torch.uint8)
    picture[:, 10:30, 50:70] = 255                        # a white object, top right
    mask = torch.zeros(60, 80, dtype=torch.uint8)
    mask[10:30, 50:70] = 1
    transform = train_transform(48, boxes=True)
    for _ in range(20):
        boxes = tv_tensors.BoundingBoxes([[50.0, 10.0, 70.0, 30.0]], format="XYXY", canvas_size=(60, 80))
        x, target = transform(tv_tensors.Image(picture), {"boxes": boxes, "labels": torch.tensor([3]),
                                                          "mask": tv_tensors.Mask(mask)})
        m = target["mask"]
        bright, obj = x.mean(0) > 0.5, m.bool()
        if obj.sum() > 20:                                # the mask followed the object (edges interpolate)
            assert (bright & obj).sum() / (bright | obj).sum() > 0.8
        if len(target["boxes"]):
            x0, y0, x1, y1 = target["boxes"][0].tolist()
            ys, xs = torch.nonzero(m, as_tuple=True)          # the box is the mask's extent, to a pixel
            assert abs(xs.min() - x0) <= 1 and abs(ys.min() - y0) <= 1 and abs(xs.max() + 1 - x1) <= 1.5
            assert abs(ys.max() + 1 - y1) <= 1.5 and target["labels"].tolist() == [3]
        else:
            assert m.sum() < 2 * 48                           # dropped only when cropped (nearly) away


def test_evaluation_is_never_augmented(tiny_root):
    task = load_task(tiny_root, "cls", image_size=32, augment=True)
    assert torch.equal(task.test[0][0], task.test[0][0])
    assert not torch.equal(task.train[0][0], task.train[0][0])  # random per call


@pytest.mark.parametrize("kind", ["seg", "det", "cls"])
def test_every_task_trains_with_augmentation(tiny_root, kind):
    task = load_task(tiny_root, kind, image_size=32, augment=True)
    x, target = task.train[1]
    assert x.shape == (3, 32, 32)
    if kind == "seg":
        assert target.shape == (32, 32)
    if kind == "det":
        assert target["boxes"].shape[0] == target["labels"].shape[0]
