"""The GPU user's options (--amp, --channels-last, --compile, --deterministic) and the in-memory data path,
checked on the CPU: the CPU's autocast runs bf16 and fp16 (with a GradScaler), so the AMP paths are exercised
here too. What only a GPU shows is in tests/test_cuda.py (marker ``cuda``)."""

import copy
import json
import os

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

import clbench.accel
from clbench import ClbenchError
from clbench.accel import Precision, is_compiled, precision, set_determinism
from clbench.augment import augment_batch, crop_flip_boxes, crop_flip_grid, crop_params
from clbench.build import prepare
from clbench.checkpoint import evaluate_checkpoint
from clbench.config import RunConfig, resolve
from clbench.loop import optimizer_step
from clbench.losses import upsample_by_matrices
from clbench.memory import MemoryLoader, plan
from clbench.model import UniHeadNet
from clbench.plugins import create, registered
from clbench.recorder import read_rows
from clbench.run import run
from clbench.runtime import Session
from clbench.stage import stage_context
from clbench.strategy import loss_terms
from clbench.teacher import frozen_teacher

BUILTINS = sorted(name for name, found in registered().items() if found.origin == "built-in")


def values(run_dir):
    """A run's metric rows without the run id (two runs of one configuration must agree on the rest)."""
    return read_rows(run_dir).drop(columns=["run_id"]).reset_index(drop=True)


# the options ------------------------------------------------------------------------------------------------

def test_amp_takes_a_precision_name_and_reads_old_booleans():
    assert RunConfig().amp == "auto"
    assert [RunConfig(amp=v).amp for v in (True, False, "BF16", "fp16", "off", "true")] == \
        ["auto", "off", "bf16", "fp16", "off", "auto"]
    with pytest.raises(ClbenchError, match=r"--amp: amp = 'fp8': expected one of auto, bf16, fp16, off"):
        resolve(None, {"amp": "fp8"})


def test_precision_resolves_on_the_device_and_only_fp16_scales_the_loss():
    cpu = torch.device("cpu")
    assert precision("auto", cpu) == Precision("cpu", None)        # float32 on a CPU unless asked
    assert precision("bf16", cpu).dtype == torch.bfloat16 and not precision("bf16", cpu).scaler().is_enabled()
    assert precision("fp16", cpu).scaler().is_enabled()
    assert precision("off", cpu).to_dict() == {"amp": "off", "autocast_dtype": None, "grad_scaler": False}
    with precision("bf16", cpu).autocast():
        assert torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3)).dtype == torch.bfloat16


def test_bf16_on_a_gpu_without_it_is_refused_and_auto_picks_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)  # no GPU touched
    gpu = torch.device("cuda")
    with pytest.raises(ClbenchError, match=r"^--amp bf16: this GPU has no bfloat16 support; use --amp fp16"):
        precision("bf16", gpu)
    assert precision("auto", gpu) == Precision("cuda", torch.float16) and precision("auto", gpu).to_dict()["grad_scaler"]


def test_deterministic_sets_and_clears_the_process_switches(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        on = set_determinism(True, torch.device("cpu"))
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert on["cudnn_benchmark"] is False and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        off = set_determinism(False, torch.device("cpu"))
        assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
        assert off["cudnn_benchmark"] is False       # benchmark mode only on CUDA
    finally:
        set_determinism(False, torch.device("cpu"))


def test_the_deterministic_upsampling_equals_interpolate_in_value_and_gradient():
    x = torch.randn(2, 5, 8, 6, dtype=torch.float64, requires_grad=True)
    for size in [(64, 48), (32, 32), (8, 6), (13, 7)]:
        reference = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        ours = upsample_by_matrices(x, size)
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
        weights = torch.randn(reference.shape, dtype=torch.float64)
        g_ref, = torch.autograd.grad((reference * weights).sum(), x)
        g_ours, = torch.autograd.grad((ours * weights).sum(), x)
        torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=1e-12)


# the in-memory data path -------------------------------------------------------------------------------------

