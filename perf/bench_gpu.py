"""The GPU benchmark: one script, one run, under 5 minutes on one GPU (it stops starting measurements when its
time budget is spent, and says which it skipped). Also runs on a CPU, where it says so and measures a smaller set.

Measured, with the harness's own code (``clbench.run``'s setup, ``clbench.loop.train_epoch``, the in-memory
loader, ``clbench.evaluate``):
- training images/s per task at 256 and 512 px, batch 16 and 64, AMP on/off, torch.compile off (and on, last,
  while time is left): loader + step, as a stage runs;
- the loader's images/s alone (in-memory path with and without augmentation, and the per-image path) vs the
  training step's images/s on batches already on the device: loader/step > 1 means compute bounds a stage;
- evaluation images/s per task (forward + post-processing + metrics, float32, as every stage evaluates);
- batch-1 latency at 512 px per task, float32 and AMP (median of 50 after 10 warm-up; CUDA events on a GPU);
- the full 3-stage schedule (`clbench run`, defaults) on 240/60-image synthetic sets at 512 px: wall time;
- peak GPU memory per measurement and overall.
On a CPU: 128 px and batch 16 only, no torch.compile (inductor compiles for minutes here), the schedule at 128 px,
and the in-memory path against the per-image path (ratio printed: it must not be slower).

    python perf/bench_gpu.py [--device auto|cuda|cpu] [--budget-s 280] [--out perf/bench_gpu.json]
                             [--skip train,eval,latency,schedule,compile]

Prints a table and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from clbench.accel import Precision, compile_model, precision
from clbench.build import prepare
from clbench.config import resolve
from clbench.evaluate import evaluate_task
from clbench.loop import StageSettings, train_epoch
from clbench.memory import MemoryLoader
from clbench.plugins import create
from clbench.resources import device_name, latency_ms
from clbench.run import run
from clbench.runtime import Session, loader
from clbench.stage import stage_context
from clbench.strategy import StageContext
from clbench.tensors import to_device

TASKS = ("seg", "det", "cls")


class Budget:
    """Wall-clock budget: a measurement starts only if its estimate fits what is left."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.end - time.perf_counter()

    def allows(self, what: str, estimate: float) -> bool:
        if self.left() >= estimate:
            return True
        self.skipped.append(f"{what} (needs ~{estimate:.0f} s, {max(self.left(), 0):.0f} s left)")
        return False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, work: Callable[[], Any]) -> float:
    sync(device)
    start = time.perf_counter()
    work()
    sync(device)
    return time.perf_counter() - start


def peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def setup_for(size: int, device: torch.device, data: dict[str, str], **extra: str) -> Any:
    settings = {**data, "image_size": str(size), "device": device.type, "progress": "false", "latency_sizes": "",
                **extra}
    return prepare(resolve(None, settings), Session())


def memory_loader(setup: Any, index: int, batch: int) -> MemoryLoader:
    experience = list(setup.stream.train_stream)[index]
    return MemoryLoader(lambda: setup.decoded_set(index), experience.dataset, batch_size=batch, seed=0,
                        device=setup.device, task_label=index)


def epochs_rate(setup: Any, model: torch.nn.Module, index: int, batches: Any, amp: Precision, epochs: int) -> float:
    """Images/s of ``epochs`` passes over ``batches`` (a loader, or batches already on the device) through
    clbench's loop with naive fine-tuning, after one warm-up pass."""
    ctx = stage_context(setup, index + 1, list(setup.stream.train_stream)[index])
    ctx = StageContext(model=model, stage=ctx.stage, task=ctx.task, tasks=ctx.tasks, seed=0, train_loader=batches,
                       device=ctx.device, task_loss=ctx.task_loss)
    strategy, _ = create("naive", {})
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-4)
    settings = StageSettings(epochs=1, lr=1e-4, weight_decay=0.0, grad_clip=10.0, precision=amp)
    scaler = amp.scaler()
    model.train()
    train_epoch(ctx, strategy, batches, params, optimizer, scaler, settings, 0)          # warm-up
    seconds = timed(setup.device, lambda: [train_epoch(ctx, strategy, batches, params, optimizer, scaler, settings, e)
                                           for e in range(epochs)])
    return epochs * sum(len(b[0]) for b in batches) / seconds if isinstance(batches, list) else \
        epochs * len(batches.dataset) / seconds


