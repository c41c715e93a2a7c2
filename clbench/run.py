"""`clbench run`: one strategy through every stage, every task evaluated after each (see ``Strategy``'s
docstring for the loop). The environment pieces live in ``clbench.runtime``, the files in ``clbench.recorder``."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch.utils.data import DataLoader

from clbench.bn_audit import BatchNormAudit
from clbench.config import RunConfig
from clbench.evaluate import EVAL_BATCH, evaluate_task
from clbench.loop import StageSettings, task_loss, train_stage
from clbench.model import UniHeadNet
from clbench.plugins import create
from clbench.recorder import Recorder, StageResources
from clbench.resources import budget_checks, device_name, latency_ms, peak_memory_mb
from clbench.results import environment, save_checkpoint, to_json
from clbench.runtime import (MemoryCache, ModelConfig, Session, build_model, cached_in_memory, data_root, loader,
                             resolve_device, seed_everything)
from clbench.strategy import StageContext, Strategy
from clbench.tasks import TaskSpec


def run(config: RunConfig, *, stage1_cache: Path | None = None, on_stage: Callable[[int, str], None] | None = None,
        session: Session | None = None) -> Path:
    """Train and evaluate every stage; returns the run folder. Finished stages stay on disk if a later one fails.

    ``stage1_cache``: a file holding the model right after stage-1 training for exactly this configuration
    (but the strategy); used if present and the strategy declares ``shares_first_stage``, written if absent.
    ``on_stage(stage, task)`` is called before each stage (progress displays). ``session``: shared caches
    (a comparison passes one to all its cells).
    """
    session = session or Session()
    seed_everything(config.seed)
    device = resolve_device(config.device)
    root, benchmark = data_root(config.data_root, config.synth_train, config.synth_val)
    session.verify(root)
    from clbench.benchmarks import load_tasks
    from clbench.benchmarks.stream import build_stream
    tasks = load_tasks(root, config.order, image_size=config.image_size, augment=config.augment)
    specs = tuple(t.spec for t in tasks)
    strategy, options = create(config.strategy, config.set)
    config = dataclasses.replace(config, set=options)  # config.yaml records every resolved hyperparameter
    model = build_model(model_config(config), list(specs), device, pretrained=config.pretrained,
                        pretrained_file=config.pretrained_file)
    tests = [cached_in_memory(t.test, config.image_size) for t in tasks]
    stream = build_stream([t.train for t in tasks], tests)
    recorder = open_run(config, strategy, benchmark, root, device, model, specs, session)
    test_loaders = [loader(exp.dataset, batch_size=EVAL_BATCH, shuffle=False, seed=config.seed, device=device,
                           workers=0 if isinstance(test, MemoryCache) else config.workers)
                    for exp, test in zip(stream.test_stream, tests)]
    evaluate_all(recorder, model, tasks, test_loaders, device, stage=0, stage_task="none")
    recorder.commit(0, None)
    audit = BatchNormAudit()
    for stage, experience in enumerate(stream.train_stream, start=1):
        if on_stage:
            on_stage(stage, specs[stage - 1].name)
        ctx = stage_context(config, model, specs, stage, experience, device)
        use_cache = stage == 1 and strategy.shares_first_stage
        run_stage(recorder, ctx, strategy, config, stage1_cache if use_cache else None)
        evaluate_stage(recorder, audit, model, tasks, test_loaders, device, stage)
        recorder.commit(stage, {"model": model.state_dict(), "strategy": strategy.state_dict(), "stage": stage,
                                "task": ctx.task.name, "model_config": model_config(config).to_dict(),
                                "tasks": [t.to_dict() for t in specs]})
    write_resources(recorder, model, specs, device, session, config.latency_sizes)
    return recorder.run_dir


def model_config(config: RunConfig) -> ModelConfig:
    return ModelConfig(backbone=config.backbone, head_channels=config.head_channels, head_stride=config.head_stride,
                       image_size=config.image_size, order=config.order)


def open_run(config: RunConfig, strategy: Strategy, benchmark: str, root: Path, device: torch.device,
             model: UniHeadNet, specs: tuple[TaskSpec, ...], session: Session) -> Recorder:
    """Claim the run folder and write config.yaml, env.json and tasks.json into it."""
    from clbench.benchmarks import TASK_DIRS
    run_id = config.run_id or f"{strategy.name}-seed{config.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    hashes = {t.name: (root / TASK_DIRS[t.kind], session.tree_hash(root / TASK_DIRS[t.kind])) for t in specs}
    env = {**environment(device, hashes), "counts": model.parameter_counts(),
           "seeding": {"python": config.seed, "numpy": config.seed, "torch": config.seed,
                       "loader_generator": "seed + 1000 * stage", "strategy": "StageContext.generator(seed, stage)"}}
    files = {"config.yaml": yaml.safe_dump(config.to_dict(), sort_keys=False), "env.json": to_json(env),
             "tasks.json": to_json([t.to_dict() for t in specs])}
    return Recorder.create(Path(config.out), run_id, {"benchmark": benchmark, "strategy": strategy.name,
                                                      "seed": config.seed}, files)


def stage_context(config: RunConfig, model: UniHeadNet, specs: tuple[TaskSpec, ...], stage: int, experience: Any,
                  device: torch.device) -> StageContext:
    task = specs[stage - 1]
    train_loader = loader(experience.dataset, batch_size=config.batch_size[task.name], shuffle=True,
                          seed=config.seed + 1000 * stage, workers=config.workers, device=device)
    size = (config.image_size,) * 2
    return StageContext(model=model, stage=stage, task=task, tasks=specs, seed=config.seed, device=device,
                        train_loader=train_loader, task_loss=lambda t, out, y: task_loss(model, t, out, y, size))


def run_stage(recorder: Recorder, ctx: StageContext, strategy: Strategy, config: RunConfig, cache: Path | None) -> None:
    """Train (or restore from the stage-1 cache), then the strategy's after_stage; records time and params."""
    settings = StageSettings(epochs=config.epochs[ctx.task.name], lr=config.lr[ctx.task.name],
                             weight_decay=config.weight_decay, grad_clip=config.grad_clip, amp=config.amp)
    if cache is not None and cache.exists():
        seconds, saved = 0.0, restore_stage1(cache, ctx)
    else:
        start = time.perf_counter()
        train_stage(ctx, strategy, settings, progress=config.progress)
        seconds, saved = time.perf_counter() - start, 0.0
        if cache is not None:
            save_stage1(cache, ctx, seconds)
    strategy.after_stage(ctx)
    recorder.resources.stages[ctx.stage] = StageResources(ctx.task.name, seconds, saved,
                                                          parameters=ctx.model.parameter_counts())