def test_the_budget_keeps_tasks_in_order_while_they_fit():
    sizes = [("seg", "seg", 100), ("det", "det", 100), ("cls", "cls", 100)]   # at 512 px: 100, 75, 75 MiB
    assert plan(sizes, 512, 180) == {"seg": True, "det": True, "cls": False}
    assert plan(sizes, 512, 99) == {"seg": False, "det": True, "cls": False}
    assert plan(sizes, 512, 250) == {"seg": True, "det": True, "cls": True}
    assert plan(sizes, 512, 0) == {"seg": False, "det": False, "cls": False}


def test_memory_batches_are_the_per_image_batches_bit_for_bit(tiny_args):
    memory = prepare(resolve(None, tiny_args), Session())
    per_image = prepare(resolve(None, {**tiny_args, "train_in_memory_mb": "0"}), Session())
    for stage, (exp_m, exp_p) in enumerate(zip(memory.stream.train_stream, per_image.stream.train_stream), start=1):
        fast, slow = stage_context(memory, stage, exp_m).train_loader, stage_context(per_image, stage, exp_p).train_loader
        assert isinstance(fast, MemoryLoader) and not isinstance(slow, MemoryLoader) and len(fast) == len(slow)
        for _ in range(2):                                   # two epochs: the shuffles advance alike
            for (xf, yf, tf), (xs, ys, ts) in zip(fast, slow, strict=True):
                assert torch.equal(xf, xs) and torch.equal(tf, ts)
                if isinstance(ys, list):
                    assert all(torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
                               and a["image_id"] == b["image_id"] for a, b in zip(yf, ys, strict=True))
                else:
                    assert torch.equal(yf, ys) and yf.dtype == ys.dtype
        assert torch.equal(fast.generator.get_state(), slow.generator.get_state())
    assert memory.training_data()["seg"]["path"] == "memory" and per_image.training_data()["seg"]["path"] == "per-image"


def test_crops_are_drawn_as_torchvisions_random_resized_crop_draws_them():
    from torchvision.transforms import v2
    torch.manual_seed(0)
    top, left, h, w = crop_params(4000, 64).unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 64).all() and (left + w <= 64).all()
    reference = v2.RandomResizedCrop(64, scale=(0.5, 1.0), antialias=True)
    drawn = [reference.make_params([torch.zeros(3, 64, 64)]) for _ in range(4000)]
    ref = {key: torch.tensor([float(d[key]) for d in drawn]) for key in ("top", "left", "height", "width")}
    for ours, theirs in ((h * w, ref["height"] * ref["width"]), (w / h, ref["width"] / ref["height"]),
                         (top, ref["top"]), (left, ref["left"])):
        for stat in (torch.mean, torch.std):                         # the same distribution, within sampling error
            assert abs(stat(ours) - stat(theirs)) <= 0.04 * max(abs(stat(theirs)), 1.0), (stat, stat(ours), stat(theirs))
        q = torch.tensor([0.1, 0.5, 0.9])
        torch.testing.assert_close(ours.quantile(q), theirs.quantile(q), rtol=0.04, atol=1.0)


def test_crop_and_flip_resample_as_torchvision_resized_crop_does():
    image = torch.rand(1, 3, 64, 64, dtype=torch.float64)
    crop = torch.tensor([[10.0, 5.0, 40.0, 48.0]])                          # top, left, height, width
    reference = TF.resized_crop(image, 10, 5, 40, 48, [64, 64], antialias=False)
    for flip in (False, True):
        grid = crop_flip_grid(crop, torch.tensor([flip]), 64, image.device).to(image.dtype)
        ours = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
        expected = TF.horizontal_flip(reference) if flip else reference
        torch.testing.assert_close(ours[..., 2:-2, 2:-2], expected[..., 2:-2, 2:-2], rtol=0, atol=1e-5)  # float32 grid


def test_boxes_through_a_crop_and_flip_by_hand():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [30.0, 30.0, 40.0, 50.0]])
    crop = torch.tensor([20.0, 20.0, 32.0, 32.0])   # top, left, h, w: a 2x zoom of [20, 52)²
    out, labels = crop_flip_boxes(boxes, torch.tensor([3, 7]), crop, False, 64)
    assert out.tolist() == [[20.0, 20.0, 40.0, 60.0]] and labels.tolist() == [7]   # the first is cropped away
    out, labels = crop_flip_boxes(boxes, torch.tensor([3, 7]), crop, True, 64)
    assert out.tolist() == [[24.0, 20.0, 44.0, 60.0]] and labels.tolist() == [7]


