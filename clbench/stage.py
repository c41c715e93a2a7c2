"""One stage of a run, the public stage API ``clbench.run`` and ``clbench.joint`` drive: its context, training (or
restoring stage 1 from the shared cache), ``after_stage``, every task evaluated as the strategy serves it, the BN
audit, the checkpoint; the stage-0 evaluation of a new run; the trackers' step axis."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from clbench.accel import Precision
from clbench.bn_audit import BatchNormAudit
from clbench.build import Probe, Setup, model_config, open_run, reopen_run, synthetic_settings
from clbench.config import RunConfig
from clbench.costs import StageCost
from clbench.curve import due
from clbench.evaluate import TaskEval, evaluate_task
from clbench.freezing import batchnorm_state
from clbench.incremental import grouped
from clbench.loop import StageSettings, task_loss, train_stage
from clbench.memory import MemoryLoader
from clbench.recorder import Recorder, StageResources
from clbench.results import TEST, VALIDATION, save_checkpoint
from clbench.runtime import (
    Session,
    loader,
    rng_state,
    set_rng_state,
    untouched,
)
from clbench.strategy import StageContext, Strategy
from clbench.trackers import TrackedRun, Trackers


def start(setup: Setup, session: Session, resume: bool) -> tuple[Recorder, BatchNormAudit, int]:
    """A new run folder with stage 0 evaluated, or an interrupted one restored; returns the last finished stage."""
    audit, done = BatchNormAudit(), 0
    if resume:
        recorder, done = reopen_run(setup, audit)
    else:
        recorder = open_run(setup, session)
    if done == 0:
        evaluate_all(recorder, setup, stage=0, stage_task="none")
        if setup.probes:
            evaluate_curve(recorder, setup, 0, 0, 0)   # the curve's reference point, before any training
        recorder.commit(0, None)
    return recorder, audit, done


def stage_steps(setup: "Setup") -> list[int]:
    """Optimizer steps of each stage (the trackers' step axis runs over the whole run)."""
    config = setup.config
    return [config.epochs[t.name] * math.ceil(len(exp.dataset) / config.batch_size[t.name])
            for t, exp in zip((setup.stage_task(k) for k in range(1, len(setup.experiences) + 1)),
                              setup.stream.train_stream)]


def open_trackers(setup: "Setup", recorder: Recorder, done: int, group: tuple[str, Path]) -> Trackers:
    """The trackers of ``--log`` (continued where trackers.json names them); stage 0 logged if it was just run."""
    env = json.loads((recorder.run_dir / "env.json").read_text())
    tracked = TrackedRun(recorder.run_dir, group[0], recorder.run_dir.name, group[1], setup.config.to_dict(), env)
    first_step = sum(stage_steps(setup)[:done]) + 1 if done else 0
    trackers = Trackers.open(setup.config.log, tracked, first_step, setup.config.mlflow_uri)
    if done == 0:
        trackers.stage(0, recorder.rows, setup.specs)
        trackers.scalars({f"curve/{p['eval_task']}/{p['metric']}": p["value"] for p in recorder.curve}, 0)
    return trackers


def log_resources(trackers: Trackers, resources: Any) -> None:
    """Each stage's times (step = stage), then peak memory and latency (step = the last stage)."""
    for stage, cost in resources.stages.items():
        trackers.scalars({"resources/train_seconds": cost.train_seconds, "resources/eval_seconds": cost.eval_seconds,
                          "resources/bn_audit_seconds": cost.bn_audit_seconds}, stage)
    last = max(resources.stages, default=0)
    latency = {f"resources/latency_ms_{task}_{size}": ms for task, sizes in resources.latency_ms.items()
               for size, ms in sizes.items() if ms is not None}
    memory = {f"resources/{k}": v for k, v in resources.memory.items() if isinstance(v, (int, float))}
    trackers.scalars({**memory, **latency}, last)


def stage_context(setup: Setup, stage: int, experience: Any) -> StageContext:
    config, model, specs, device = setup.config, setup.model, setup.specs, setup.device
    index, step = setup.experiences[stage - 1].task, setup.experiences[stage - 1].step
    task = specs[index]
    batch_size, seed = config.batch_size[task.name], config.seed + 1000 * stage
    if setup.in_memory[task.name]:
        train_loader: Any = MemoryLoader(lambda: setup.decoded_set(index, stage), experience.dataset,
                                         batch_size=batch_size, seed=seed, device=device,
                                         task_label=experience.task_label)
    else:
        train_loader = loader(experience.dataset, batch_size=batch_size, shuffle=True, seed=seed,
                              workers=config.workers, device=device)
    size = (config.image_size,) * 2
    seen = {t.name: t.class_steps.seen(setup.seen_step(k, stage)) for k, t in enumerate(specs)}
    masks = {t.name: seen[t.name] if t.incremental else None for t in specs}
    earlier = tuple(specs[k] for k in dict.fromkeys(e.task for e in setup.experiences[: stage - 1]) if k != index)
    return StageContext(model=model, stage=stage, task=task, tasks=specs, seed=config.seed, device=device,
                        train_loader=train_loader,
                        task_loss=lambda t, out, y: task_loss(model, t, out, y, size, config.assign, masks[t.name]),
                        stages=len(setup.experiences), step=step, earlier=earlier, seen=seen)


def stage_settings(config: RunConfig, task: str, amp: Precision) -> StageSettings:
    """What the loop needs of the configuration to train ``task``'s stage."""
    return StageSettings(epochs=config.epochs[task], lr=config.lr[task], weight_decay=config.weight_decay,
                         grad_clip=config.grad_clip, precision=amp, schedule=config.schedule, warmup=config.warmup,
                         assign=config.assign)


class InStage:
    """The per-step callback of a stage: the loss values to the trackers and, where ``--eval-every`` makes it due,
    every task evaluated on its probe (curve.csv). Its evaluation time is kept apart from training time."""

    def __init__(self, setup: Setup, recorder: Recorder, trackers: Trackers, stage: int, offset: int) -> None:
        self.setup, self.recorder, self.trackers, self.stage, self.offset = setup, recorder, trackers, stage, offset
        self.seconds = 0.0
        self.cost = StageCost()   # run_stage gives it the stage's own, so in-stage evaluation is not counted

    @property
    def curve_settings(self) -> list[int]:
        """What a stage-1 cache's curve was made with ([] without a curve)."""
        return [self.setup.config.eval_every, self.setup.config.probe] if self.setup.probes else []

    @property
    def active(self) -> bool:
        """Whether the loop needs to call it at all (the loop computes the step's values only for a callback)."""
        return self.trackers.active or bool(self.setup.probes)

    def __call__(self, step: int, values: dict[str, float]) -> None:
        global_step = self.offset + step
        self.trackers.scalars(values, global_step)
        if self.setup.probes and due(step, self.setup.config.eval_every):
            start = time.perf_counter()
            with self.cost.paused():
                points = evaluate_curve(self.recorder, self.setup, self.stage, step, global_step)
            self.trackers.scalars({f"curve/{task}": value for task, value in points.items()}, global_step)
            self.seconds += time.perf_counter() - start


def evaluate_curve(recorder: Recorder, setup: Setup, stage: int, step: int, global_step: int) -> dict[str, float]:
    """Every task on its probe, served as at the stage ends, with training left exactly as it was."""
    points = {}
    with untouched(setup.model):
        for index, (task, probe) in enumerate(zip(setup.tasks, setup.probes)):
            value = serve(setup, index, stage, probe=probe).metrics[task.spec.metric][0]
            recorder.add_curve_point(stage, step, global_step, task.spec, value, probe.size)
            points[f"{task.spec.name}/{task.spec.metric}"] = value
    return points


def run_stage(recorder: Recorder, ctx: StageContext, strategy: Strategy, settings: StageSettings, *, progress: bool,
              cache: Path | None, in_stage: InStage | None = None) -> None:
    """Train (or restore from the stage-1 cache, with its curve), then the strategy's after_stage; records the
    training time (in-stage evaluation apart) and the parameters."""
    curve, cost = 0.0, StageCost(strategy, ctx.model)
    if in_stage:
        in_stage.cost = cost
    if cache is not None and cache.exists():
        seconds, saved = 0.0, restore_stage1(cache, ctx, recorder)
    else:
        start = time.perf_counter()
        with cost.counted():
            train_stage(ctx, strategy, settings, progress=progress,
                        on_step=in_stage if in_stage and in_stage.active else None)
        cost.steps = settings.epochs * len(ctx.train_loader)
        curve = in_stage.seconds if in_stage else 0.0
        seconds, saved = time.perf_counter() - start - curve, 0.0
        if cache is not None:
            save_stage1(cache, ctx, seconds, recorder.pending_curve(), in_stage.curve_settings if in_stage else [])
    strategy.after_stage(ctx)
    cost.sample()   # what after_stage computed (a Fisher, a buffer) counts too
    recorder.resources.stages[ctx.stage] = StageResources(
        ctx.task.name, seconds, saved, curve_seconds=curve, parameters=ctx.model.parameter_counts(),
        steps=cost.steps, forwards=cost.forwards, backwards=cost.backwards, strategy_bytes=cost.peak_state_bytes)


def stage1_cache_fits(cache: Path, config: RunConfig) -> bool:
    """Whether an existing stage-1 cache holds the curve this run asks for (--eval-every, --probe): the cache key
    leaves them out, since they change no result."""
    if not cache.exists() or not config.eval_every:
        return True
    saved = torch.load(cache, map_location="cpu", weights_only=True)
    return saved.get("curve_settings") == [config.eval_every, config.probe]


CURVE_POINT = ("stage", "step", "global_step", "eval_task", "metric", "value", "probe")


def save_stage1(cache: Path, ctx: StageContext, seconds: float, curve: list[dict[str, Any]],
                curve_settings: list[int]) -> None:
    """The model right after stage-1 training, the RNG states and the loader's shuffle state (the same state a
    stage checkpoint's resume point holds), and stage 1's curve points with the settings that made them."""
    save_checkpoint(cache, {"model": ctx.model.state_dict(), "rng": rng_state(),
                            "loader_rng": ctx.train_loader.generator.get_state(), "seconds": seconds,
                            "curve": [{k: point[k] for k in CURVE_POINT} for point in curve],
                            "curve_settings": curve_settings})


def restore_stage1(cache: Path, ctx: StageContext, recorder: Recorder) -> float:
    """The state ``save_stage1`` wrote, as if this run had trained it (its curve points too); returns the training
    seconds it stands for."""
    saved = torch.load(cache, map_location="cpu", weights_only=True)
    ctx.model.load_state_dict(saved["model"])
    set_rng_state(saved["rng"])
    ctx.train_loader.generator.set_state(saved["loader_rng"])  # as if its epochs had drawn their shuffles
    recorder.add_curve_points(saved.get("curve", []))
    return float(saved["seconds"])


def checkpoint(setup: Setup, ctx: StageContext, audit: BatchNormAudit) -> dict[str, Any]:
    """A stage's checkpoint: what `clbench eval` needs, and the resume point (with ``record`` added by the recorder)."""
    return {"model": setup.model.state_dict(), "strategy": setup.strategy.state_dict(), "stage": ctx.stage,
            "task": ctx.task.name, "model_config": model_config(setup.config).to_dict(),
            "tasks": [t.to_dict() for t in setup.specs], "rng": rng_state(),
            "loader_rng": ctx.train_loader.generator.get_state(), "bn_stats": audit.stats,
            "evaluation": evaluation_states(setup),
            "synthetic": synthetic_settings(setup.config), **classes_seen(setup, ctx.stage)}


def classes_seen(setup: Setup, stage: int) -> dict[str, Any]:
    """``{"seen": {task: classes}}`` for the class-incremental tasks after ``stage`` (`clbench eval` evaluates them
    on those classes); nothing when there is none."""
    seen = {t.name: list(t.class_steps.seen(setup.seen_step(k, stage))) for k, t in enumerate(setup.specs)
            if t.incremental}
    return {"seen": seen} if seen else {}


def evaluate_all(recorder: Recorder, setup: Setup, *, stage: int, stage_task: str,
                 seen_after: int | None = None) -> dict[str, dict[str, tuple[float, int]]]:
    """Every task's metrics into the recorder, on its test set and (``--val-fraction``) its validation split;
    returns each task's metrics (metric -> (value, n)) on the test set. ``seen_after``: evaluate class-incremental
    tasks with the classes seen after that stage (default ``stage``; the joint bound: the last)."""
    metrics, validation_seconds = {}, 0.0
    seen_after = stage if seen_after is None else seen_after
    for index, task in enumerate(setup.tasks):
        result = serve(setup, index, seen_after)
        recorder.add_evaluation(stage, stage_task, task.spec, result)
        metrics[task.spec.name] = result.metrics
        if task.validation is not None:
            start = time.perf_counter()
            recorder.add_evaluation(stage, stage_task, task.spec, serve(setup, index, seen_after, split=VALIDATION),
                                    VALIDATION)
            validation_seconds += time.perf_counter() - start
    if stage in recorder.resources.stages:
        recorder.resources.stages[stage].validation_seconds = validation_seconds
    return metrics


def serve(setup: Setup, index: int, stage: int, extra: dict[str, torch.Tensor] | None = None,
          probe: Probe | None = None, split: str = TEST) -> TaskEval:
    """Task ``index`` evaluated as the strategy serves it (its ``evaluation_state``), ``extra`` loaded on top, as
    after stage ``stage`` (a class-incremental task: on the classes seen by then); on its whole test set, its
    validation split, or on ``probe``."""
    task = setup.tasks[index]
    state = {**(setup.strategy.evaluation_state(setup.model, task.spec) or {}), **(extra or {})}
    view = setup.view(index, stage, split)
    batches, coco = (probe.loader, probe.coco_gt) if probe else (view.batches, view.coco)
    bootstrap = setup.bootstrap if probe is None and extra is None else None   # intervals of the recorded values
    if bootstrap is not None and view.images is not None:
        bootstrap = bootstrap.subset(*view.images)
    return evaluate_task(setup.model, task.spec, batches, setup.device, coco, state, bootstrap, view.classes,
                         None if probe else view.groups)


def evaluation_states(setup: Setup) -> dict[str, dict[str, torch.Tensor]]:
    """What each task is served with now: the checkpoint keeps it, so `clbench eval` serves the same."""
    return {t.name: dict(setup.strategy.evaluation_state(setup.model, t) or {}) for t in setup.specs}


def attribute_bn(recorder: Recorder, audit: BatchNormAudit, setup: Setup, stage: int, stage_task: str,
                 metrics: dict[str, dict[str, tuple[float, int]]]) -> None:
    """After the last stage: each task's primary metric (a class-incremental task: each class group's) again with
    the BN statistics of the stage that trained it, its ``_own_bn`` row, where that stage is an earlier one."""
    states = evaluation_states(setup)
    for index, task in enumerate(setup.specs):
        served = {**batchnorm_state(setup.model), **states[task.name]}
        for metric, own_stage in own_stages(setup, index):
            if own_stage == stage:
                continue
            value, n = audit.own_bn_metric(setup.model, own_stage, metrics[task.name][metric], served,
                                           lambda own, i=index, m=metric: serve(setup, i, stage, own).metrics[m])
            recorder.add_metric(stage, stage_task, task, f"{metric}_own_bn", value, n)


def own_stages(setup: Setup, index: int) -> list[tuple[str, int]]:
    """(metric, the stage that trained it) of task ``index``: its primary metric and its last stage, or for a
    class-incremental task each group's metric and the stage that introduced the group."""
    task = setup.specs[index]
    if not task.incremental:
        return [(task.metric, setup.own_stage(index))]
    return [(grouped(task.metric, step), setup.step_stage(index, k)) for k, step in enumerate(task.steps)]


def evaluate_stage(recorder: Recorder, audit: BatchNormAudit, setup: Setup, stage: int) -> None:
    """After a stage: every task evaluated, BN drift audited (and attributed after the last stage); timed."""
    stage_task = setup.stage_task(stage).name
    start_time = time.perf_counter()
    metrics = evaluate_all(recorder, setup, stage=stage, stage_task=stage_task)
    audit_start = time.perf_counter()
    for reference_stage, drift in audit.record(setup.model, stage):
        recorder.add_bn_drift(stage, stage_task, reference_stage, drift)
    if stage == len(setup.experiences):
        attribute_bn(recorder, audit, setup, stage, stage_task, metrics)
    resources = recorder.resources.stages[stage]
    resources.eval_seconds, resources.bn_audit_seconds = audit_start - start_time, time.perf_counter() - audit_start
