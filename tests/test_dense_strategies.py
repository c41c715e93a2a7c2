"""The eight hooks, the helpers strategies build on, and the invariants of bn_per_task, si, mas, der, agem, pod."""

import math

import pytest
import torch

from clbench import ClbenchError
from clbench.accel import Precision
from clbench.checkpoint import evaluate_checkpoint
from clbench.config import resolve
from clbench.distill import pod_loss, pooled_embedding
from clbench.freezing import batchnorm_state, no_bn_update
from clbench.gradients import agem_project, dot
from clbench.loop import StageSettings, task_loss, train_stage
from clbench.model import UniHeadNet
from clbench.recorder import read_rows
from clbench.regularization import output_sq_norm, si_importance
from clbench.run import run
from clbench.strategy import HOOKS, Composite, StageContext, Strategy
from clbench.teacher import FeatureTaps, frozen_teacher


def run_with(tiny_args, strategy, **options):
    return run(resolve(None, {**tiny_args, "strategy": strategy, "run_id": strategy.replace("+", "_"), "set": options}))


def checkpoint(run_dir, stage):
    return torch.load(run_dir / "checkpoints" / f"stage{stage}.pt", weights_only=True)


def tiny_model(specs, seed=0):
    torch.manual_seed(seed)
    return UniHeadNet(tasks=specs, backbone="test_efficientnet", head_channels=8)


def context(model, specs, stage, loader=None):
    return StageContext(model=model, stage=stage, task=specs[stage - 1], tasks=tuple(specs), seed=0,
                        train_loader=loader, device=torch.device("cpu"),
                        task_loss=lambda t, out, y: task_loss(model, t, out, y, (32, 32)))


class Batches(list):
    """A list of (images, targets, task labels) batches standing in for a DataLoader."""


def cls_batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batches((torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g), None)
                   for _ in range(n))


SETTINGS = StageSettings(epochs=1, lr=1e-2, weight_decay=0.0, grad_clip=10.0, precision=Precision("cpu", None))


# the hook set ----------------------------------------------------------------------------------------------

def test_there_are_at_most_eight_hooks_and_the_docstring_shows_the_whole_loop_evaluation_included():
    """Read from the class itself: every public method of Strategy but its state API is a hook the loop calls."""
    methods = {name for name, value in vars(Strategy).items() if callable(value) and not name.startswith("_")}
    hooks = methods - {"state_dict", "load_state_dict"}
    assert hooks == set(HOOKS) and len(hooks) <= 8
    doc = Strategy.__doc__
    for hook in HOOKS:
        assert f"strategy.{hook}(" in doc, hook
    assert "clbench eval" in doc and "BN audit" in doc   # the evaluation hook is applied by all three


def test_after_backward_replacements_reach_the_optimizer(specs):
    seen = []

    class ZeroTheHead(Strategy):
        def after_backward(self, ctx, grads):
            return {"head_out.weight": torch.zeros_like(grads["head_out.weight"])}

        def after_step(self, ctx):
            seen.append(ctx.model.head_out.weight.grad.abs().sum().item())

    model = tiny_model(specs)
    before = model.head_out.weight.detach().clone()
    train_stage(context(model, specs, 3, cls_batches()), ZeroTheHead(), SETTINGS, progress=False)
    assert seen == [0.0, 0.0, 0.0]
    assert torch.equal(model.head_out.weight, before)   # AdamW with zero gradients and no decay: unchanged


def test_after_backward_naming_a_frozen_parameter_is_an_error(specs):
    class Wrong(Strategy):
        def after_backward(self, ctx, grads):
            return {"backbone.conv_stem.weight": torch.zeros(1)}

    model = tiny_model(specs)
    model.backbone.requires_grad_(False)
    with pytest.raises(ClbenchError, match="backbone.conv_stem.weight.*not a trainable parameter"):
        train_stage(context(model, specs, 3, cls_batches(1)), Wrong(), SETTINGS, progress=False)


def test_composite_refuses_two_parts_that_serve_the_same_tensor(specs):
    class Serve(Strategy):
        name = "serve"

        def evaluation_state(self, model, task):
            return {"head_out.bias": torch.zeros(1)}

    with pytest.raises(ClbenchError, match="head_out.bias"):
        Composite([Serve(), Serve()]).evaluation_state(None, specs[0])


# helpers ---------------------------------------------------------------------------------------------------