def save_stage1(cache: Path, ctx: StageContext, seconds: float) -> None:
    """The model right after stage-1 training, the torch RNG and the loader's shuffle state."""
    save_checkpoint(cache, {"model": ctx.model.state_dict(), "rng": torch.get_rng_state(),
                            "loader_rng": ctx.train_loader.generator.get_state(), "seconds": seconds})


def restore_stage1(cache: Path, ctx: StageContext) -> float:
    """The state ``save_stage1`` wrote, as if this run had trained it; returns the training seconds it stands for."""
    saved = torch.load(cache, map_location=ctx.device, weights_only=True)
    ctx.model.load_state_dict(saved["model"])
    torch.set_rng_state(saved["rng"])
    ctx.train_loader.generator.set_state(saved["loader_rng"])  # as if its epochs had drawn their shuffles
    return float(saved["seconds"])


def evaluate_all(recorder: Recorder, model: torch.nn.Module, tasks: list[Any], test_loaders: list[DataLoader],
                 device: torch.device, *, stage: int, stage_task: str) -> dict[str, tuple[float, int]]:
    """Every task's metrics into the recorder; returns each task's primary (value, n)."""
    primary = {}
    for task, test_loader in zip(tasks, test_loaders):
        result = evaluate_task(model, task.spec, test_loader, device, task.test.coco if task.spec.kind == "det" else None)
        recorder.add_evaluation(stage, stage_task, task.spec, result)
        primary[task.spec.name] = result.metrics[task.spec.metric]
    return primary


def evaluate_stage(recorder: Recorder, audit: BatchNormAudit, model: torch.nn.Module, tasks: list[Any],
                   test_loaders: list[DataLoader], device: torch.device, stage: int) -> None:
    """After a stage: every task evaluated, BN drift audited (and attributed after the last stage); timed."""
    stage_task = tasks[stage - 1].spec.name
    start = time.perf_counter()
    primary = evaluate_all(recorder, model, tasks, test_loaders, device, stage=stage, stage_task=stage_task)
    audit_start = time.perf_counter()
    for reference_stage, drift in audit.record(model, stage):
        recorder.add_bn_drift(stage, stage_task, reference_stage, drift)
    if stage == len(tasks):
        for own_stage, (task, test_loader) in enumerate(zip(tasks[: stage - 1], test_loaders), start=1):
            gt = task.test.coco if task.spec.kind == "det" else None
            value, n = audit.own_bn_metric(model, own_stage, primary[task.spec.name],
                                           lambda: evaluate_task(model, task.spec, test_loader, device,
                                                                 gt).metrics[task.spec.metric])
            recorder.add_metric(stage, stage_task, task.spec, f"{task.spec.metric}_own_bn", value, n)
    resources = recorder.resources.stages[stage]
    resources.eval_seconds, resources.bn_audit_seconds = audit_start - start, time.perf_counter() - audit_start


def write_resources(recorder: Recorder, model: UniHeadNet, specs: tuple[TaskSpec, ...], device: torch.device,
                    session: Session, sizes: tuple[int, ...]) -> None:
    """resources.json: the stages' times plus latency (once per session and architecture), memory, budgets."""
    key = (tuple((n, p.shape) for n, p in model.named_parameters()), tuple(t.name for t in specs), str(device), sizes)
    if key not in session.latency:
        session.latency[key] = {t.name: {size: latency_ms(model, t, size, device) for size in sizes} for t in specs}
    resources = recorder.resources
    resources.device, resources.latency_ms, resources.memory = device_name(device), session.latency[key], \
        peak_memory_mb(device)
    resources.budgets = budget_checks(model.parameter_counts()["total"],
                                      {t: v.get(512) for t, v in resources.latency_ms.items()}, resources.device)
    recorder.write_resources()
