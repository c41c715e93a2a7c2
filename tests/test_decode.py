import math

import torch

from clbench.decode import boxes_to_original, decode_boxes, decode_detections, seg_labels


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_decode_boxes_follows_the_documented_formula():
    raw = torch.zeros(1, 1, 2, 3, 6)
    # cell (gy=1, gx=2): σ(tx)=0.75 → cx = (1.5 - 0.5 + 2)·16 = 48; σ(ty)=0.25 → cy = (0.5 - 0.5 + 1)·16 = 16
    # σ(tw)=0.5 → w = 20·1² = 20; σ(th)=0.75 → h = 10·1.5² = 22.5
    raw[0, 0, 1, 2, :4] = torch.tensor([logit(0.75), logit(0.25), logit(0.5), logit(0.75)])
    boxes = decode_boxes(raw, torch.tensor([[20.0, 10.0]]), stride=16)
    torch.testing.assert_close(boxes[0, 0, 1, 2], torch.tensor([38.0, 4.75, 58.0, 27.25]))


def test_boxes_map_back_to_original_image_coordinates():
    # input 128x128 resized from an original 100 (h) x 200 (w) image
    boxes = torch.tensor([[32.0, 64.0, 96.0, 128.0], [-5.0, 0.0, 140.0, 10.0]])
    out = boxes_to_original(boxes, (128, 128), (100, 200))
    torch.testing.assert_close(out, torch.tensor([[50.0, 50.0, 150.0, 100.0], [0.0, 0.0, 200.0, 7.8125]]))


def test_detections_are_scored_by_objectness_times_class_probability_and_nms_per_class():
    raw = torch.full((1, 1, 2, 2, 5 + 2), -20.0)
    raw[..., :4] = 0.0
    raw[0, 0, 0, 0, 4], raw[0, 0, 0, 0, 5] = 20.0, 20.0   # cell (0,0): sure object of class 0
    raw[0, 0, 0, 1, 4], raw[0, 0, 0, 1, 6] = 0.0, 20.0    # cell (0,1): objectness 0.5, class 1
    out = decode_detections(raw, torch.tensor([[8.0, 8.0]]), stride=8, conf_thresh=0.1)[0]
    assert out["labels"].tolist() == [0, 1]
    torch.testing.assert_close(out["scores"], torch.tensor([1.0, 0.5]))
    # overlapping boxes of the same class: NMS keeps the better one only
    raw[0, 0, 0, 1, 5], raw[0, 0, 0, 1, 6] = 20.0, -20.0
    raw[0, 0, 0, 1, :4] = raw[0, 0, 0, 0, :4]
    raw[0, 0, 0, 1, 0] = logit(0.25)  # shift left by 4 px of an 8 px box: IoU = 1/3 < 0.6 keeps both
    assert len(decode_detections(raw, torch.tensor([[8.0, 8.0]]), stride=8, conf_thresh=0.1, iou_thresh=0.3)[0]["labels"]) == 1


def test_max_detections_caps_the_output():
    raw = torch.zeros(1, 3, 8, 8, 5 + 4)
    out = decode_detections(raw, torch.ones(3, 2) * 8, stride=8, max_det=100)[0]
    assert len(out["scores"]) == 100


def test_seg_labels_upsample_logits_before_the_argmax():
    logits = torch.zeros(2, 1, 2)
    logits[1, 0, 1] = 1.0   # class 1 wins in the right input pixel only
    # bilinear 2 → 4 samples the input at x = -0.25, 0.25, 0.75, 1.25: class-1 logits 0, .25, .75, 1 vs 0.
    # An argmax first and a nearest upsample after would give [0, 0, 1, 1].
    labels = seg_labels(logits, (3, 4))
    assert labels.tolist() == [[0, 1, 1, 1]] * 3


def test_seg_labels_equal_a_plain_float64_upsample_and_argmax_for_any_memory_format():
    torch.manual_seed(0)
    batch = torch.randn(3, 6, 5, 7).contiguous(memory_format=torch.channels_last)
    for logits in (*batch, *batch.contiguous()):
        expected = torch.nn.functional.interpolate(logits[None].double(), size=(19, 23), mode="bilinear",
                                                   align_corners=False)[0].argmax(0)
        assert torch.equal(seg_labels(logits, (19, 23)), expected)
