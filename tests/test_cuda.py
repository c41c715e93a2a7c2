"""What differs on a GPU: every built-in strategy under AMP (bf16 and fp16 with a GradScaler), loss terms in
float32, checkpoints across devices, `clbench compare --device cuda`, determinism, torch.compile (inductor),
the in-memory path's pinned batches, latency by CUDA events (the loss-term check's CUDA case is in
tests/test_accel.py, one parametrisation of the CPU test). Marked ``cuda``: skipped, saying why, where torch
sees no CUDA device (conftest); `pytest -m cuda` runs only these."""

import json

import pandas as pd
import pytest
import torch

from clbench import ClbenchError
from clbench.build import prepare
from clbench.checkpoint import evaluate_checkpoint
from clbench.cli import main
from clbench.config import resolve
from clbench.memory import MemoryLoader
from clbench.plugins import registered
from clbench.recorder import read_rows
from clbench.run import run
from clbench.runtime import Session
from clbench.stage import stage_context
from clbench.testing import smoke_test

pytestmark = pytest.mark.cuda

BUILTINS = sorted(name for name, found in registered().items() if found.origin == "built-in")
PRIMARY = ["mAP", "mIoU", "top1"]


def cuda_args(tiny_args):
    return {**tiny_args, "device": "cuda"}


def primary(run_dir):
    rows = read_rows(run_dir)
    return rows[rows["metric"].isin(PRIMARY)].drop(columns=["run_id"]).reset_index(drop=True)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("name", BUILTINS)
def test_every_builtin_strategy_trains_three_stages_on_cuda_under_amp(name, amp, tmp_path):
    if amp == "bf16" and not torch.cuda.is_bf16_supported():   # such a GPU refuses bf16 in one line
        with pytest.raises(ClbenchError, match="--amp bf16: this GPU has no bfloat16 support"):
            smoke_test(name, workdir=tmp_path, settings={"device": "cuda", "amp": amp})
        return
    rows = smoke_test(name, workdir=tmp_path, settings={"device": "cuda", "amp": amp})
    assert set(rows["strategy"]) == {name}


def test_auto_precision_and_what_the_run_records(tiny_args):
    run_dir = run(resolve(None, {**cuda_args(tiny_args), "run_id": "auto", "latency_sizes": "64,512"}))
    env = json.loads((run_dir / "env.json").read_text())
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert env["acceleration"]["amp"] == expected and env["acceleration"]["cudnn_benchmark"] is True
    resources = json.loads((run_dir / "resources.json").read_text())
    assert resources["latency"]["timer"] == "cuda-events"
    for key in ("latency_ms", "latency_amp_ms"):
        assert all(ms > 0 for sizes in resources[key].values() for ms in sizes.values())
    assert resources["memory"]["cuda_max_allocated_mb"] > 0
    assert {d["path"] for d in resources["training_data"].values()} == {"memory"}


def test_a_checkpoint_written_on_gpu_evaluates_on_cpu_and_one_written_on_cpu_on_gpu(tiny_args, tiny_root):
    """Across devices the network is the same; float rounding differs (cuDNN vs CPU kernels), so a metric may
    move by a prediction on these 10-image test sets: within 0.1 (one image of ten)."""
    for written, read in (("cuda", "cpu"), ("cpu", "cuda")):
        run_dir = run(resolve(None, {**tiny_args, "device": written, "run_id": f"on-{written}"}))
        final = read_rows(run_dir).query("stage == 3 and metric in @PRIMARY")
        recorded = {r.eval_task: r.value for r in final.itertuples()}
        again = evaluate_checkpoint(run_dir / "checkpoints" / "stage3.pt", tiny_root, "all", read)
        for task, metrics in again.items():
            assert abs(next(iter(metrics.values())) - recorded[task]) <= 0.1, (written, read, task)


def test_compare_runs_end_to_end_on_cuda(tiny_args, tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "--strategies", "naive,lwf", "--device", "cuda", "--data-root", tiny_args["data_root"],
                 "--backbone", "test_efficientnet", "--image-size", "64", "--epochs", "1", "--batch-size", "4",
                 "--head-channels", "16", "--progress", "false", "--latency-sizes", "", "--out", str(out)]) == 0
    folder = next(out.iterdir())
    assert (folder / "summary.csv").exists()
    for env in folder.glob("runs/*/env.json"):
        assert json.loads(env.read_text())["device"].startswith("cuda")


def test_deterministic_runs_repeat_exactly_and_others_closely(tiny_args, record_property):
    same = [primary(run(resolve(None, {**cuda_args(tiny_args), "deterministic": "true", "run_id": f"d{i}"})))
            for i in range(2)]
    pd.testing.assert_frame_equal(same[0], same[1])
    loose = [primary(run(resolve(None, {**cuda_args(tiny_args), "run_id": f"n{i}"}))) for i in range(2)]
    difference = float((loose[0]["value"] - loose[1]["value"]).abs().max())
    record_property("max_abs_difference_without_deterministic", difference)
    print(f"without --deterministic: largest metric difference between two runs of one seed = {difference:.6f}")
    assert difference <= 0.1


def test_a_compiled_run_on_cuda_is_close_to_the_eager_one(tiny_args):
    compiled = primary(run(resolve(None, {**cuda_args(tiny_args), "compile": "true", "run_id": "compiled"})))
    eager = primary(run(resolve(None, {**cuda_args(tiny_args), "run_id": "eager"})))
    assert (compiled["value"] - eager["value"]).abs().max() <= 0.1


def test_memory_batches_are_pinned_and_equal_the_per_image_batches_on_the_gpu(tiny_args):
    memory = prepare(resolve(None, cuda_args(tiny_args)), Session())
    per_image = prepare(resolve(None, {**cuda_args(tiny_args), "train_in_memory_mb": "0"}), Session())
    fast = stage_context(memory, 1, next(iter(memory.stream.train_stream))).train_loader
    slow = stage_context(per_image, 1, next(iter(per_image.stream.train_stream))).train_loader
    assert isinstance(fast, MemoryLoader) and fast.decoded.images.is_pinned()
    for (xf, yf, _), (xs, ys, _) in zip(fast, slow, strict=True):
        assert xf.is_cuda and yf.is_cuda
        torch.testing.assert_close(xf, xs.cuda(), rtol=0, atol=1e-6)
        assert torch.equal(yf, ys.cuda())
