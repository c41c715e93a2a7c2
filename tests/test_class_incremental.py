"""Class-incremental benchmark files end to end (DESIGN.md §8): each step's training data against the masks and
annotations read directly, group metrics against per-class values, the tables per group, `clbench eval`."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_settings
from PIL import Image

from clbench import ClbenchError
from clbench.benchmarks import load_task
from clbench.benchmarks.steps import step_training_set
from clbench.benchmarks.synthetic import SynthSpec, generate
from clbench.bootstrap import interval
from clbench.config import RunConfig, resolve
from clbench.drop import change_within_noise
from clbench.incremental import MASKED, restrict_logits
from clbench.reader import RunData, load
from clbench.recorder import read_bootstrap, read_rows
from clbench.run import run

VOC21 = SynthSpec(seed=0, n_train=30, n_val=12, min_side=40, max_side=56, variant="voc21")


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("voc21") / "data", VOC21)


def raw_labels(root: Path, split: str) -> dict[str, set[int]]:
    """Each segmentation mask's label values, read with PIL alone."""
    folder = root / "mini_voc_seg" / split / "SegmentationClass"
    return {p.stem: set(np.unique(np.array(Image.open(p))).tolist()) for p in sorted(folder.glob("*.png"))}


def seg_task(root: Path, steps, mode: str):
    data = load_task(root, "seg", image_size=48)
    spec = data.spec.__class__(**{**data.spec.__dict__, "steps": steps, "mode": mode})
    return spec, data.train


STEPS_15_5 = (tuple(range(16)), (16, 17, 18, 19, 20))


@pytest.mark.parametrize("mode", ["overlapped", "disjoint", "sequential"])
def test_a_steps_training_images_and_labels_follow_its_mode(voc_root, mode):
    spec, train = seg_task(voc_root, STEPS_15_5, mode)
    labels = raw_labels(voc_root, "train")
    new = set(STEPS_15_5[1])
    for step in (0, 1):
        chosen = step_training_set(spec, train, step)
        current = set(STEPS_15_5[step]) - {0}
        old = set(STEPS_15_5[0]) if step else set()
        expected = sorted(stem for stem, present in labels.items() if present & current and
                          (mode == "overlapped" or present - {0, 255} <= old | current))
        assert sorted(p.stem for p in chosen.images) == expected and expected
        for k in range(len(chosen)):
            mask = set(chosen[k][1].unique().tolist())
            allowed = {0, 255} | current | (old if mode == "sequential" else set())
            assert mask <= allowed, (mode, step, mask)
    # an image holding base and new classes: overlapped puts it in the new step with its base pixels background,
    # sequential and disjoint keep it too (its classes are all old or current), sequential with its base pixels kept
    chosen = step_training_set(spec, train, 1)
    stems = [p.stem for p in chosen.images]
    mixed = next(stem for stem, present in labels.items() if present & new and present & set(range(1, 16)))
    assert mixed in stems
    mask = set(chosen[stems.index(mixed)][1].unique().tolist())
    assert bool(mask & set(range(1, 16))) == (mode == "sequential")


def test_detection_steps_keep_only_their_boxes(voc_root):
    data = load_task(voc_root, "det", image_size=48)
    spec = data.spec.__class__(**{**data.spec.__dict__, "steps": (tuple(range(5)), tuple(range(5, 10)))})
    coco = json.loads((voc_root / "mini_coco_det" / "train" / "annotations.json").read_text())
    with_late = {a["image_id"] for a in coco["annotations"] if a["category_id"] > 5}
    chosen = step_training_set(spec, data.train, 1)
    assert sorted(img["id"] for img in chosen.images) == sorted(with_late)
    for k in range(len(chosen)):
        labels = chosen[k][1]["labels"]
        assert len(labels) and bool((labels >= 5).all())


def test_masked_logits_take_no_part_in_the_loss_or_the_prediction():
    logits = torch.randn(2, 6, 4, 4, requires_grad=True)
    masked = restrict_logits(logits, "seg", (0, 1, 2))
    assert torch.equal(masked[:, 3:], torch.full_like(masked[:, 3:], MASKED))
    target = torch.randint(0, 3, (2, 4, 4))
    torch.nn.functional.cross_entropy(masked, target).backward()
    assert float(logits.grad[:, 3:].abs().max()) == 0.0 and float(logits.grad[:, :3].abs().max()) > 0
    assert int(masked.argmax(1).max()) <= 2
    det = restrict_logits(torch.zeros(1, 3, 2, 2, 5 + 10), "det", range(5))
    assert bool((det[..., 5 + 5:] == MASKED).all()) and bool((det[..., :5 + 5] == 0).all())
    assert restrict_logits(logits, "seg", None) is logits


