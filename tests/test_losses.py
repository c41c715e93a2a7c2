import math

import pytest
import torch

from clbench.losses import assign_targets, cls_loss, det_loss, seg_loss

BIG = 30.0  # a logit this size is a certainty in float32


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def perfect_det_prediction(box, label, anchors, stride, grid, num_classes):
    """Hand-built raw output whose decode is exactly ``box`` at its assigned cell and anchor."""
    raw = torch.full((1, len(anchors), *grid, 5 + num_classes), -BIG)
    cx, cy, w, h = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, box[2] - box[0], box[3] - box[1]
    gx, gy = int(cx // stride), int(cy // stride)
    a = 1  # the test boxes are chosen to match anchor 1 best
    aw, ah = anchors[a]
    raw[0, a, gy, gx, :4] = torch.tensor([logit((cx / stride - gx + 0.5) / 2), logit((cy / stride - gy + 0.5) / 2),
                                          logit(math.sqrt(w / aw) / 2), logit(math.sqrt(h / ah) / 2)])
    raw[0, a, gy, gx, 4] = BIG
    raw[0, a, gy, gx, 5 + label] = BIG
    return raw


ANCHORS = torch.tensor([[8.0, 8.0], [24.0, 20.0], [60.0, 60.0]])


def test_assignment_picks_the_centre_cell_and_best_shaped_anchor():
    targets = [{"boxes": torch.tensor([[10.0, 30.0, 34.0, 50.0]]), "labels": torch.tensor([3])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    img, anc, gy, gx, boxes, labels = assign_targets(targets, ANCHORS, stride=16, grid=(4, 4))
    assert (img.tolist(), anc.tolist(), gy.tolist(), gx.tolist(), labels.tolist()) == ([0], [1], [2], [1], [3])


def test_det_loss_is_zero_on_a_perfect_prediction_and_positive_otherwise():
    box, label = [10.0, 30.0, 34.0, 50.0], 3
    raw = perfect_det_prediction(box, label, ANCHORS.tolist(), 16, (4, 4), 5)
    targets = [{"boxes": torch.tensor([box]), "labels": torch.tensor([label])}]
    assert det_loss(raw, targets, ANCHORS, 16).item() == pytest.approx(0.0, abs=1e-5)
    wrong_class = raw.clone()
    wrong_class[0, 1, 2, 1, 5 + label], wrong_class[0, 1, 2, 1, 5] = -BIG, BIG
    shifted = raw.clone()
    shifted[0, 1, 2, 1, 0] += 1.0
    for bad in (wrong_class, shifted, torch.zeros_like(raw)):
        assert det_loss(bad, targets, ANCHORS, 16).item() > 0.05


def test_det_loss_on_an_image_without_objects_is_objectness_only_and_finite():
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    assert det_loss(torch.full((1, 3, 4, 4, 10), -BIG), targets, ANCHORS, 16).item() == pytest.approx(0.0, abs=1e-6)
    assert det_loss(torch.zeros(1, 3, 4, 4, 10), targets, ANCHORS, 16).item() == pytest.approx(math.log(2), rel=1e-5)


def test_seg_loss_ignores_255_and_is_zero_on_a_perfect_prediction():
    masks = torch.tensor([[[0, 1], [255, 2]]], dtype=torch.uint8)
    logits = torch.full((1, 3, 2, 2), -BIG)
    for (y, x), c in {(0, 0): 0, (0, 1): 1, (1, 1): 2, (1, 0): 1}.items():
        logits[0, c, y, x] = BIG
    assert seg_loss(logits, masks).item() == pytest.approx(0.0, abs=1e-6)
    logits[0, :, 1, 0] = torch.tensor([BIG, -BIG, -BIG])  # the ignored pixel changes nothing
    assert seg_loss(logits, masks).item() == pytest.approx(0.0, abs=1e-6)
    assert seg_loss(torch.zeros(1, 3, 2, 2), masks).item() == pytest.approx(math.log(3), rel=1e-5)
    assert seg_loss(logits, torch.full_like(masks, 255)).item() == 0.0


def test_cls_loss_is_zero_on_a_perfect_prediction_and_log_c_on_a_uniform_one():
    labels = torch.tensor([2, 0])
    perfect = torch.full((2, 4), -BIG)
    perfect[0, 2] = perfect[1, 0] = BIG
    assert cls_loss(perfect, labels).item() == pytest.approx(0.0, abs=1e-6)
    assert cls_loss(torch.zeros(2, 4), labels).item() == pytest.approx(math.log(4), rel=1e-6)
