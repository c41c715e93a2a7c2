"""--val-fraction: a validation split held out of each task's training images, evaluated like the test set, the
split column of metrics.csv, and grids (over strategy options and run settings) picked on it."""

from __future__ import annotations

import json
from collections import Counter

import pandas as pd
import pytest
from conftest import compare_flags, write_views

from clbench import ClbenchError
from clbench.benchmarks import load_task, validation_indices
from clbench.cli import main
from clbench.compare import CompareSettings, cells
from clbench.config import resolve
from clbench.reader import RunData
from clbench.run import run


def test_validation_indices_are_seeded_by_the_data_seed_and_task_only_and_stratified():
    labels = [c for c in range(5) for _ in range(8)]   # 5 classes x 8 images
    held = validation_indices(40, 0.25, 0, "cls", labels)
    assert held == validation_indices(40, 0.25, 0, "cls", labels) == sorted(held)
    assert Counter(labels[i] for i in held) == {c: 2 for c in range(5)}
    assert held != validation_indices(40, 0.25, 1, "cls", labels)
    assert validation_indices(40, 0.25, 0, "det") != validation_indices(40, 0.25, 0, "seg")
    assert len(validation_indices(40, 0.2, 0, "det")) == 8
    # a class of one image keeps it for training; a class of two gives one; never a whole class
    uneven = [0] + [1, 1] + [2] * 10
    held = validation_indices(13, 0.1, 0, "cls", uneven)
    assert Counter(uneven[i] for i in held) == {1: 1, 2: 1}


def test_a_task_split_holds_out_images_read_as_the_test_set_is(tiny_root):
    full = load_task(tiny_root, "det", image_size=64)
    split = load_task(tiny_root, "det", image_size=64, val_fraction=0.25, val_seed=3)
    assert len(split.train) + len(split.validation) == len(full.train) and len(split.validation) == 3
    train_ids = {img["id"] for img in split.train.images}
    held_ids = {img["id"] for img in split.validation.images}
    assert not train_ids & held_ids and train_ids | held_ids == {img["id"] for img in full.train.images}
    coco = split.validation_coco
    assert {img["id"] for img in coco["images"]} == held_ids
    assert {a["image_id"] for a in coco["annotations"]} <= held_ids and coco["categories"] == full.train.coco["categories"]
    assert len(split.train.box_sizes()) + sum(1 for a in coco["annotations"] if not a.get("iscrowd")) == \
        len(full.train.box_sizes())
    _, target = split.validation[0]
    assert target["orig_size"] == (split.validation.images[0]["height"], split.validation.images[0]["width"])
    seg = load_task(tiny_root, "seg", image_size=64, val_fraction=0.25)
    image, mask = seg.validation[0]
    assert image.shape[-2:] == (64, 64) and mask.shape != (64, 64)   # the original resolution, as the test set's
    assert not seg.validation.train and seg.train.train
    with pytest.raises(ClbenchError, match="--val-fraction 0.5: task 'cls' has 1 training images, too few"):
        from clbench.benchmarks import TaskData, split_validation
        cls = load_task(tiny_root, "cls", image_size=64)
        one = TaskData(cls.spec, cls.train.restrict([0]), cls.test)
        split_validation(one, cls.train, 0.5, 0)


def test_a_run_evaluates_both_splits_after_every_stage_and_views_read_the_test_rows(tiny_args):
    run_dir = run(resolve(None, {**tiny_args, "run_id": "val", "val_fraction": "0.25"}))
    rows = pd.read_csv(run_dir / "metrics.csv")
    assert list(rows.columns).index("split") == list(rows.columns).index("eval_task") + 1
    env = json.loads((run_dir / "env.json").read_text())["validation"]
    assert env["fraction"] == 0.25 and env["images"]["det"] == {"train": 9, "validation": 3, "test": 10}
    primary = rows[rows.metric.isin(["mIoU", "mAP", "top1"])]
    assert Counter(zip(primary.stage, primary.split)) == {(s, p): 3 for s in range(4) for p in ("test", "validation")}
    held = primary[primary.split == "validation"]
    assert dict(zip(held.eval_task, held.n)) == {t: env["images"][t]["validation"] for t in ("seg", "det", "cls")}
    data = RunData.load(run_dir)
    assert set(data.rows.split) == {"test"} and set(data.validation.split) == {"validation"}
    assert len(data.rows) + len(data.validation) == len(rows)
    # own-BN attribution rows are test rows
    assert set(rows[rows.metric.str.endswith("_own_bn")].split) == {"test"}