@pytest.fixture(scope="module")
def overlapped_run(voc_root, tmp_path_factory) -> Path:
    args = tiny_settings(voc_root, out=str(tmp_path_factory.mktemp("runs")), protocol="voc-15-5-overlapped",
                         bootstrap="20", run_id="ov")
    return run(resolve(None, args))


def test_a_run_reports_each_class_group_from_the_stage_that_introduced_it(overlapped_run, voc_root):
    rows = read_rows(overlapped_run)
    seg = rows[rows.eval_task == "seg"]
    metrics = {s: set(seg[seg.stage == s].metric) for s in (0, 1, 2)}
    assert {"mIoU", "mIoU[0-15]"} <= metrics[1] and "mIoU[16-20]" not in metrics[1]
    assert {"mIoU", "mIoU[0-15]", "mIoU[16-20]"} <= metrics[2]
    per_class = pd.read_csv(overlapped_run / "per_class.csv")
    names = json.loads((overlapped_run / "tasks.json").read_text())[0]["classes"]
    for stage, group in ((1, range(16)), (2, range(16)), (2, range(16, 21))):
        ious = per_class[(per_class.stage == stage) & (per_class.eval_task == "seg") & (per_class.metric == "IoU")]
        by_name = ious.set_index("class")["value"]
        chosen = [float(by_name[names[c]]) for c in group if not math.isnan(by_name[names[c]])]
        name = f"mIoU[{min(group)}-{max(group)}]"
        value = float(seg[(seg.stage == stage) & (seg.metric == name)]["value"].iloc[0])
        assert value == pytest.approx(np.mean(chosen), abs=1e-12), (stage, name)
    # after stage 1 the new classes are neither predicted nor labelled: absent from the confusion matrix
    first = per_class[(per_class.stage == 1) & (per_class.eval_task == "seg") & (per_class.metric == "IoU")]
    assert first.set_index("class").loc[names[16:], "value"].isna().all()
    # n: the test images holding a class of the group, and after stage 1 only images with a base class
    labels = raw_labels(voc_root, "val")
    n = lambda stage, metric: int(seg[(seg.stage == stage) & (seg.metric == metric)]["n"].iloc[0])  # noqa: E731
    assert n(2, "mIoU[16-20]") == sum(bool(p & set(range(16, 21))) for p in labels.values())
    assert n(1, "mIoU") == sum(bool(p & set(range(1, 16))) for p in labels.values())
    assert n(2, "mIoU") == sum(bool(p & set(range(1, 21))) for p in labels.values())


def test_the_tables_apply_every_definition_per_class_group(overlapped_run):
    data = RunData.load(overlapped_run)
    assert [t.name for t in data.tasks] == ["seg[0-15]", "seg[16-20]"]
    written = data.by_class[data.by_class.eval_task == "seg"]
    get = lambda s, m: float(written[(written.stage == s) & (written.metric == m)]["value"].iloc[0])  # noqa: E731
    from clbench.report import BN_COLUMN, class_group_table, run_table
    table, _ = run_table(data.rows, data.tasks)
    base = table[table.Task.str.startswith("seg[0-15]")].iloc[0]
    expected = 100 * (get(2, "mIoU[0-15]") - get(1, "mIoU[0-15]")) / get(1, "mIoU[0-15]")
    # group rows carry their own bootstrap values and interval, and the drop's noise flag is read from them
    boot = read_bootstrap(overlapped_run)
    drawn = {s: np.array(boot[(boot.stage == s) & (boot.metric == "mIoU[0-15]") & (boot.split == "test")]
                         ["values"].iloc[0].split(), dtype=np.float64) for s in (1, 2)}
    row = written[(written.stage == 2) & (written.metric == "mIoU[0-15]")].iloc[0]
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(interval(drawn[2]), abs=1e-5)
    noise = change_within_noise(drawn[1], drawn[2])
    assert base["Drop (%)"] == f"{expected:+.2f}%" + (" (within noise)" if noise else "")
    assert "trained last" in table[table.Task.str.startswith("seg[16-20]")].iloc[0]["Drop (%)"]
    # BN attribution per group: the base group served at the end with stage 1's BN statistics (its own stage's);
    # the added group was trained last and has none
    own_bn = data.rows[(data.rows.eval_task == "seg[0-15]") & (data.rows.metric == "mIoU_own_bn")]
    assert own_bn.stage.tolist() == [2]
    assert data.rows[(data.rows.eval_task == "seg[16-20]") & (data.rows.metric == "mIoU_own_bn")].empty
    own = float(own_bn["value"].iloc[0])
    assert base[BN_COLUMN] == (f"{100 * (get(2, 'mIoU[0-15]') - own):+.2f} / "
                               f"{100 * (own - get(1, 'mIoU[0-15]')):+.2f}")
    papers, note = class_group_table(data.by_class, data.class_tasks)
    row = papers.iloc[0]
    assert row.filter(like="0-15").iloc[0] == f"{get(2, 'mIoU[0-15]'):.3f}"
    assert row.filter(like="all").iloc[0] == f"{get(2, 'mIoU'):.3f}"
    assert "overlapped" in note and "16-20" in "".join(papers.columns)


