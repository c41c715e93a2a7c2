"""Benchmark files and the class-incremental rules (DESIGN.md §8), on hand-built masks and boxes."""

from __future__ import annotations

import numpy as np
import pytest

from clbench import ClbenchError
from clbench.incremental import (
    ClassSteps,
    det_joins,
    group_name,
    kept_boxes,
    seg_joins,
    seg_test_joins,
    seg_test_table,
    seg_train_table,
)
from clbench.protocol import load_protocol, one_per_task, parse_protocol, shipped_protocols

VOC = tuple(f"c{i}" for i in range(21))
OLD, NEW = tuple(range(0, 16)), (16, 17, 18, 19, 20)

# a hand-built 2x4 mask: background, a 255 border, an old class (3), a current one (17)
MASK = np.array([[0, 255, 3, 3], [17, 17, 255, 0]], dtype=np.uint8)


@pytest.mark.parametrize("mode, expected", [
    ("overlapped", [[0, 255, 0, 0], [17, 17, 255, 0]]),   # the old class is background
    ("disjoint", [[0, 255, 0, 0], [17, 17, 255, 0]]),     # only current classes labelled
    ("sequential", [[0, 255, 3, 3], [17, 17, 255, 0]]),   # old classes kept
])
def test_training_labels_per_mode(mode, expected):
    table = seg_train_table(21, OLD, NEW, mode)
    assert table[MASK].tolist() == expected
    assert table[255] == 255   # the border stays ignored in every mode


def test_a_future_class_is_background_in_overlapped_training():
    mask = np.array([[0, 5, 17]], dtype=np.uint8)   # step 2 of 15-1 introduces 16; 17 is future, 5 old
    assert seg_train_table(21, OLD, (16,), "overlapped")[mask].tolist() == [[0, 0, 0]]


@pytest.mark.parametrize("present, mode, joins", [
    ({0, 3, 17, 255}, "overlapped", True),     # any current class
    ({0, 3, 17, 255}, "disjoint", True),       # old + current + background only
    ({0, 3, 17, 255}, "sequential", True),
    ({0, 17, 16}, "disjoint", True),
    ({0, 3, 255}, "overlapped", False),        # no current class
    ({0, 3}, "sequential", False),
])
def test_which_images_join_a_step(present, mode, joins):
    assert seg_joins(present, OLD, NEW, mode) is joins


def test_a_future_class_keeps_an_image_out_of_disjoint_and_sequential_only():
    present, old, new = {0, 16, 18}, OLD, (16,)    # 15-1, step 2: 18 is a future class
    assert seg_joins(present, old, new, "overlapped")
    assert not seg_joins(present, old, new, "disjoint")
    assert not seg_joins(present, old, new, "sequential")


def test_an_image_of_background_and_border_only_joins_no_step():
    steps = ClassSteps((OLD, NEW))
    for mode in ("overlapped", "disjoint", "sequential"):
        assert not any(seg_joins({0, 255}, steps.old(k), steps.new(k), mode) for k in range(2))
    assert not seg_test_joins({0, 255}, steps.all)


def test_test_masks_reveal_seen_classes_and_ignore_future_ones():
    table = seg_test_table(21, OLD)                 # after the first step of 15-5
    assert table[MASK].tolist() == [[0, 255, 3, 3], [255, 255, 255, 0]]
    assert seg_test_joins({0, 3}, OLD) and not seg_test_joins({0, 17, 255}, OLD)
    assert seg_test_table(21, OLD + NEW)[MASK].tolist() == MASK.tolist()


def test_detection_steps_keep_only_the_steps_boxes():
    labels = np.array([0, 7, 4, 9])
    assert kept_boxes(labels, range(5, 10)).tolist() == [False, True, False, True]
    assert det_joins({0, 4}, range(0, 5)) and not det_joins({7}, range(0, 5))


def test_class_steps_old_new_future_and_group_names():
    steps = ClassSteps(((0, 1, 2), (3,), (4, 5)))
    assert steps.old(1) == (0, 1, 2) and steps.new(1) == (3,) and steps.future(1) == (4, 5)
    assert steps.seen(-1) == () and steps.all == (0, 1, 2, 3, 4, 5)
    assert [group_name(c) for c in ((0, 1, 2), (3,), (4, 6), ())] == ["0-2", "3", "4,6", "none"]