def test_a_pass_under_no_bn_update_leaves_every_bn_buffer_bit_identical(specs):
    model = tiny_model(specs).train()
    before = batchnorm_state(model)
    with no_bn_update(model):
        model(torch.randn(4, 3, 32, 32))["cls"].sum().backward()
    after = batchnorm_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(layer.track_running_stats for layer in model.modules() if isinstance(layer, torch.nn.BatchNorm2d))
    model(torch.randn(4, 3, 32, 32))   # the same pass outside the context does move them
    assert not torch.equal(before["head.0.1.running_mean"], batchnorm_state(model)["head.0.1.running_mean"])


def test_no_bn_update_keeps_train_mode_normalisation_with_batch_statistics(specs):
    model = tiny_model(specs).train()
    x = torch.randn(4, 3, 32, 32)
    with no_bn_update(model):
        inside = model(x)["cls"]
    assert torch.allclose(inside, model(x)["cls"])   # train mode: batch statistics either way


def test_frozen_teacher_stays_in_eval_mode_and_leaves_its_statistics_alone(specs):
    model = tiny_model(specs)
    taps = FeatureTaps(model)
    teacher = frozen_teacher(model)
    teacher.train()   # a student's model.train() cannot reach it
    before = batchnorm_state(teacher)
    x = torch.randn(2, 3, 32, 32)
    out = teacher(x)
    assert not teacher.training and not out["cls"].requires_grad
    assert all(torch.equal(before[k], batchnorm_state(teacher)[k]) for k in before)
    assert all(not p.requires_grad for p in teacher.parameters())
    with pytest.raises(ClbenchError, match="no forward pass"):
        taps.of(x)   # the student's taps were not copied into the teacher
    model.eval()
    assert torch.allclose(teacher(x)["seg"], model(x)["seg"])   # a copy of the same function


def test_feature_taps_name_backbone_and_neck_and_keep_each_pass_apart(specs):
    model = tiny_model(specs).eval()
    taps = FeatureTaps(model)
    a, b = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    model(a)
    model(b)
    features = taps.of(a)
    depth = len(model.backbone.feature_info.channels())
    assert list(features) == [f"backbone.{i}" for i in range(depth)] + ["neck"]
    assert features["neck"].shape == (2, 8, 8, 8)   # head_channels, at stride 8
    assert torch.equal(features["backbone.0"], model.backbone(a)[0])
    assert not torch.equal(taps.of(b)["neck"], features["neck"])
    taps.close()
    model(a)
    with pytest.raises(ClbenchError):
        taps.of(a)


# pure functions --------------------------------------------------------------------------------------------

def test_agem_projection_matches_the_formula_and_leaves_no_negative_dot_product():
    g = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([3.0])}
    r = {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([-1.0])}
    # <g, r> = -2 - 3 = -5, <r, r> = 2: g̃ = g + 2.5 r
    projected = agem_project(g, r)
    assert projected["a"].tolist() == [1.0, 0.5] and projected["b"].tolist() == [0.5]
    assert dot(projected, r).item() == pytest.approx(0.0, abs=1e-12)
    assert agem_project(g, {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([1.0])}) is None   # <g, r> = 4 >= 0


def test_si_importance_is_the_damped_path_integral_and_never_negative():
    omega = {"w": torch.tensor([2.0, -1.0, 0.0])}
    delta = {"w": torch.tensor([1.0, 3.0, 0.0])}
    assert si_importance(omega, delta, xi=1.0)["w"].tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("kind, output, expected", [
    ("cls", torch.tensor([[3.0, 4.0], [0.0, 1.0]]), (25 + 1) / 2),                # per image
    ("seg", torch.tensor([[[[1.0, 0.0]], [[2.0, 2.0]]]]), (5 + 4) / 2),           # (1, 2, 1, 2): per pixel
    ("det", torch.tensor([[[[[1.0, 1.0, 1.0], [0.0, 0.0, 2.0]]]]]), (3 + 4) / 2),  # (1, 1, 1, 2, 3): per cell
])
def test_mas_output_norm_is_taken_where_the_task_predicts(kind, output, expected):
    assert output_sq_norm(kind, output).item() == pytest.approx(expected)