def test_clbench_eval_serves_a_checkpoint_on_the_classes_its_stage_had_seen(overlapped_run, voc_root):
    from clbench.checkpoint import evaluate_checkpoint
    rows = read_rows(overlapped_run)
    for stage in (1, 2):
        out = evaluate_checkpoint(overlapped_run / "checkpoints" / f"stage{stage}.pt", voc_root, "all", "cpu")
        expected = rows[(rows.stage == stage) & (rows.eval_task == "seg") & (rows.metric == "mIoU")]["value"]
        assert out["seg"]["mIoU"] == pytest.approx(float(expected.iloc[0]), abs=1e-6)


def test_the_mixed_benchmark_runs_end_to_end(voc_root, tmp_path):
    args = tiny_settings(voc_root, out=str(tmp_path), protocol="seg15-det-seg5", bootstrap="0", run_id="mixed")
    data = RunData.load(run(resolve(None, args)))
    assert [t.name for t in data.tasks] == ["seg[0-15]", "seg[16-20]", "det"]
    stages = data.rows.drop_duplicates("stage").set_index("stage")["stage_task"].to_dict()
    assert [stages[s] for s in (1, 2, 3)] == ["seg[0-15]", "det", "seg[16-20]"]
    config = yaml_config(data.path)
    assert config["protocol"] == "seg15-det-seg5" and config["order"] == ["seg", "det"]


def yaml_config(folder: Path) -> dict:
    import yaml
    return yaml.safe_load((folder / "config.yaml").read_text())