def loader_rate(device: torch.device, batches: Any, epochs: int) -> float:
    """Images/s of iterating a loader (batches moved to the device), nothing else."""
    def once() -> int:
        n = 0
        for images, targets, _ in batches:
            to_device(images, device), to_device(targets, device)
            n += len(images)
        return n
    once()
    count = [0]
    seconds = timed(device, lambda: count.__setitem__(0, sum(once() for _ in range(epochs))))
    return count[0] / seconds


@dataclass
class Plan:
    """What this run measures on its device (the GPU grid, or the CPU's smaller set) and its time budget."""

    device: torch.device
    budget: Budget
    skip: set[str]
    data: dict[str, str] = field(default_factory=lambda: {"synth_train": "240", "synth_val": "60"})

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def sizes(self) -> tuple[int, ...]:
        return (256, 512) if self.cuda else (128,)

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return (16, 64) if self.cuda else (16,)

    @property
    def amp_modes(self) -> tuple[str, ...]:
        return ("off", "auto") if self.cuda else ("off",)

    @property
    def epochs(self) -> int:
        return 2 if self.cuda else 1


def measure_loaders(plan: Plan, setup: Any, index: int, batch: int) -> dict[str, Any]:
    """Loader images/s of one task: in memory, in memory augmented on the device, per image."""
    fast = memory_loader(setup, index, batch)
    augmented = copy.copy(setup.decoded_set(index))
    augmented.augment = True
    slow = loader(fast.dataset, batch_size=batch, shuffle=True, seed=0, workers=0, device=plan.device)
    return {"task": TASKS[index], "size": setup.config.image_size, "batch": batch,
            "memory_images_per_s": loader_rate(plan.device, fast, plan.epochs),
            "memory_augmented_images_per_s": loader_rate(plan.device, MemoryLoader(
                lambda: augmented, fast.dataset, batch_size=batch, seed=0, device=plan.device, task_label=index),
                plan.epochs),
            "per_image_images_per_s": loader_rate(plan.device, slow, 1)}


def measure_training(plan: Plan, setup: Any, per_image: Any, index: int, batch: int, amp_mode: str,
                     loaders: dict[str, Any]) -> dict[str, Any]:
    """Training images/s of one task through the in-memory loader, of the step alone, and (on a CPU) through the
    per-image loader."""
    amp, fast = precision(amp_mode, plan.device), memory_loader(setup, index, batch)
    base = copy.deepcopy(setup.model)
    reset_peak(plan.device)
    row = {"task": TASKS[index], "size": setup.config.image_size, "batch": batch, "amp": amp.name, "compile": False,
           "train_images_per_s": epochs_rate(setup, copy.deepcopy(base), index, fast, amp, plan.epochs),
           "step_images_per_s": epochs_rate(setup, copy.deepcopy(base), index, list(fast), amp, plan.epochs)}
    row["loader_over_step"] = loaders["memory_images_per_s"] / row["step_images_per_s"]
    if per_image is not None:
        slow = stage_context(per_image, index + 1, list(per_image.stream.train_stream)[index]).train_loader
        row["per_image_train_images_per_s"] = epochs_rate(per_image, copy.deepcopy(base), index, slow, amp,
                                                          plan.epochs)
        row["memory_over_per_image"] = row["train_images_per_s"] / row["per_image_train_images_per_s"]
    row["peak_gpu_mb"] = peak_mb(plan.device)
    return row


