"""The ``joint`` bound: one network trained on every task at once, with the sequential runs' budget (the
literature's usual upper bound; with the same budget it need not be one: measure, do not assume).

How batches are mixed (also written to the run's ``joint.json``): the joint run takes as many optimizer steps
as the sequential schedule, N = sum over tasks of epochs[t] x ceil(n[t] / batch_size[t]), and sees exactly as
many images of each task as its sequential stage, I[t] = epochs[t] x n[t]: step i (0-based) holds
floor((i + 1) I[t] / N) - floor(i I[t] / N) images of every task t (about I[t] / N; the mixed batch is about
the mean batch size), drawn from an endless sequence of shuffles of t's training set (its own generator, seed +
1000 x its stage). One forward pass over the mixed batch (BatchNorm sees every task's images together), each
task's own loss on its own images, summed. One AdamW over every parameter at the mean of the tasks' learning
rates (the sequential stages may use one each), the same weight decay, clipping and AMP as a stage. Evaluated
before training (stage 0) and after it (stage 1, stage_task ``joint``), every task, as a sequential run's
stages are. A task that a benchmark file trains over several class steps (DESIGN.md §8) is trained here on its
whole training set with every class, I[t] = epochs[t] x the sum of its experiences' image counts, and evaluated on
every class.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from clbench.benchmarks.stream import labelled
from clbench.build import Setup, model_config, prepare, synthetic_settings
from clbench.config import RunConfig
from clbench.loop import OnStep, optimizer_step, scheduler, task_loss
from clbench.recorder import Recorder, StageResources
from clbench.results import atomic_write, to_json
from clbench.runtime import Session
from clbench.stage import evaluate_all, open_trackers, stage_steps, start
from clbench.tensors import to_device

JOINT = "joint"


def share(step: int, images: int, steps: int) -> int:
    """Images of a task in joint step ``step`` (0-based): ``images`` spread evenly over ``steps``."""
    return (step + 1) * images // steps - step * images // steps


def shuffled(n: int, seed: int) -> Iterator[int]:
    """Indices 0..n-1 in a new random order each pass, from a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield from torch.randperm(n, generator=generator).tolist()


def run_joint(config: RunConfig, *, session: Session | None = None, group: tuple[str, Path] | None = None) -> Path:
    """Train and evaluate the joint bound into ``config.out / config.run_id``; returns the run folder. A folder
    left by an interrupted joint run is replaced (the joint run is one stage: nothing finished is lost).
    ``group``: as for ``clbench.run.run`` (the trackers of ``--log`` file the run under it)."""
    session = session or Session()
    run_dir = Path(config.out) / str(config.run_id)
    if run_dir.exists() and not (run_dir / "done.json").exists():
        shutil.rmtree(run_dir)
    setup = prepare(config, session)
    recorder, _, _ = start(setup, session, resume=False)
    steps = sum(stage_steps(setup))
    datasets = [labelled(t.train, k) for k, t in enumerate(setup.tasks)]   # every class of each task
    images = [config.epochs[t.name] * sum(len(e.train) for e in setup.experiences if e.task == k)
              for k, t in enumerate(setup.specs)]
    lr = sum(config.lr[t.name] for t in setup.specs) / len(setup.specs)
    trackers = open_trackers(setup, recorder, 0, group or ("clbench", Path(config.out)))
    try:
        start_time = time.perf_counter()
        losses = train_joint(setup, datasets, images, steps, lr,
                             (lambda step, values: trackers.scalars(values, step)) if trackers.active else None)
        seconds = time.perf_counter() - start_time
        finish(setup, recorder, seconds, losses, steps, images, lr)
    except BaseException as exc:
        trackers.close("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    trackers.stage(1, recorder.rows, setup.specs)
    trackers.close()
    return recorder.run_dir


def finish(setup: Setup, recorder: Recorder, seconds: float, losses: list[float], steps: int, images: list[int],
           lr: float) -> None:
    """Evaluate every task, then the checkpoint, the rows, joint.json and resources.json."""
    config = setup.config
    recorder.resources.stages[1] = StageResources(JOINT, seconds, parameters=setup.model.parameter_counts())
    eval_start = time.perf_counter()
    evaluate_all(recorder, setup, stage=1, stage_task=JOINT, seen_after=len(setup.experiences))
    recorder.resources.stages[1].eval_seconds = time.perf_counter() - eval_start
    recorder.commit(1, {"model": setup.model.state_dict(), "stage": 1, "task": JOINT,
                        "model_config": _model_config(setup), "tasks": [t.to_dict() for t in setup.specs],
                        "evaluation": {}, "synthetic": synthetic_settings(config)})
    atomic_write(recorder.run_dir / "joint.json", to_json({
        "steps": steps, "sequential_steps": {t.name: sum(n for e, n in zip(setup.experiences, stage_steps(setup))
                                                        if e.task == k) for k, t in enumerate(setup.specs)},
        "images_seen": dict(zip(config.order, images)), "mean_images_per_step": sum(images) / steps,
        "lr": lr, "mean_loss_first_last_10_steps": [_mean(losses[:10]), _mean(losses[-10:])],
        "how": __doc__.split("\n\n")[1].replace("\n", " ")}))
    recorder.write_resources()


def task_batch(setup: Setup, index: int, dataset: Any, items: list[int]) -> tuple[torch.Tensor, Any]:
    """Items of task ``index`` as (network input, targets) on the device: from its in-memory set (augmented on
    the device) when it has one, else read image by image from ``dataset``."""
    if setup.in_memory[setup.specs[index].name]:
        return setup.decoded_set(index).batch(torch.tensor(items), setup.device)
    images, targets, _ = dataset.collate_fn([dataset[i] for i in items])
    return to_device(images, setup.device), to_device(targets, setup.device)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _model_config(setup: Setup) -> dict[str, Any]:
    return model_config(setup.config).to_dict()


def train_joint(setup: Setup, datasets: list[Any], images: list[int], steps: int, lr: float,
                on_step: OnStep | None = None) -> list[float]:
    """``steps`` optimizer steps on mixed batches (``images[t]`` of task t in all); returns every step's loss.
    ``on_step(step, values)`` after each step (from 1): the loss and each task's own loss (trackers)."""
    config, model, specs = setup.config, setup.model, setup.specs
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=config.weight_decay)
    schedule = scheduler(optimizer, steps, config.schedule, config.warmup)
    scaler = setup.precision.scaler()
    orders = [shuffled(len(d), config.seed + 1000 * stage) for stage, d in enumerate(datasets, start=1)]
    size, losses = (config.image_size,) * 2, []
    model.train()
    for step in range(steps):
        parts = []
        for index, (task, dataset, order, total) in enumerate(zip(specs, datasets, orders, images)):
            k = share(step, total, steps)
            if k:
                parts.append((task, *task_batch(setup, index, dataset, [next(order) for _ in range(k)])))
        batch_images = torch.cat([p[1] for p in parts])
        with setup.precision.autocast():
            outputs, start, own = model(batch_images), 0, {}
            for task, task_images, targets in parts:
                end = start + len(task_images)
                own[task.name] = task_loss(model, task, {k: v[start:end] for k, v in outputs.items()}, targets, size,
                                           config.assign)
                start = end
            loss = sum(own.values())
        losses.append(optimizer_step(loss, params, optimizer, scaler, config.grad_clip, f"joint, step {step + 1}")[0])
        schedule.step()
        if on_step:
            on_step(step + 1, {"train/loss": losses[-1], **{f"train/loss_{t}": v.item() for t, v in own.items()}})
    return losses
