"""`clbench run`: one strategy through every stage, every task evaluated after each (see ``Strategy``'s
docstring for the loop). The environment pieces live in ``clbench.runtime``, the files in ``clbench.recorder``."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generator

import torch
import yaml
from torch.utils.data import DataLoader

from clbench import ClbenchError
from clbench.accel import Precision, compile_model, precision, set_determinism
from clbench.bn_audit import BatchNormAudit
from clbench.config import RunConfig, resolve
from clbench.evaluate import EVAL_BATCH, TaskEval, chance_level, evaluate_task
from clbench.freezing import batchnorm_state
from clbench.loop import OnStep, StageSettings, task_loss, train_stage
from clbench.memory import DecodedSet, MemoryLoader, footprint_bytes, plan
from clbench.model import UniHeadNet
from clbench.plugins import create
from clbench.pretrained import ResolvedNormalization, normalization
from clbench.recorder import Recorder, StageResources
from clbench.resources import Timer, budget_checks, device_name, latency_ms, peak_memory_mb
from clbench.results import data_source, environment, save_checkpoint, to_json
from clbench.runtime import (
    MemoryCache,
    ModelConfig,
    Session,
    build_model,
    cached_in_memory,
    data_root,
    loader,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
)
from clbench.strategy import StageContext, Strategy
from clbench.tasks import TaskSpec
from clbench.tensors import to_device
from clbench.trackers import TrackedRun, Trackers, check_installed


def run(config: RunConfig, *, stage1_cache: Path | None = None, on_stage: Callable[[int, str], None] | None = None,
        session: Session | None = None, resume: bool = False, group: tuple[str, Path] | None = None) -> Path:
    """Train and evaluate every stage; returns the run folder. Finished stages stay on disk if a later one fails.

    ``stage1_cache``: a file holding the model right after stage-1 training for exactly this configuration
    (but the strategy); used if present and the strategy declares ``shares_first_stage``, written if absent.
    ``on_stage(stage, task)`` is called before each stage (progress displays). ``session``: shared caches
    (a comparison passes one to all its cells). ``resume``: ``out/run_id`` holds an interrupted run of this
    configuration; continue it after its last readable stage checkpoint (every later stage is redone).
    ``group``: (name, folder) the trackers file this run under (a comparison: its name and folder; default
    ("clbench", out)).
    """
    stages = run_stages(config, stage1_cache=stage1_cache, on_stage=on_stage, session=session, resume=resume,
                        group=group)
    while True:
        try:
            next(stages)
        except StopIteration as finished:
            return finished.value


def run_stages(config: RunConfig, *, stage1_cache: Path | None = None,
               on_stage: Callable[[int, str], None] | None = None, session: Session | None = None,
               resume: bool = False, group: tuple[str, Path] | None = None,
               last_stage: int | None = None) -> Generator[int, None, Path]:
    """``run`` as a generator: yields each stage's number once its checkpoint and rows are on disk (0: the
    stage-0 evaluation of a new run), then ``DONE`` once resources.json is written; returns the run folder.
    ``last_stage``: stop after that stage (no resources.json: the run stays resumable)."""
    session = session or Session()
    setup = prepare(config, session)
    recorder, audit, done = start(setup, session, resume)
    if done == 0:
        yield 0
    trackers = open_trackers(setup, recorder, done, group or ("clbench", Path(config.out)))
    try:
        for stage, experience in enumerate(setup.stream.train_stream, start=1):
            if last_stage is not None and stage > last_stage:
                trackers.close()
                return recorder.run_dir
            if stage > done:
                if on_stage:
                    on_stage(stage, setup.specs[stage - 1].name)
                run_and_commit(setup, recorder, audit, trackers, stage, experience, stage1_cache)
                yield stage
        write_resources(recorder, setup, session)
        log_resources(trackers, recorder.resources)
    except BaseException as exc:
        trackers.close("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    trackers.close()
    yield DONE
    return recorder.run_dir


DONE = -1  # what run_stages yields once the run is complete


def run_and_commit(setup: "Setup", recorder: Recorder, audit: BatchNormAudit, trackers: Trackers, stage: int,
                   experience: Any, stage1_cache: Path | None) -> None:
    """One stage: train (or restore), after_stage, evaluate and audit, checkpoint and rows, trackers."""
    ctx = stage_context(setup, stage, experience)
    use_cache = stage == 1 and setup.strategy.shares_first_stage
    offset = sum(stage_steps(setup)[: stage - 1])
    on_step = (lambda step, values: trackers.scalars(values, offset + step)) if trackers.active else None
    run_stage(recorder, ctx, setup.strategy, setup.config, setup.precision, stage1_cache if use_cache else None,
              on_step)
    evaluate_stage(recorder, audit, setup, stage)
    recorder.commit(stage, checkpoint(setup, ctx, audit))
    trackers.stage(stage, recorder.rows, setup.specs)


def stage_steps(setup: "Setup") -> list[int]:
    """Optimizer steps of each stage (the trackers' step axis runs over the whole run)."""
    config = setup.config
    return [config.epochs[t.name] * math.ceil(len(exp.dataset) / config.batch_size[t.name])
            for t, exp in zip(setup.specs, setup.stream.train_stream)]


def open_trackers(setup: "Setup", recorder: Recorder, done: int, group: tuple[str, Path]) -> Trackers:
    """The trackers of ``--log`` (continued where trackers.json names them); stage 0 logged if it was just run."""
    env = json.loads((recorder.run_dir / "env.json").read_text())
    tracked = TrackedRun(recorder.run_dir, group[0], recorder.run_dir.name, group[1], setup.config.to_dict(), env)
    first_step = sum(stage_steps(setup)[:done]) + 1 if done else 0
    trackers = Trackers.open(setup.config.log, tracked, first_step, setup.config.mlflow_uri)
    if done == 0:
        trackers.stage(0, recorder.rows, setup.specs)
    return trackers


def log_resources(trackers: Trackers, resources: Any) -> None:
    """Each stage's times (step = stage), then peak memory and latency (step = the last stage)."""
    for stage, cost in resources.stages.items():
        trackers.scalars({"resources/train_seconds": cost.train_seconds, "resources/eval_seconds": cost.eval_seconds,
                          "resources/bn_audit_seconds": cost.bn_audit_seconds}, stage)
    last = max(resources.stages, default=0)
    latency = {f"resources/latency_ms_{task}_{size}": ms for task, sizes in resources.latency_ms.items()
               for size, ms in sizes.items() if ms is not None}
    trackers.scalars({**{f"resources/{k}": v for k, v in resources.memory.items()}, **latency}, last)


@dataclass
class Setup:
    """Everything a run builds before its first stage."""

    config: RunConfig               # with every strategy hyperparameter resolved
    device: torch.device
    root: Path
    benchmark: str
    tasks: list[Any]                # TaskData: spec, train and test datasets
    strategy: Strategy
    model: UniHeadNet
    stream: Any                     # the Avalanche benchmark
    test_loaders: list[DataLoader]
    chance: dict[str, float]        # each task's primary metric at chance on its test set
    precision: Precision            # --amp on this device
    accel: dict[str, Any]           # what --amp, --channels-last, --compile, --deterministic resolved to (env.json)
    in_memory: dict[str, bool]      # per task: its training set is decoded once and kept (--train-in-memory-mb)
    normalization: ResolvedNormalization   # the input's mean/std and why (env.json)
    decoded: dict[str, DecodedSet] = dataclasses.field(default_factory=dict)   # filled when a stage first needs it

    @property
    def specs(self) -> tuple[TaskSpec, ...]:
        return tuple(t.spec for t in self.tasks)

    def decoded_set(self, index: int) -> DecodedSet:
        """Task ``index``'s training set in memory, decoded on first use (then kept for the run)."""
        task = self.tasks[index]
        if task.spec.name not in self.decoded:
            self.decoded[task.spec.name] = DecodedSet.decode(
                task.train, task.spec.kind, self.config.image_size, augment=self.config.augment[task.spec.name],
                pin=self.device.type == "cuda")
        return self.decoded[task.spec.name]

    def training_data(self) -> dict[str, dict[str, Any]]:
        """Per task: which path its training batches take, the bytes it holds in memory, the seconds decoding took."""
        out = {}
        for task in self.tasks:
            name, decoded = task.spec.name, self.decoded.get(task.spec.name)
            out[name] = {"path": "memory" if self.in_memory[name] else "per-image",
                         "memory_mb": round(footprint_bytes(len(task.train), task.spec.kind, self.config.image_size)
                                            / 2**20, 2) if self.in_memory[name] else 0.0,
                         "decode_seconds": None if decoded is None else round(decoded.seconds, 3)}
        return out


def prepare(config: RunConfig, session: Session) -> Setup:
    """Seed, device, data (verified), strategy, network, stream and test loaders."""
    from clbench.benchmarks import load_tasks
    from clbench.benchmarks.stream import build_stream
    check_installed(config.log)
    seed_everything(config.seed)
    device = resolve_device(config.device)
    accel = {**set_determinism(config.deterministic, device), "channels_last": config.channels_last,
             "compile": config.compile}
    amp = precision(config.amp, device)
    root, benchmark = data_root(config.data_root, config.synth_train, config.synth_val, config.synth_domain)
    session.verify(root, config.stream())
    norm = input_normalization(config)
    tasks = load_tasks(root, config.stream(), image_size=config.image_size, augment=config.augment,
                       normalization=norm.normalization)
    strategy, options = create(config.strategy, config.set)
    # config.yaml records every resolved hyperparameter, and the weights' mean/std as values (timm may change them)
    config = dataclasses.replace(config, set=options, normalize=norm.as_setting() if config.pretrained or
                                 config.pretrained_file else config.normalize)
    model = build_model(model_config(config), [t.spec for t in tasks], device, pretrained=config.pretrained,
                        pretrained_file=config.pretrained_file, channels_last=config.channels_last)
    if config.compile:
        compile_model(model)
    tests = [cached_in_memory(t.test, config.image_size) for t in tasks]
    stream = build_stream([t.train for t in tasks], tests)
    test_loaders = [loader(exp.dataset, batch_size=EVAL_BATCH, shuffle=False, seed=config.seed, device=device,
                           workers=0 if isinstance(test, MemoryCache) else config.workers)
                    for exp, test in zip(stream.test_stream, tests)]
    chance = {t.spec.name: chance_level(t.spec, test) for t, test in zip(tasks, tests)}
    in_memory = plan([(t.spec.name, t.spec.kind, len(t.train)) for t in tasks], config.image_size,
                     config.train_in_memory_mb)
    return Setup(config, device, root, benchmark, tasks, strategy, model, stream, test_loaders, chance, amp,
                 {**amp.to_dict(), **accel}, in_memory, norm)


def start(setup: Setup, session: Session, resume: bool) -> tuple[Recorder, BatchNormAudit, int]:
    """A new run folder with stage 0 evaluated, or an interrupted one restored; returns the last finished stage."""
    audit, done = BatchNormAudit(), 0
    if resume:
        recorder, done = reopen_run(setup, audit)
    else:
        recorder = open_run(setup, session)
    if done == 0:
        evaluate_all(recorder, setup, stage=0, stage_task="none")
        recorder.commit(0, None)
    return recorder, audit, done


def checkpoint(setup: Setup, ctx: StageContext, audit: BatchNormAudit) -> dict[str, Any]:
    """A stage's checkpoint: what `clbench eval` needs, and the resume point (with ``record`` added by the recorder)."""
    return {"model": setup.model.state_dict(), "strategy": setup.strategy.state_dict(), "stage": ctx.stage,
            "task": ctx.task.name, "model_config": model_config(setup.config).to_dict(),
            "tasks": [t.to_dict() for t in setup.specs], "rng": rng_state(),
            "loader_rng": ctx.train_loader.generator.get_state(), "bn_stats": audit.stats,
            "evaluation": evaluation_states(setup),
            "synthetic": synthetic_settings(setup.config)}


def synthetic_settings(config: RunConfig) -> dict[str, Any]:
    """What `clbench eval` needs to find the run's synthetic benchmark without --data-root."""
    return {key: getattr(config, key) for key in ("synth_train", "synth_val", "synth_domain")}


def model_config(config: RunConfig) -> ModelConfig:
    return ModelConfig(backbone=config.backbone, head_channels=config.head_channels, head_stride=config.head_stride,
                       image_size=config.image_size, order=config.order,
                       normalization=input_normalization(config).normalization)


def input_normalization(config: RunConfig) -> ResolvedNormalization:
    return normalization(config.normalize, backbone=config.backbone, pretrained=config.pretrained,
                         pretrained_file=config.pretrained_file)


def open_run(setup: Setup, session: Session) -> Recorder:
    """Claim the run folder and write config.yaml, env.json, tasks.json and chance.json into it."""
    from clbench.benchmarks import task_folder
    config, root = setup.config, setup.root
    run_id = config.run_id or f"{setup.strategy.name}-seed{config.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    hashes = {t.name: (task_folder(root, t), session.tree_hash(task_folder(root, t))) for t in setup.specs}
    env = {**environment(setup.device, hashes), "counts": setup.model.parameter_counts(),
           "seeding": {"python": config.seed, "numpy": config.seed, "torch": config.seed,
                       "loader_generator": "seed + 1000 * stage", "strategy": "StageContext.generator(seed, stage)"},
           "acceleration": setup.accel, "normalization": setup.normalization.to_dict(),
           **data_source(root),
           "training_data": {name: "memory" if kept else "per-image" for name, kept in setup.in_memory.items()}}
    files = {"config.yaml": yaml.safe_dump(config.to_dict(), sort_keys=False), "env.json": to_json(env),
             "tasks.json": to_json([t.to_dict() for t in setup.specs]), "chance.json": to_json(setup.chance)}
    return Recorder.create(Path(config.out), run_id, row_base(setup), files)


def row_base(setup: Setup) -> dict[str, Any]:
    return {"benchmark": setup.benchmark, "strategy": setup.config.label or setup.strategy.name,
            "seed": setup.config.seed}


RESUME_KEYS = {"model", "strategy", "rng", "bn_stats", "record"}


def last_resume_point(run_dir: Path, stages: int) -> tuple[int, dict[str, Any] | None]:
    """(k, checkpoint) of the last stage whose checkpoint loads and holds a resume point; (0, None) if none. A
    checkpoint that exists but does not load is said (one line on stderr) and its stage is redone."""
    for stage in range(stages, 0, -1):
        path = run_dir / "checkpoints" / f"stage{stage}.pt"
        if not path.exists():
            continue
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file: the unpickler raises whatever it hit first
            print(f"clbench: {path}: unreadable ({type(exc).__name__}); stage {stage} is redone", file=sys.stderr)
            continue
        if isinstance(ckpt, dict) and RESUME_KEYS <= set(ckpt):
            return stage, ckpt
        print(f"clbench: {path}: not a resume point; stage {stage} is redone", file=sys.stderr)
    return 0, None


def reopen_run(setup: Setup, audit: BatchNormAudit) -> tuple[Recorder, int]:
    """Back to the end of the interrupted run's last finished stage: model, strategy, RNGs, BN statistics and
    every row as they were then. Returns the recorder and that stage (0: start again from stage 0)."""
    config = setup.config
    run_dir = Path(config.out) / str(config.run_id)
    saved = run_dir / "config.yaml"
    if not saved.exists() or resolve(saved, {}).without("output_only") != config.without("output_only"):
        raise ClbenchError(f"{run_dir}: not an interrupted run of this configuration (its config.yaml differs or is "
                           "missing); nothing was changed")
    done, ckpt = last_resume_point(run_dir, len(config.order))
    recorder = Recorder.reopen(run_dir, row_base(setup), ckpt["record"] if ckpt else None, done)
    if ckpt is not None:
        setup.model.load_state_dict(ckpt["model"])
        setup.strategy.load_state_dict(to_device(ckpt["strategy"], setup.device))
        audit.stats = {int(k): to_device(v, setup.device) for k, v in ckpt["bn_stats"].items()}
        set_rng_state(ckpt["rng"])
    return recorder, done


def stage_context(setup: Setup, stage: int, experience: Any) -> StageContext:
    config, model, specs, device = setup.config, setup.model, setup.specs, setup.device
    task = specs[stage - 1]
    batch_size, seed = config.batch_size[task.name], config.seed + 1000 * stage
    if setup.in_memory[task.name]:
        train_loader: Any = MemoryLoader(lambda: setup.decoded_set(stage - 1), experience.dataset,
                                         batch_size=batch_size, seed=seed, device=device,
                                         task_label=experience.task_label)
    else:
        train_loader = loader(experience.dataset, batch_size=batch_size, shuffle=True, seed=seed,
                              workers=config.workers, device=device)
    size = (config.image_size,) * 2
    return StageContext(model=model, stage=stage, task=task, tasks=specs, seed=config.seed, device=device,
                        train_loader=train_loader, task_loss=lambda t, out, y: task_loss(model, t, out, y, size))


def run_stage(recorder: Recorder, ctx: StageContext, strategy: Strategy, config: RunConfig, amp: Precision,
              cache: Path | None, on_step: OnStep | None = None) -> None:
    """Train (or restore from the stage-1 cache), then the strategy's after_stage; records time and params."""
    settings = StageSettings(epochs=config.epochs[ctx.task.name], lr=config.lr[ctx.task.name],
                             weight_decay=config.weight_decay, grad_clip=config.grad_clip, precision=amp)
    if cache is not None and cache.exists():
        seconds, saved = 0.0, restore_stage1(cache, ctx)
    else:
        start = time.perf_counter()
        train_stage(ctx, strategy, settings, progress=config.progress, on_step=on_step)
        seconds, saved = time.perf_counter() - start, 0.0
        if cache is not None:
            save_stage1(cache, ctx, seconds)
    strategy.after_stage(ctx)
    recorder.resources.stages[ctx.stage] = StageResources(ctx.task.name, seconds, saved,
                                                          parameters=ctx.model.parameter_counts())


def save_stage1(cache: Path, ctx: StageContext, seconds: float) -> None:
    """The model right after stage-1 training, the RNG states and the loader's shuffle state (the same state a
    stage checkpoint's resume point holds)."""
    save_checkpoint(cache, {"model": ctx.model.state_dict(), "rng": rng_state(),
                            "loader_rng": ctx.train_loader.generator.get_state(), "seconds": seconds})


def restore_stage1(cache: Path, ctx: StageContext) -> float:
    """The state ``save_stage1`` wrote, as if this run had trained it; returns the training seconds it stands for."""
    saved = torch.load(cache, map_location="cpu", weights_only=True)
    ctx.model.load_state_dict(saved["model"])
    set_rng_state(saved["rng"])
    ctx.train_loader.generator.set_state(saved["loader_rng"])  # as if its epochs had drawn their shuffles
    return float(saved["seconds"])


def evaluate_all(recorder: Recorder, setup: Setup, *, stage: int, stage_task: str) -> dict[str, tuple[float, int]]:
    """Every task's metrics into the recorder; returns each task's primary (value, n)."""
    primary = {}
    for index, task in enumerate(setup.tasks):
        result = serve(setup, index)
        recorder.add_evaluation(stage, stage_task, task.spec, result)
        primary[task.spec.name] = result.metrics[task.spec.metric]
    return primary


def serve(setup: Setup, index: int, extra: dict[str, torch.Tensor] | None = None) -> TaskEval:
    """Task ``index`` evaluated as the strategy serves it (its ``evaluation_state``), ``extra`` loaded on top."""
    task = setup.tasks[index]
    state = {**(setup.strategy.evaluation_state(setup.model, task.spec) or {}), **(extra or {})}
    return evaluate_task(setup.model, task.spec, setup.test_loaders[index], setup.device, task.coco_gt, state)


def evaluation_states(setup: Setup) -> dict[str, dict[str, torch.Tensor]]:
    """What each task is served with now: the checkpoint keeps it, so `clbench eval` serves the same."""
    return {t.name: dict(setup.strategy.evaluation_state(setup.model, t) or {}) for t in setup.specs}


def evaluate_stage(recorder: Recorder, audit: BatchNormAudit, setup: Setup, stage: int) -> None:
    """After a stage: every task evaluated, BN drift audited (and attributed after the last stage); timed."""
    stage_task = setup.specs[stage - 1].name
    start_time = time.perf_counter()
    primary = evaluate_all(recorder, setup, stage=stage, stage_task=stage_task)
    audit_start = time.perf_counter()
    for reference_stage, drift in audit.record(setup.model, stage):
        recorder.add_bn_drift(stage, stage_task, reference_stage, drift)
    if stage == len(setup.tasks):
        states = evaluation_states(setup)
        for own_stage, task in enumerate(setup.specs[: stage - 1], start=1):
            served = {**batchnorm_state(setup.model), **states[task.name]}
            value, n = audit.own_bn_metric(setup.model, own_stage, primary[task.name], served,
                                           lambda own, i=own_stage - 1: serve(setup, i, own).metrics[task.metric])
            recorder.add_metric(stage, stage_task, task, f"{task.metric}_own_bn", value, n)
    resources = recorder.resources.stages[stage]
    resources.eval_seconds, resources.bn_audit_seconds = audit_start - start_time, time.perf_counter() - audit_start


def write_resources(recorder: Recorder, setup: Setup, session: Session) -> None:
    """resources.json: the stages' times plus latency in float32 and under --amp (once per session, architecture
    and device), memory, budgets, and which path each task's training data took."""
    model, specs, device, sizes = setup.model, setup.specs, setup.device, setup.config.latency_sizes
    amp = setup.precision
    key = (tuple((n, p.shape) for n, p in model.named_parameters()), tuple(t.name for t in specs), str(device), sizes,
           amp.name)
    if key not in session.latency:
        session.latency[key] = {
            precision_name: {t.name: {size: latency_ms(model, t, size, device, autocast=autocast) for size in sizes}
                             for t in specs}
            for precision_name, autocast in (("fp32", None), (amp.name, amp.autocast())) if precision_name != "off"}
    resources = recorder.resources
    resources.device, resources.memory = device_name(device), peak_memory_mb(device)
    resources.latency_ms = session.latency[key]["fp32"]
    resources.latency_amp_ms = session.latency[key].get(amp.name, {})
    resources.latency_detail = {"timer": Timer(device).name, "batch": 1, "amp": amp.to_dict()["autocast_dtype"],
                                "includes": "forward + the task's post-processing (decode + NMS, label map, class)"}
    resources.training_data = setup.training_data()
    resources.budgets = budget_checks(model.parameter_counts()["total"],
                                      {t: v.get(512) for t, v in resources.latency_ms.items()}, resources.device)
    recorder.write_resources()
