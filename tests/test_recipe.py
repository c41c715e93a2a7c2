"""The recipe's run settings: the learning-rate schedule, detection's target assignment, fitted anchors."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from clbench import ClbenchError
from clbench.anchors import DEFAULT_ANCHORS, fit_anchors, mean_best_iou, parse_anchors
from clbench.cli import main
from clbench.config import RunConfig, resolve
from clbench.loop import lr_factor, scheduler
from clbench.losses import assign_targets, det_loss
from clbench.run import run
from clbench.runtime import ModelConfig


def recorded_lrs(schedule: torch.optim.lr_scheduler.LRScheduler, optimizer: torch.optim.Optimizer, steps: int) -> list:
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return lrs


@pytest.mark.parametrize("steps,warmup", [(100, 0.1), (37, 0.05), (12, 0.5)])
def test_warmup_cosine_equals_torchs_linear_then_cosine_annealing(steps, warmup):
    """Our schedule against torch's own: LinearLR from 1/W to 1 over W steps, then CosineAnnealingLR to 0."""
    param = torch.nn.Parameter(torch.zeros(1))
    ours_opt, ref_opt = torch.optim.SGD([param], lr=0.3), torch.optim.SGD([param], lr=0.3)
    warm = math.ceil(warmup * steps)
    reference = torch.optim.lr_scheduler.SequentialLR(ref_opt, [
        torch.optim.lr_scheduler.LinearLR(ref_opt, start_factor=1 / warm, end_factor=1.0, total_iters=warm - 1),
        torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=steps - warm, eta_min=0.0)], milestones=[warm])
    ours = recorded_lrs(scheduler(ours_opt, steps, "cosine", warmup), ours_opt, steps)
    theirs = recorded_lrs(reference, ref_opt, steps)
    assert ours == pytest.approx(theirs, abs=1e-12)
    assert ours[0] == pytest.approx(0.3 / warm) and max(ours) == pytest.approx(0.3)


def test_constant_schedule_without_warmup_leaves_the_learning_rate_alone():
    assert [lr_factor(s, 50, "constant", 0.0) for s in range(50)] == [1.0] * 50
    assert [lr_factor(s, 10, "constant", 0.3) for s in range(10)] == [1 / 3, 2 / 3, 1.0] + [1.0] * 7
    assert lr_factor(0, 10, "cosine", 0.0) == 1.0 and lr_factor(5, 10, "cosine", 0.0) == pytest.approx(0.5)


def test_schedule_and_warmup_are_validated():
    with pytest.raises(ClbenchError, match="warmup = 1.0: expected a fraction in"):
        RunConfig(warmup=1.0)
    with pytest.raises(ClbenchError, match="schedule = 'step': expected one of constant, cosine"):
        RunConfig(schedule="step")


ANCHORS = torch.tensor([[8.0, 8.0], [24.0, 20.0], [60.0, 60.0]])


def test_yolov5_assignment_takes_every_fitting_anchor_in_three_cells():
    """A 20 x 16 box centred at (22, 41) on a stride-16 grid: centre cell (gx 1, gy 2), fractions (0.375, 0.5625)
    so the left (gx 0) and lower (gy 3) neighbours; every anchor is within 4x of its sides (8x8: 2.5, 24x20: 1.25,
    60x60: 3.75), so 3 anchors x 3 cells. ``centre`` takes one: anchor 24x20 in the centre cell."""
    targets = [{"boxes": torch.tensor([[12.0, 33.0, 32.0, 49.0]]), "labels": torch.tensor([2])}]
    img, anc, gy, gx, boxes, labels = assign_targets(targets, ANCHORS, stride=16, grid=(4, 4), assign="yolov5")
    got = sorted(zip(anc.tolist(), gy.tolist(), gx.tolist()))
    assert got == sorted((a, y, x) for a in (0, 1, 2) for y, x in ((2, 1), (2, 0), (3, 1)))
    assert labels.tolist() == [2] * 9 and img.tolist() == [0] * 9
    centre = assign_targets(targets, ANCHORS, stride=16, grid=(4, 4), assign="centre")
    assert [t.tolist() for t in centre[1:4]] == [[1], [2], [1]]


def test_yolov5_assignment_drops_neighbours_outside_the_grid_and_keeps_the_best_anchor_of_an_odd_box():
    """A 6 x 3 box in the top-left corner: only anchor 8x8 fits (24/6 = 4 is not < 4), both neighbours (left, up)
    lie outside the grid. A 60 x 4 sliver fits no anchor within 4x: it keeps its best by shape IoU (24x20: 0.154
    against 0.118 and 0.067), in its cell (gx 1, gy 0) and the right neighbour (x fraction 0.875); up is outside."""
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 6.0, 3.0]]), "labels": torch.tensor([0])},
               {"boxes": torch.tensor([[0.0, 0.0, 60.0, 4.0]]), "labels": torch.tensor([1])}]
    img, anc, gy, gx, _, labels = assign_targets(targets, ANCHORS, stride=16, grid=(4, 4), assign="yolov5")
    assert sorted(zip(img.tolist(), anc.tolist(), gy.tolist(), gx.tolist(), labels.tolist())) == [
        (0, 0, 0, 0, 0), (1, 1, 0, 1, 1), (1, 1, 0, 2, 1)]