def measure_size(plan: Plan, size: int, result: dict[str, Any]) -> None:
    """Loaders, training, evaluation and (at the largest size) batch-1 latency at one input size."""
    setup = setup_for(size, plan.device, plan.data)
    per_image = None if plan.cuda else setup_for(size, plan.device, plan.data, train_in_memory_mb="0")
    for index, task in enumerate(TASKS):
        for batch in plan.batch_sizes if "train" not in plan.skip else ():
            if not plan.budget.allows(f"loader {task} {size}px b{batch}", 5):
                continue
            loaders = measure_loaders(plan, setup, index, batch)
            result["loader"].append(loaders)
            for amp_mode in plan.amp_modes:
                if plan.budget.allows(f"train {task} {size}px b{batch} amp={amp_mode}", 10 if plan.cuda else 60):
                    result["train"].append(measure_training(plan, setup, per_image, index, batch, amp_mode, loaders))
    for index, task in enumerate(TASKS if "eval" not in plan.skip else ()):
        if plan.budget.allows(f"eval {task} {size}px", 10 if plan.cuda else 30):
            args = (copy.deepcopy(setup.model), setup.specs[index], setup.test_loaders[index], plan.device,
                    setup.tasks[index].coco_gt)
            evaluate_task(*args)                                                                # warm-up
            seconds = timed(plan.device, lambda: evaluate_task(*args))
            result["eval"].append({"task": task, "size": size,
                                   "images_per_s": len(setup.test_loaders[index].dataset) / seconds})
    if size == plan.sizes[-1] and "latency" not in plan.skip and \
            plan.budget.allows("batch-1 latency at 512 px", 10 if plan.cuda else 30):
        for index, task in enumerate(TASKS):
            model, spec, amp = copy.deepcopy(setup.model), setup.specs[index], precision("auto", plan.device)
            figures = {"fp32": latency_ms(model, spec, 512, plan.device, repeats=50, warmup=10)}
            if amp.dtype is not None:
                figures[amp.name] = latency_ms(model, spec, 512, plan.device, autocast=amp.autocast(), repeats=50,
                                               warmup=10)
            result["latency_512_ms"][task] = figures


def measure_schedule(plan: Plan, result: dict[str, Any]) -> None:
    """`clbench run` with its defaults on the 240/60 sets: at 512 px on a GPU; at 128 px on a CPU, in memory and
    per image (the ratio says whether the in-memory path is slower)."""
    size = 512 if plan.cuda else 128
    paths = (("memory", "4096"),) if plan.cuda else (("memory", "4096"), ("per-image", "0"))
    for path, mb in paths if "schedule" not in plan.skip else ():
        if not plan.budget.allows(f"schedule {path} {size}px", 60 if plan.cuda else 150):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            settings = {**plan.data, "image_size": str(size), "device": plan.device.type, "progress": "false",
                        "latency_sizes": "512" if plan.cuda else "", "out": tmp, "run_id": "schedule",
                        "train_in_memory_mb": mb}
            reset_peak(plan.device)
            start = time.perf_counter()
            run_dir = run(resolve(None, settings))
            wall = time.perf_counter() - start
            resources = json.loads((run_dir / "resources.json").read_text())
        result["schedule"][path] = {"size": size, "wall_s": wall, "train_s": resources["train_seconds"],
                                    "eval_s": resources["eval_seconds"], "peak_gpu_mb": peak_mb(plan.device)}
    if {"memory", "per-image"} <= set(result["schedule"]):
        result["schedule"]["per_image_over_memory_wall"] = (result["schedule"]["per-image"]["wall_s"]
                                                            / result["schedule"]["memory"]["wall_s"])