def test_every_shipped_benchmark_loads_and_covers_its_classes():
    shipped = shipped_protocols()
    expected = {"seg-det-cls", "coco-5+5", "seg15-det-seg5"} | {
        f"voc-{split}-{mode}" for split in ("15-5", "15-1", "10-1") for mode in ("overlapped", "disjoint", "sequential")}
    assert set(shipped) == expected
    for name in shipped:
        protocol = load_protocol(name)
        for task in protocol.tasks:
            n = 10 if task.kind == "det" else 21
            assert protocol.class_steps(task.name, tuple(f"c{i}" for i in range(n))).all == tuple(range(n))
    steps = load_protocol("voc-10-1-overlapped").class_steps("seg", VOC)
    assert steps.steps[0] == tuple(range(11)) and steps.steps[1:] == tuple((c,) for c in range(11, 21))
    assert load_protocol("seg15-det-seg5").order == ("seg", "det")


def test_the_default_benchmark_is_what_tasks_and_order_stand_for():
    shipped = load_protocol("seg-det-cls")
    built = one_per_task({"seg": "seg", "det": "det", "cls": "cls"}, ("seg", "det", "cls"))
    assert (shipped.tasks, shipped.experiences) == (built.tasks, built.experiences)
    assert not shipped.incremental


def test_class_names_and_lists_resolve():
    protocol = parse_protocol({"tasks": {"d": {"kind": "det"}},
                               "experiences": [{"task": "d", "classes": ["c0", 1, "2-3"]},
                                               {"task": "d", "classes": "4-9"}]}, "x", "x.yaml")
    assert protocol.class_steps("d", VOC[:10]).steps == ((0, 1, 2, 3), tuple(range(4, 10)))


@pytest.mark.parametrize("data, message", [
    ([], "x.yaml: expected a mapping"),
    ({"tasks": {"s": {"kind": "seg"}}, "experiences": [{"task": "s"}], "extra": 1}, "unknown key 'extra'"),
    ({"tasks": {"s": {"kind": "sag"}}, "experiences": [{"task": "s"}]}, "tasks.s.kind: 'sag'"),
    ({"tasks": {"s": {"kind": "seg"}}, "experiences": [{"task": "t"}]}, "experiences[0].task: 't' is not a task"),
    ({"tasks": {"s": {"kind": "seg"}, "d": {"kind": "det"}}, "experiences": [{"task": "s"}]},
     "tasks.d: no experience trains it"),
    ({"tasks": {"s": {"kind": "seg"}}, "experiences": [{"task": "s", "classes": "0-9"},
                                                       {"task": "s", "classes": "10-20"}]}, "tasks.s.mode: a segm"),
    ({"tasks": {"s": {"kind": "seg", "mode": "overlap"}}, "experiences": [{"task": "s"}]}, "tasks.s.mode: 'overlap'"),
    ({"tasks": {"d": {"kind": "det", "mode": "disjoint"}}, "experiences": [{"task": "d"}]}, "modes are segmentation"),
    ({"synthetic": "voc20", "tasks": {"s": {"kind": "seg"}}, "experiences": [{"task": "s"}]}, "synthetic: 'voc20'"),
])
def test_bad_files_are_one_line_errors_naming_the_field(data, message):
    with pytest.raises(ClbenchError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_protocol(data, "x", "x.yaml")


@pytest.mark.parametrize("steps, message", [
    (["0-15", "15-20"], "class 15 is introduced twice"),
    (["0-14", "16-20"], r"classes \[15\] are never introduced"),
    (["1-15", "0"], r"background \(0\) belongs to the first"),
    (["0-15", "16-21"], "class 21 out of range"),
    (["0-15", "twenty"], "'twenty' is neither"),
    (["0-15", "20-16"], "runs backwards"),
    (["0-15", None], "each must list its classes"),
])
def test_bad_class_splits_name_the_experience(steps, message):
    experiences = [{"task": "s", **({"classes": c} if c is not None else {})} for c in steps]
    protocol = parse_protocol({"tasks": {"s": {"kind": "seg", "mode": "overlapped"}}, "experiences": experiences},
                              "x", "x.yaml")
    with pytest.raises(ClbenchError, match=r"x\.yaml: .*" + message):
        protocol.class_steps("s", VOC)


def test_unknown_names_and_broken_files(tmp_path):
    with pytest.raises(ClbenchError, match="no such file, and clbench ships no benchmark.*did you mean 'voc-15-5-"):
        load_protocol("voc-15-5-overlaped")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [\n")
    with pytest.raises(ClbenchError, match="bad.yaml: not valid YAML"):
        load_protocol(str(bad))