def test_a_metrics_table_written_before_the_split_column_reads_as_test_rows(tiny_args):
    run_dir = run(resolve(None, {**tiny_args, "run_id": "old"}))
    rows = pd.read_csv(run_dir / "metrics.csv")
    rows.drop(columns="split").to_csv(run_dir / "metrics.csv", index=False)
    data = RunData.load(run_dir)
    assert set(data.rows.split) == {"test"} and data.validation.empty and len(data.rows) == len(rows)


def test_grid_over_run_settings_labels_cells_and_checks_values(tiny_args):
    base = resolve(None, tiny_args)
    settings = CompareSettings(strategies=("naive", "lwf"), seeds=(0,), reference=False, base=base,
                               grid=(("lwf.lam", ("1", "2")), ("lr.det", ("0.001", "0.0005"))))
    grid = {c.label: c.config for c in cells(settings)}
    assert set(grid) == {"naive[lr.det=0.001]", "naive[lr.det=0.0005]"} | {
        f"lwf[lam={a},lr.det={b}]" for a in ("1", "2") for b in ("0.001", "0.0005")}
    assert grid["naive[lr.det=0.0005]"].lr == {**base.lr, "det": 0.0005}
    assert grid["lwf[lam=2,lr.det=0.001]"].set == {"lwf.lam": "2"}
    with pytest.raises(ClbenchError, match=r"--grid warmup=1.5: expected a fraction in \[0, 1\)"):
        CompareSettings(strategies=("naive",), seeds=(0,), reference=False, base=base, grid=(("warmup", ("1.5",)),))
    with pytest.raises(ClbenchError, match="--grid lr.depth: unknown task 'depth', expected one of seg, det, cls"):
        CompareSettings(strategies=("naive",), seeds=(0,), reference=False, base=base, grid=(("lr.depth", ("1",)),))
    with pytest.raises(ClbenchError, match="--grid seed: expected STRATEGY.PARAM"):
        CompareSettings(strategies=("naive",), seeds=(0,), reference=False, base=base, grid=(("seed", ("1",)),))


@pytest.mark.slow
def test_a_grid_with_a_validation_split_is_picked_on_validation(tiny_args, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = {k: v for k, v in tiny_args.items() if k != "out"}
    assert main(["compare", "--strategies", "naive", "--seeds", "0", "--out", str(out), "--name", "g",
                 "--grid", "lr=0.002,0.0001", *compare_flags(args, val_fraction="0.25")]) == 0
    folder = write_views(out / "g")
    picked = json.loads((folder / "picked.json").read_text())
    acc = {}
    for label, cell in (("naive[lr=0.002]", "naive_lr=0.002-seed0"), ("naive[lr=0.0001]", "naive_lr=0.0001-seed0")):
        rows = pd.read_csv(folder / "runs" / cell / "metrics.csv")
        final = rows[(rows.stage == 3) & (rows.split == "validation") & rows.metric.isin(["mIoU", "mAP", "top1"])]
        acc[label] = final.value.mean()
    assert picked["picked"] == {"naive": max(acc, key=acc.get)}
    assert "on validation" in picked["sentence"] and "never on the test sets" in picked["sentence"]


@pytest.mark.slow
def test_a_grid_over_a_later_tasks_setting_shares_stage1_and_equals_its_own_run(tiny_args, tmp_path):
    """lr.cls=... cells share the cached stage 1 (a later task's rate cannot change it), and the cell that restored it
    ends exactly as the same configuration run alone."""
    args = {k: v for k, v in tiny_args.items() if k != "out"}
    settings = CompareSettings(strategies=("naive",), seeds=(0,), reference=False, base=resolve(None, args),
                               grid=(("lr.cls", ("0.002", "0.0005")),))
    from clbench.compare import compare
    folder = compare(settings, out=tmp_path / "cmp", name="g", progress=False)
    assert len(list((folder / "cache").glob("stage1-*.pt"))) == 1
    cell = folder / "runs" / "naive_lr.cls=0.0005-seed0"
    alone = run(resolve(None, {**args, "out": str(tmp_path / "alone"), "run_id": "a", "lr": "cls=0.0005"}))
    pd.testing.assert_series_equal(pd.read_csv(cell / "metrics.csv")["value"], pd.read_csv(alone / "metrics.csv")["value"])