def test_pooled_embedding_by_hand_and_pod_loss_zero_only_for_equal_features():
    f = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])   # (1, 1, 2, 2); squared: [[1, 4], [9, 16]]
    # scale 1: width-pooled rows (2.5, 12.5), height-pooled columns (5, 10)
    whole = torch.tensor([2.5, 12.5, 5.0, 10.0])
    assert torch.allclose(pooled_embedding(f, 1), (whole / whole.norm())[None])
    # scale 2: four 1x1 regions, each contributes its value twice
    regions = torch.tensor([1.0, 1.0, 4.0, 4.0, 9.0, 9.0, 16.0, 16.0])
    assert torch.allclose(pooled_embedding(f, 2), (regions / regions.norm())[None])
    assert pooled_embedding(f, 4).shape == (1, 8)   # a 2x2 map cannot fill 4x4 regions: empty ones skipped
    x = torch.randn(2, 4, 6, 6)
    assert pod_loss([x], [x.clone()], (1, 2)).item() == pytest.approx(0.0, abs=1e-6)
    assert pod_loss([x + 0.5 * torch.randn_like(x)], [x], (1, 2)).item() > 0.01


# si and mas ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["si", "mas"])
def test_importances_are_non_negative_non_zero_where_trained_and_zero_where_frozen(name, specs):
    from clbench.strategies.mas import MAS
    from clbench.strategies.si import SI
    model = tiny_model(specs)
    model.backbone.blocks[0].requires_grad_(False)
    strategy = {"si": SI, "mas": MAS}[name]()
    ctx = context(model, specs[2:] + specs[:2], 1, cls_batches())   # cls first, so a later stage exists
    train_stage(ctx, strategy, SETTINGS, progress=False)
    strategy.after_stage(ctx)
    importance = strategy.importance
    assert all(bool((v >= 0).all()) for v in importance.values())
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(float(importance.get(n, torch.zeros(1)).abs().sum()) == 0 for n in frozen)
    trained = ["head_out.weight", "head.0.0.weight", "backbone.conv_stem.weight"]
    assert all(float(importance[n].sum()) > 0 for n in trained)
    assert torch.equal(strategy.anchor["head_out.weight"], model.head_out.weight.detach())


def test_si_penalty_pulls_towards_the_previous_stage(tiny_args):
    run_dir = run_with(tiny_args, "si", **{"si.lam": "1e4"})
    free = run_with(tiny_args, "naive")
    moved = {}
    for name, folder in (("si", run_dir), ("naive", free)):
        first, last = checkpoint(folder, 1)["model"], checkpoint(folder, 3)["model"]
        moved[name] = sum(float((last[k].float() - first[k].float()).norm()) for k in first if k.endswith("weight"))
    assert moved["si"] < moved["naive"]


# bn_per_task -----------------------------------------------------------------------------------------------

def test_bn_per_task_serves_segmentation_with_the_statistics_saved_after_stage_1(tiny_args, monkeypatch):
    import clbench.evaluate as evaluate
    served = []
    real = evaluate._evaluate

    def spy(model, task, batches, device, coco_gt, classes):
        served.append((task.name, batchnorm_state(model)))
        return real(model, task, batches, device, coco_gt, classes)

    monkeypatch.setattr(evaluate, "_evaluate", spy)
    run_dir = run_with(tiny_args, "bn_per_task")
    stage1 = checkpoint(run_dir, 1)["bn_stats"][1]   # the audit's record of the live statistics after stage 1
    stage3 = checkpoint(run_dir, 3)
    seg_at_3 = [stats for name, stats in served if name == "seg"][-1]   # the last evaluation: after stage 3
    assert set(seg_at_3) == set(stage1)
    assert all(torch.equal(seg_at_3[k], stage1[k]) for k in stage1)
    live = {k: v for k, v in stage3["model"].items() if k in stage1}
    assert not all(torch.equal(live[k], stage1[k]) for k in stage1)   # the model's own statistics did drift
    rows = read_rows(run_dir)
    final = rows[(rows["stage"] == 3) & (rows["eval_task"] == "seg")].set_index("metric")["value"]
    assert final["mIoU_own_bn"] == final["mIoU"]   # the audit serves the task the same way
    served_by_eval = evaluate_checkpoint(run_dir / "checkpoints" / "stage3.pt", tiny_args["data_root"], "seg", "cpu")
    assert served_by_eval["seg"]["mIoU"] == pytest.approx(final["mIoU"], abs=1e-12)


def test_bn_per_task_with_affine_serves_each_task_its_own_affine_parameters(tiny_args):
    run_dir = run_with(tiny_args, "bn_per_task", **{"bn_per_task.affine": "true"})
    one, three = checkpoint(run_dir, 1), checkpoint(run_dir, 3)
    seg = three["evaluation"]["seg"]
    assert torch.equal(seg["head.0.1.weight"], one["model"]["head.0.1.weight"])
    assert not torch.equal(seg["head.0.1.weight"], three["model"]["head.0.1.weight"])
    assert three["evaluation"]["cls"]["head.0.1.weight"].equal(three["model"]["head.0.1.weight"])