def test_masks_and_boxes_follow_the_augmented_image():
    torch.manual_seed(1)
    images = torch.zeros(16, 3, 64, 64)
    images[:, :, 16:40, 20:52] = 1.0                       # a white rectangle: class 1, box [20, 16, 52, 40]
    masks = (images[:, 0] > 0.5).to(torch.uint8)
    seg_images, seg_masks = augment_batch(images.clone(), masks, "seg")
    agree = ((seg_images.mean(1) > 0.5) == (seg_masks == 1)).float().mean(dim=(1, 2))
    assert agree.min() > 0.98, agree
    torch.manual_seed(1)                                   # the same draws: the same geometry
    targets = [{"boxes": torch.tensor([[20.0, 16.0, 52.0, 40.0]]), "labels": torch.tensor([4])} for _ in range(16)]
    det_images, det_targets = augment_batch(images.clone(), targets, "det")
    assert torch.equal(det_images, seg_images)
    for image, target in zip(det_images, det_targets):
        ys, xs = torch.nonzero(image.mean(0) > 0.5, as_tuple=True)
        drawn = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        assert target["labels"].tolist() == [4]
        torch.testing.assert_close(target["boxes"][0], drawn, rtol=0, atol=1.5)


def test_augmentation_is_the_same_for_a_seed_and_differs_across_seeds():
    images, masks = torch.rand(4, 3, 32, 32), torch.randint(0, 5, (4, 32, 32), dtype=torch.uint8)
    draws = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        draws.append(augment_batch(images.clone(), masks.clone(), "seg"))
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
    assert not torch.equal(draws[0][0], draws[2][0])


def test_an_augmented_in_memory_run_is_reproducible_per_seed(tiny_args):
    args = {**tiny_args, "augment": "true"}
    first, second = (run(resolve(None, {**args, "run_id": name})) for name in ("a", "b"))
    pd.testing.assert_frame_equal(values(first), values(second))
    resources = json.loads((first / "resources.json").read_text())
    assert {t: d["path"] for t, d in resources["training_data"].items()} == {"seg": "memory", "det": "memory",
                                                                              "cls": "memory"}
    assert all(d["decode_seconds"] is not None for d in resources["training_data"].values())


# mixed precision ---------------------------------------------------------------------------------------------

def walk_to_stage_3(setup, strategy):
    """The strategy's stage hooks for stages 1 and 2 (no training: the hooks' own passes only), then stage 3's
    before_stage; returns stage 3's context."""
    experiences = list(setup.stream.train_stream)
    for stage in (1, 2):
        ctx = stage_context(setup, stage, experiences[stage - 1])
        strategy.before_stage(ctx)
        strategy.after_stage(ctx)
    ctx = stage_context(setup, 3, experiences[2])
    strategy.before_stage(ctx)
    return ctx


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("amp, tolerance", [("fp16", 0.02), ("bf16", 0.1)])
def test_every_builtin_loss_term_is_float32_and_close_to_its_float32_value_under_autocast(tiny_args, device, amp,
                                                                                             tolerance):
    if device == "cuda" and amp == "bf16" and not torch.cuda.is_bf16_supported():
        with pytest.raises(ClbenchError, match="no bfloat16 support"):   # refused before anything runs
            prepare(resolve(None, {**tiny_args, "device": device, "amp": amp}), Session())
        return
    setup = prepare(resolve(None, {**tiny_args, "device": device}), Session())
    initial = copy.deepcopy(setup.model.state_dict())
    checked = []
    for name in BUILTINS:
        setup.model.load_state_dict(initial)
        plain, mixed = create(name, {})[0], create(name, {})[0]   # twins walked alike: the same draws
        ctx = walk_to_stage_3(setup, plain)
        walk_to_stage_3(setup, mixed)
        with torch.no_grad():                                     # move the weights away from every anchor
            for p in setup.model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        setup.model.eval()
        images, _, _ = next(iter(ctx.train_loader))
        with torch.no_grad():
            reference = loss_terms(plain, ctx, images, setup.model(images))
            with precision(amp, ctx.device).autocast():
                terms = loss_terms(mixed, ctx, images, setup.model(images))
        assert terms.keys() == reference.keys(), name
        for key, term in terms.items():
            assert term.dtype == torch.float32, (name, term.dtype)
            assert abs(term.item() - reference[key].item()) <= tolerance * max(abs(reference[key].item()), 1e-3), \
                (name, term.item(), reference[key].item())
            checked.append(name)
    assert {"lwf", "ewc", "si", "mas", "der", "replay", "pod"} <= set(checked)   # not vacuous (agem has no term)