def test_a_comparison_on_a_detection_protocol_prints_the_papers_table(voc_root, tmp_path):
    out = subprocess.run([sys.executable, "-m", "clbench", "compare", "--protocol", "coco-5+5", "--strategies",
                          "naive,lwf", "--seeds", "0", "--bounds", "joint", "--reference", "single-task",
                          "--bootstrap", "0", "--out", str(tmp_path), "--name", "c",
                          *[f"--{k.replace('_', '-')}={v}" for k, v in tiny_settings(voc_root).items()]],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "det[0-4]" in out.stdout and "det[5-9]" in out.stdout
    assert "| Detection mAP@[.5:.95] | naive" in out.stdout
    joint = read_rows(tmp_path / "c" / "bounds" / "joint-seed0")
    assert set(joint[joint.stage == 1].metric) >= {"mAP", "mAP[0-4]", "mAP[5-9]"}   # every class at once
    # drop vs single-task per group: the reference trained every class at once; its group value is the mean AP of
    # the group's categories, read here straight from its per_class.csv
    per_class = pd.read_csv(tmp_path / "c" / "reference" / "det-seed0" / "per_class.csv")
    final = per_class[(per_class.stage == per_class.stage.max()) & (per_class.metric == "AP")]
    names = json.loads((tmp_path / "c" / "reference" / "det-seed0" / "tasks.json").read_text())[0]["classes"]
    ap = dict(zip(final["class"], final["value"]))
    data = load(tmp_path / "c")
    for group, members in (("det[0-4]", range(5)), ("det[5-9]", range(5, 10))):
        values = [ap[names[c]] for c in members if not math.isnan(ap[names[c]])]
        assert data.references[0][group] == pytest.approx(np.mean(values), abs=1e-12)
    table = subprocess.run([sys.executable, "-m", "clbench", "table", str(tmp_path / "c"), "--definition",
                            "reference"], capture_output=True, text=True, timeout=120)
    assert table.returncode == 0 and "Drop vs single-task" in table.stdout, table.stderr[-2000:]


def test_protocol_errors():
    with pytest.raises(ClbenchError, match="--protocol voc-15-5-overlapped: its file names the tasks"):
        RunConfig(protocol="voc-15-5-overlapped", order=("det", "seg", "cls"))
    with pytest.raises(ClbenchError, match="--eval-every: not available with a class-incremental"):
        RunConfig(protocol="coco-5+5", eval_every=2)
    with pytest.raises(ClbenchError, match="ships no benchmark of that name"):
        RunConfig(protocol="voc-15-5")


def test_the_default_synthetic_files_do_not_change_with_the_variant():
    assert "variant" not in SynthSpec().to_dict()
    assert SynthSpec(variant="voc21").to_dict()["variant"] == "voc21"
    assert RunConfig().synthetic_variant == "default"
    assert RunConfig(protocol="voc-15-1-overlapped").synthetic_variant == "voc21"


# MiB ---------------------------------------------------------------------------------------------------------

def test_mibs_unbiased_losses_against_a_pixel_by_pixel_computation():
    from clbench.distill import unbiased_cross_entropy, unbiased_distillation
    torch.manual_seed(0)
    logits, teacher = torch.randn(2, 6, 3, 4), torch.randn(2, 6, 3, 4)
    masks = torch.tensor([[[0, 4, 5, 255], [0, 0, 4, 5], [5, 5, 0, 255]]] * 2)
    old = (0, 1, 2, 3)   # classes 4 and 5 are new
    total, count = 0.0, 0
    for b in range(2):
        for i in range(3):
            for j in range(4):
                label = int(masks[b, i, j])
                if label == 255:
                    continue
                p = torch.softmax(logits[b, :, i, j].double(), 0)
                total -= math.log(p[list(old)].sum() if label == 0 else p[label])
                count += 1
    assert float(unbiased_cross_entropy(logits, masks, old)) == pytest.approx(total / count, rel=1e-6)
    plain = torch.nn.functional.cross_entropy(logits, masks, ignore_index=255)
    assert float(unbiased_cross_entropy(logits, masks, (0,))) == pytest.approx(float(plain), rel=1e-6)
    expected = 0.0
    for b in range(2):
        for i in range(3):
            for j in range(4):
                q = torch.softmax(logits[b, :, i, j].double(), 0)
                p = torch.softmax(teacher[b, list(old), i, j].double(), 0)
                q_old = torch.cat((q[[0, 4, 5]].sum().view(1), q[1:4]))
                expected -= float((p * q_old.log()).sum()) / len(old)
    assert float(unbiased_distillation(logits, teacher, old)) == pytest.approx(expected / 24, rel=1e-6)


def test_mib_initialises_new_channels_from_the_background_and_replaces_the_loss(voc_root, tmp_path, monkeypatch):
    from clbench.strategies.mib import MiB
    seen = {}
    real_before = MiB.before_stage

    def spy(self, ctx):
        conv = ctx.model.head_out
        start = ctx.model.slices["seg"].start
        real_before(self, ctx)
        if ctx.stage == 2:
            seen["weights"] = conv.weight[start:start + 21].detach().clone()
            seen["bias"] = conv.bias[start:start + 21].detach().clone()
    monkeypatch.setattr(MiB, "before_stage", spy)
    args = tiny_settings(voc_root, out=str(tmp_path), protocol="voc-15-5-overlapped", strategy="mib",
                         bootstrap="0", run_id="mib")
    rows = read_rows(run(resolve(None, args)))
    weights, bias = seen["weights"], seen["bias"]
    for c in range(16, 21):
        assert torch.equal(weights[c], weights[0])
    assert torch.allclose(bias[16:], bias[0].expand(5)) and not torch.equal(bias[1], bias[0])
    assert set(rows[(rows.stage == 2) & (rows.eval_task == "seg")].metric) >= {"mIoU[0-15]", "mIoU[16-20]"}


def test_strategies_that_protect_tasks_only_are_refused_on_class_steps():
    from clbench.config import resolve as resolved
    from clbench.plugins import create
    from clbench.strategy import check_protects
    protocol = resolved(None, {"protocol": "voc-15-1-overlapped"}).benchmark_file()
    for name in ("bn_per_task", "freeze_restore", "der", "replay", "agem", "frozen", "bn_per_task+lwf"):
        with pytest.raises(ClbenchError, match=re.escape(f"strategy {name!r} protects earlier tasks only")):
            check_protects(create(name, {})[0], protocol)
    for name in ("naive", "lwf", "pod", "mib", "ewc", "si", "mas", "bn_frozen", "bn_frozen+lwf"):
        check_protects(create(name, {})[0], protocol)
    check_protects(create("der", {})[0], resolved(None, {}).benchmark_file())   # one step per task: fine


def test_lwf_distils_the_old_classes_of_the_current_task(voc_root, tmp_path, monkeypatch):
    from clbench.strategies.lwf import LwF
    distilled = []
    real = LwF.loss_term

    def spy(self, ctx, images, outputs):
        distilled.append((ctx.stage, [(t.name, classes) for t, classes in ctx.distilled]))
        return real(self, ctx, images, outputs)
    monkeypatch.setattr(LwF, "loss_term", spy)
    args = tiny_settings(voc_root, out=str(tmp_path), protocol="seg15-det-seg5", strategy="lwf", bootstrap="0",
                         run_id="lwf")
    run(resolve(None, args))
    by_stage = dict(distilled)
    assert by_stage[1] == []
    assert by_stage[2] == [("seg", tuple(range(16)))]   # detection's stage keeps segmentation's seen classes
    assert by_stage[3] == [("det", None), ("seg", tuple(range(16)))]   # and then segmentation's old classes


# HAD ---------------------------------------------------------------------------------------------------------

def test_hads_terms_against_hand_computations():
    from clbench.distill import balanced_loss, edge_mask, had_dense_loss, sobel_magnitude
    step = torch.zeros(1, 5, 5)
    step[:, :, 3:] = 1.0   # a vertical edge between columns 2 and 3
    magnitude = sobel_magnitude(step)[0]
    assert magnitude[2, 2] == pytest.approx(4.0) and magnitude[2, 3] == pytest.approx(4.0)
    assert magnitude[2, 0] == 0.0
    mask = edge_mask(step, 0.9)[0]
    assert mask[2, 2] and mask[2, 3] and not mask[2, 0]
    loss = torch.tensor([1.0, 4.0, 2.0, 0.0, 3.0])
    labels = torch.tensor([0, 0, 1, 1, 2])
    per_class = torch.tensor([2.0, 2.0, 3.0, 0.0])   # geometric means of the positive losses: √(1·4), 2, 3; absent
    weights = torch.softmax(-per_class, 0)          # the softmax over every class, the absent one's loss 0
    assert float(balanced_loss(loss, labels, 4)) == pytest.approx(float((per_class * weights).sum() / 4), rel=1e-6)
    torch.manual_seed(0)
    log_probs = torch.log_softmax(torch.randn(2, 3, 6, 6), 1)
    pseudo = torch.randint(0, 3, (2, 6, 6))
    nll = torch.nn.functional.nll_loss(log_probs, pseudo, reduction="none")
    expected = (balanced_loss(nll, pseudo, 3) + (nll * edge_mask(nll, 0.5)).mean()) / 2
    assert float(had_dense_loss(log_probs, pseudo, 0.5)) == pytest.approx(float(expected), rel=1e-6)


def test_had_runs_the_mixed_benchmark_and_its_term_pulls_towards_the_snapshot(voc_root, tmp_path):
    from clbench.plugins import create
    args = tiny_settings(voc_root, out=str(tmp_path), protocol="seg15-det-seg5", strategy="had", bootstrap="0",
                         run_id="had")
    rows = read_rows(run(resolve(None, args)))
    assert set(rows.stage) == {0, 1, 2, 3}
    had = create("had", {})[0]
    student = torch.randn(2, 3, 8, 8, requires_grad=True)
    teacher = torch.randn(2, 3, 8, 8)
    had._term("seg", student, teacher).backward()
    moved = student - 0.5 * student.grad
    agree = lambda s: float((s.argmax(1) == teacher.argmax(1)).float().mean())  # noqa: E731
    assert agree(moved.detach()) >= agree(student.detach())
    det = torch.randn(1, 3, 4, 4, 5 + 4)
    assert torch.isfinite(had._term("det", det.clone().requires_grad_(), det))


def test_the_report_page_shows_the_papers_table(overlapped_run):
    from clbench.page import write_report
    page = write_report(overlapped_run).read_text()
    assert "Class groups, as the papers report them" in page and "16-20 (n " in page


def test_a_class_incremental_run_resumes_to_the_same_metrics(voc_root, tmp_path):
    from clbench.cli import main
    args = tiny_settings(voc_root, out=str(tmp_path), protocol="seg15-det-seg5", strategy="mib", bootstrap="0",
                         run_id="r")
    run_dir = run(resolve(None, args))
    reference = (run_dir / "metrics.csv").read_bytes()
    for stage in (2, 3):
        (run_dir / "checkpoints" / f"stage{stage}.pt").unlink()
    assert main(["run", "--resume", str(run_dir), "--progress", "false"]) == 0
    assert (run_dir / "metrics.csv").read_bytes() == reference
    assert json.loads((run_dir / "resume.json").read_text())[0]["resumed_after_stage"] == 1