# der and agem ----------------------------------------------------------------------------------------------

def test_der_buffer_is_bounded_and_holds_the_outputs_of_the_stage_that_stored_it(tiny_args, specs):
    run_dir = run_with(tiny_args, "der", **{"der.per_task": "3", "der.batch": "2"})
    buffer = checkpoint(run_dir, 3)["strategy"]["buffer"]
    assert set(buffer) == {"seg", "det"} and all(len(entry["images"]) == 3 for entry in buffer.values())
    from clbench.benchmarks import load_tasks
    tasks = [t.spec for t in load_tasks(tiny_args["data_root"], ("seg", "det", "cls"), image_size=64)]
    for stage, name in ((1, "seg"), (2, "det")):
        model = UniHeadNet(tasks=tasks, backbone="test_efficientnet", head_channels=16).to_channels_last()
        model.load_state_dict(checkpoint(run_dir, stage)["model"])
        with torch.no_grad():
            then = model.eval()(buffer[name]["images"])[name]
        assert torch.allclose(buffer[name]["outputs"], then, atol=1e-5), name
    assert buffer["seg"]["outputs"].shape[-2:] == (8, 8)   # seg logits at head stride (64 px / 8)


def test_agem_never_applies_an_update_against_the_reference_gradient(tiny_args, monkeypatch):
    from clbench.strategies.agem import AGEM
    checked = []
    real_step = AGEM.after_step

    def after_step(self, ctx):
        if self.reference:
            grads = {n: p.grad for n, p in ctx.model.named_parameters() if n in self.reference}
            along = dot(grads, self.reference).item()
            scale = math.sqrt(dot(grads, grads).item() * dot(self.reference, self.reference).item())
            checked.append(along / max(scale, 1e-30))
        return real_step(self, ctx)

    projected = []
    real_backward = AGEM.after_backward

    def after_backward(self, ctx, grads):
        new = real_backward(self, ctx, grads)
        projected.append(new is not None)
        return new

    monkeypatch.setattr(AGEM, "after_step", after_step)
    monkeypatch.setattr(AGEM, "after_backward", after_backward)
    run_with(tiny_args, "agem", **{"agem.per_task": "4", "agem.batch": "2"})
    assert len(checked) == 6   # 3 steps in each of stages 2 and 3
    assert min(checked) >= -1e-6
    assert any(projected)   # the projection did happen, so the check above is not vacuous


# composition -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("combo", ["bn_per_task+lwf", "der+bn_frozen", "pod+agem"])
def test_new_strategies_compose(combo, tiny_args):
    run_dir = run_with(tiny_args, combo)
    state = checkpoint(run_dir, 3)["strategy"]
    assert set(state) == set(combo.split("+"))
    primary = read_rows(run_dir).query("metric in ['mIoU', 'mAP', 'top1']")
    assert len(primary) == 12 and primary["value"].notna().all()


# resume ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["bn_per_task", "si", "mas", "der"])   # agem keeps der's buffer; pod no state
def test_state_carried_in_the_checkpoint_resumes_to_a_byte_identical_run(name, tiny_args):
    import shutil
    whole = run_with(tiny_args, name)
    cut = whole.parent / "cut"
    shutil.copytree(whole, cut)
    (cut / "checkpoints" / "stage3.pt").unlink()   # as if killed during stage 3
    resumed = run(resolve(None, {**tiny_args, "strategy": name, "run_id": "cut", "set": {}}), resume=True)
    rows = [(folder / "metrics.csv").read_text().replace("\ncut,", "\nRUN,").replace(f"\n{name},", "\nRUN,")
            for folder in (resumed, whole)]
    assert rows[0] == rows[1]


@pytest.mark.parametrize("update_bn", [False, True])
def test_buffer_passes_leave_bn_statistics_alone_unless_update_bn(update_bn, specs):
    from clbench.strategies.replay import Replay
    model = tiny_model(specs).train()
    replay = Replay(per_task=2, batch=2, update_bn=update_bn)
    replay.buffer.tasks["cls"] = {"images": torch.randn(2, 3, 32, 32), "targets": torch.tensor([0, 1]),
                                  "indices": torch.tensor([0, 1])}
    replay._draws = torch.Generator().manual_seed(0)
    before = batchnorm_state(model)
    replay.replay(context(model, specs, 1), specs[2])
    after = batchnorm_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before) is not update_bn