def measure_compile(plan: Plan, result: dict[str, Any]) -> None:
    """torch.compile'd training of det, last and while time is left, the most telling first (512 px, batch 64,
    AMP): each shape and precision compiles once."""
    for size in reversed(plan.sizes):
        setup = setup_for(size, plan.device, plan.data)
        for batch in reversed(plan.batch_sizes):
            for amp_mode in reversed(plan.amp_modes):
                if not plan.budget.allows(f"compiled train det {size}px b{batch} amp={amp_mode}", 60):
                    continue
                amp, model = precision(amp_mode, plan.device), compile_model(copy.deepcopy(setup.model))
                start = time.perf_counter()
                rate = epochs_rate(setup, model, 1, memory_loader(setup, 1, batch), amp, plan.epochs)
                result["train"].append({"task": "det", "size": size, "batch": batch, "amp": amp.name, "compile": True,
                                        "train_images_per_s": rate,
                                        "seconds_with_compiling": time.perf_counter() - start,
                                        "peak_gpu_mb": peak_mb(plan.device)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting measurements after this (default: 280 on a GPU, 900 on a CPU)")
    parser.add_argument("--out", default="perf/bench_gpu.json")
    parser.add_argument("--skip", default="", help="comma-separated parts not to measure: "
                        "train,eval,latency,schedule,compile")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    seconds = args.budget_s or (280.0 if device.type == "cuda" else 900.0)
    plan = Plan(device, Budget(seconds), {part.strip() for part in args.skip.split(",") if part.strip()})
    result: dict[str, Any] = {"device": device_name(device), "cuda": plan.cuda, "torch": torch.__version__,
                              "amp_auto": precision("auto", device).name, "train": [], "loader": [], "eval": [],
                              "latency_512_ms": {}, "schedule": {}, "notes": []}
    if not plan.cuda:
        result["notes"].append("CPU run: 128 px, batch 16, AMP off (bf16 autocast trains slower on this CPU), no "
                               "torch.compile (inductor compiles for minutes on a CPU); the GPU grid needs a GPU")
    reset_peak(device)
    for size in plan.sizes:
        measure_size(plan, size, result)
    measure_schedule(plan, result)
    if plan.cuda and "compile" not in plan.skip:
        measure_compile(plan, result)
    result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20 if plan.cuda else None
    result["skipped"] = plan.budget.skipped
    result["seconds"] = seconds - plan.budget.left()
    report(result)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"written: {args.out}")


def report(result: dict[str, Any]) -> None:
    print(f"device: {result['device']} (torch {result['torch']}; --amp auto here = {result['amp_auto']})")
    for note in result["notes"]:
        print(f"note: {note}")
    print("\ntraining images/s (loader + step, clbench's loop)  | step alone | loader/step | peak GPU MiB")
    for row in result["train"]:
        extra = f"  in-memory/per-image {row['memory_over_per_image']:.2f}x" if "memory_over_per_image" in row else ""
        step = f"{row['step_images_per_s']:9.1f}" if "step_images_per_s" in row else " " * 9
        ratio = f"{row['loader_over_step']:8.1f}" if "loader_over_step" in row else " " * 8
        compiled = f" compiled ({row['seconds_with_compiling']:.0f} s incl. compiling)" if row["compile"] else ""
        print(f"  {row['task']:3} {row['size']:4}px b{row['batch']:<3} amp={row['amp']:4}{compiled}: "
              f"{row['train_images_per_s']:9.1f} | {step} | {ratio} | {row['peak_gpu_mb'] or '-'}{extra}")
    print("\nloader images/s: in memory | in memory, augmented on the device | per image (0 workers)")
    for row in result["loader"]:
        print(f"  {row['task']:3} {row['size']:4}px b{row['batch']:<3}: {row['memory_images_per_s']:10.1f} | "
              f"{row['memory_augmented_images_per_s']:10.1f} | {row['per_image_images_per_s']:10.1f}")
    print("\nevaluation images/s (float32, metrics included)")
    for row in result["eval"]:
        print(f"  {row['task']:3} {row['size']:4}px: {row['images_per_s']:.1f}")
    print("\nbatch-1 latency at 512 px, ms (median of 50 after 10 warm-up)")
    for task, figures in result["latency_512_ms"].items():
        print(f"  {task:3}: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()))
    print("\nfull 3-stage schedule (240/60 images per task)")
    for path, row in result["schedule"].items():
        if isinstance(row, dict):
            print(f"  {path:9} at {row['size']} px: {row['wall_s']:.1f} s wall (training {row['train_s']:.1f} s, "
                  f"evaluation {row['eval_s']:.1f} s), peak GPU {row['peak_gpu_mb'] or '-'} MiB")
    if "per_image_over_memory_wall" in result["schedule"]:
        print(f"  per-image / in-memory wall time: {result['schedule']['per_image_over_memory_wall']:.3f} "
              "(>= 1: the in-memory path is not slower)")
    if result["skipped"]:
        print("\nskipped (time budget): " + "; ".join(result["skipped"]))
    print(f"\npeak GPU memory: {result['peak_gpu_mb'] or '-'} MiB; benchmark took {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