def test_a_step_the_grad_scaler_skips_is_not_a_step():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = precision("fp16", torch.device("cpu")).scaler()
    outcomes = []
    for _ in range(20):
        before = weight.detach().clone()
        loss = (weight.half() * 1000).float().sum()    # x 65536 (the first scale) overflows fp16's gradient
        _, stepped = optimizer_step(loss, {"w": weight}, optimizer, scaler, 10.0, "test")
        assert stepped == (not torch.equal(weight.detach(), before))
        outcomes.append(stepped)
    assert outcomes[0] is False and outcomes[-1] is True   # skipped while the scale settles, then steps


def test_fp16_with_a_grad_scaler_trains_every_kind_of_term_and_records_latency_both_ways(tiny_args):
    """si integrates every step: before skipped steps stopped counting, fp16's first (skipped) steps gave it
    infinite gradients times a zero move, NaN importances, and a NaN loss in stage 3."""
    run_dir = run(resolve(None, {**tiny_args, "strategy": "lwf+ewc+der+si", "amp": "fp16", "run_id": "fp16",
                                 "latency_sizes": "64"}))
    rows = read_rows(run_dir)
    primary = rows[rows["metric"].isin(["mAP", "mIoU", "top1"])]
    assert len(primary) == 12 and primary["value"].notna().all()
    env = json.loads((run_dir / "env.json").read_text())
    assert env["acceleration"]["amp"] == "fp16" and env["acceleration"]["grad_scaler"] is True
    resources = json.loads((run_dir / "resources.json").read_text())
    assert resources["latency"]["timer"] == "perf_counter" and resources["latency"]["amp"] == "float16"
    for key in ("latency_ms", "latency_amp_ms"):
        assert {t: list(v) for t, v in resources[key].items()} == {"seg": ["64"], "det": ["64"], "cls": ["64"]}
        assert all(ms > 0 for v in resources[key].values() for ms in v.values())


# torch.compile -----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_compiled_run_equals_the_eager_one_and_its_checkpoints_load_anywhere(tiny_args, tiny_root, monkeypatch):
    monkeypatch.setattr(clbench.accel, "BACKEND", "eager")   # dynamo traces for real; inductor's codegen takes minutes
    compiled = run(resolve(None, {**tiny_args, "strategy": "lwf", "compile": "true", "run_id": "compiled"}))
    eager = run(resolve(None, {**tiny_args, "strategy": "lwf", "run_id": "eager"}))
    pd.testing.assert_frame_equal(values(compiled), values(eager))
    state = torch.load(compiled / "checkpoints" / "stage3.pt", weights_only=True)["model"]
    assert not any("_orig_mod" in key for key in state)      # compiled in place: the plain parameter names
    final = read_rows(compiled).query("stage == 3 and metric in ['mAP', 'mIoU', 'top1']")
    again = evaluate_checkpoint(compiled / "checkpoints" / "stage3.pt", tiny_root, "all", "cpu")
    assert {r.eval_task: r.value for r in final.itertuples()} == {t: v for t, m in again.items() for v in m.values()}


def test_a_teacher_of_a_compiled_student_is_compiled_and_independent(specs, monkeypatch):
    monkeypatch.setattr(clbench.accel, "BACKEND", "eager")
    student = UniHeadNet(tasks=specs, backbone="test_efficientnet", head_channels=8).eval()
    clbench.accel.compile_model(student)
    teacher = frozen_teacher(student)
    assert is_compiled(student) and is_compiled(teacher.model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = teacher(x)["cls"].clone()
        for p in student.parameters():
            p.add_(0.1)
        assert torch.equal(teacher(x)["cls"], before) and not torch.equal(student(x)["cls"], before)