def test_det_loss_under_both_assignments_is_finite_and_differs():
    torch.manual_seed(0)
    raw = torch.randn(2, 3, 4, 4, 7)
    targets = [{"boxes": torch.tensor([[12.0, 33.0, 32.0, 49.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    centre, yolo = (det_loss(raw, targets, ANCHORS, 16, a) for a in ("centre", "yolov5"))
    assert torch.isfinite(centre) and torch.isfinite(yolo) and not torch.isclose(centre, yolo)


def test_kmeans_anchors_find_three_clusters_of_box_shapes_sorted_by_area():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.4, 0.5], [0.03, 0.06], [0.12, 0.1]], dtype=torch.float64)
    sizes = torch.cat([c * (1 + 0.05 * torch.randn(40, 2, generator=generator, dtype=torch.float64)) for c in centres])
    anchors = fit_anchors(sizes)
    expected = [centres[i] for i in (1, 2, 0)]
    for got, want in zip(anchors, expected):
        assert got == pytest.approx(tuple(want.tolist()), rel=0.05)
    assert mean_best_iou(sizes, anchors) > 0.85 > mean_best_iou(sizes, DEFAULT_ANCHORS)
    # each anchor is the median of the boxes nearest it (by shape IoU): recompute from the fitted assignment
    member = torch.tensor([[min(w, a[0]) * min(h, a[1]) / (w * h + a[0] * a[1] - min(w, a[0]) * min(h, a[1]))
                            for a in anchors] for w, h in sizes.tolist()]).argmax(1)
    for j, anchor in enumerate(anchors):
        assert anchor == pytest.approx(tuple(sizes[member == j].median(0).values.tolist()), abs=1e-6)


def test_kmeans_needs_enough_boxes_and_anchor_settings_are_validated():
    with pytest.raises(ClbenchError, match="kmeans needs at least 3 training boxes, the detection tasks have 2"):
        fit_anchors(torch.rand(2, 2))
    assert parse_anchors("0.1,0.2; 0.3,0.4") == "0.1,0.2;0.3,0.4" and parse_anchors([[0.5, 0.5]]) == "0.5,0.5"
    with pytest.raises(ClbenchError, match=r"anchors = '0.1,2': expected default, kmeans or W,H;W,H;... with every W"):
        RunConfig(anchors="0.1,2")
    with pytest.raises(ClbenchError, match="anchors = 'big': expected default, kmeans or W,H"):
        RunConfig(anchors="big")


def test_model_config_keeps_anchors_and_reads_old_checkpoints_without_them():
    config = ModelConfig("b", 8, 8, 64, ("det",), anchors=((0.1, 0.2), (0.3, 0.3)))
    assert ModelConfig.from_dict(config.to_dict()) == config
    old = {k: v for k, v in config.to_dict().items() if k != "anchors"}
    assert ModelConfig.from_dict(old).anchors == DEFAULT_ANCHORS


@pytest.mark.slow
def test_a_recipe_run_fits_anchors_records_them_and_eval_rebuilds_the_same_network(tiny_args, capsys):
    """kmeans anchors, yolov5 assignment, warm-up + cosine: config.yaml and the checkpoint keep the fitted values,
    a resumed configuration matches, and `clbench eval` reproduces the recorded metrics."""
    args = {**tiny_args, "run_id": "recipe", "anchors": "kmeans", "assign": "yolov5", "schedule": "cosine",
            "warmup": "0.1"}
    run_dir = run(resolve(None, args))
    saved = resolve(run_dir / "config.yaml", {})
    assert saved.anchors not in ("kmeans", "default") and len(saved.anchors.split(";")) == 3
    ckpt = torch.load(run_dir / "checkpoints" / "stage3.pt", map_location="cpu", weights_only=True)
    assert ";".join(f"{w:.6g},{h:.6g}" for w, h in ckpt["model_config"]["anchors"]) == saved.anchors
    capsys.readouterr()
    assert main(["eval", "--weights", str(run_dir / "checkpoints" / "stage3.pt"), "--data-root",
                 tiny_args["data_root"], "--tasks", "det", "--device", "cpu"]) == 0
    rows = pd.read_csv(run_dir / "metrics.csv")
    final = rows[(rows.stage == 3) & (rows.eval_task == "det") & (rows.metric == "mAP")]["value"].item()
    assert capsys.readouterr().out.strip() == f"det: mAP {final:.4f}"


def test_shipped_configs_are_found_by_name_and_listed(capsys):
    config = resolve("real-mini", {"epochs": "det=3"})
    assert config.pretrained == "lite0" and config.backbone == "tf_efficientnet_lite0" and config.val_fraction > 0
    assert config.epochs["det"] == 3 and config.anchors == "kmeans"   # flags beside it win
    assert resolve("real-mini.yaml", {}) == resolve("real-mini", {})
    assert main(["configs"]) == 0
    assert capsys.readouterr().out.startswith("real-mini  [")
    with pytest.raises(ClbenchError, match="real-mni: config file not found, and clbench ships no configuration of that "
                                          r"name \(shipped: real-mini\); did you mean 'real-mini'\?"):
        resolve("real-mni", {})
