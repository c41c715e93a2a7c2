"""What a run builds before its first stage, once: seed, device, data (verified), strategy, network, stream, test
loaders and chance levels (``Setup``), and the run folder it writes to (opened, or reopened at the last resume
point). The public half of the stage API that ``clbench.run`` and ``clbench.joint`` drive."""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader

from clbench import ClbenchError
from clbench.accel import Precision, compile_model, precision, set_determinism
from clbench.anchors import KMEANS, fit_anchors, format_anchors, given_anchors
from clbench.benchmarks import TaskData, load_tasks, task_folder
from clbench.benchmarks.coco import images_only
from clbench.benchmarks.steps import Viewed, class_view, group_support, step_training_set
from clbench.benchmarks.stream import build_stream, labelled
from clbench.bn_audit import BatchNormAudit
from clbench.bootstrap import Bootstrap
from clbench.config import RunConfig, resolve
from clbench.curve import probe_indices
from clbench.evaluate import EVAL_BATCH, chance_level
from clbench.incremental import ClassSteps, group_name
from clbench.memory import DecodedSet, footprint_bytes, plan
from clbench.model import UniHeadNet
from clbench.plugins import create
from clbench.pretrained import ResolvedNormalization, normalization
from clbench.recorder import Recorder
from clbench.results import TEST, VALIDATION, data_source, environment, to_json
from clbench.runtime import (
    MemoryCache,
    ModelConfig,
    Session,
    build_model,
    cached_in_memory,
    data_root,
    loader,
    resolve_device,
    seed_everything,
    set_rng_state,
)
from clbench.strategy import Strategy, check_protects
from clbench.tasks import TaskSpec
from clbench.tensors import to_device
from clbench.trackers import check_installed


@dataclass
class Setup:
    """Everything a run builds before its first stage."""

    config: RunConfig               # with every strategy hyperparameter resolved
    device: torch.device
    root: Path
    benchmark: str
    tasks: list[TaskData]           # spec, train and test datasets
    strategy: Strategy
    model: UniHeadNet
    stream: Any                     # the Avalanche benchmark
    test_loaders: list[DataLoader]
    chance: dict[str, float]        # each task's primary metric at chance on its test set
    precision: Precision            # --amp on this device
    accel: dict[str, Any]           # what --amp, --channels-last, --compile, --deterministic resolved to (env.json)
    in_memory: dict[str, bool]      # per task: its training set is decoded once and kept (--train-in-memory-mb)
    normalization: ResolvedNormalization   # the input's mean/std and why (env.json)
    probes: list["Probe"] = dataclasses.field(default_factory=list)   # per task, with --eval-every
    decoded: dict[str, DecodedSet] = dataclasses.field(default_factory=dict)   # filled when a stage first needs it
    validation_loaders: list[DataLoader | None] = dataclasses.field(default_factory=list)   # --val-fraction
    experiences: list["Experience"] = dataclasses.field(default_factory=list)   # stage k trains experiences[k - 1]
    views: dict[tuple[int, str, int], "View"] = dataclasses.field(default_factory=dict)   # class-incremental tasks
    evaluation_sets: dict[tuple[int, str], Any] = dataclasses.field(default_factory=dict)   # (task, split) -> items
    present: dict[tuple[int, str], list[set[int]]] = dataclasses.field(default_factory=dict)   # their labels, read once

    @property
    def bootstrap(self) -> Bootstrap | None:
        return Bootstrap(self.config.bootstrap) if self.config.bootstrap else None

    @property
    def specs(self) -> tuple[TaskSpec, ...]:
        return tuple(t.spec for t in self.tasks)

    def stage_task(self, stage: int) -> TaskSpec:
        """The task stage ``stage`` (from 1) trains."""
        return self.specs[self.experiences[stage - 1].task]

    def own_stage(self, index: int) -> int:
        """The last stage that trains task ``index``."""
        return max(stage for stage, e in enumerate(self.experiences, start=1) if e.task == index)

    def step_stage(self, index: int, step: int) -> int:
        """The stage that trains task ``index``'s class step ``step``."""
        return next(stage for stage, e in enumerate(self.experiences, start=1) if e.task == index and e.step == step)

    def seen_step(self, index: int, stage: int) -> int:
        """Which of task ``index``'s class steps it has reached after stage ``stage`` (its first before any)."""
        return max((e.step for e in self.experiences[:stage] if e.task == index), default=0)

    def decoded_set(self, index: int, stage: int | None = None) -> DecodedSet:
        """Task ``index``'s training set in memory (or, with ``stage``, that stage's experience's: a class-incremental
        step's images and labels), decoded on first use, then kept for the run; a class-incremental task keeps only
        its latest step's."""
        task = self.tasks[index]
        name, dataset = task.spec.name, task.train
        if stage is not None and task.spec.incremental:
            dataset = self.experiences[stage - 1].train
            name = f"{name}#{self.experiences[stage - 1].step}"
            for key in [k for k in self.decoded if k.startswith(f"{task.spec.name}#") and k != name]:
                del self.decoded[key]
        if name not in self.decoded:
            self.decoded[name] = DecodedSet.decode(
                dataset, task.spec.kind, self.config.image_size, augment=self.config.augment[task.spec.name],
                pin=self.device.type == "cuda")
        return self.decoded[name]

    def view(self, index: int, stage: int, split: str) -> "View":
        """How task ``index`` is evaluated after stage ``stage`` on ``split`` (test or validation): the whole set,
        or for a class-incremental task the images and labels of the classes seen by then, with its groups."""
        task = self.tasks[index]
        test = split == TEST
        batches, coco = (self.test_loaders[index], task.coco_gt) if test else \
            (self.validation_loaders[index], task.validation_coco)
        if not task.spec.incremental:
            return View(batches, coco)
        step = self.seen_step(index, stage)
        key = (index, split, step)
        if key not in self.views:
            spec, data = task.spec, (task.test if test else task.validation)
            present = self.present.setdefault((index, split), data.present_labels())  # masks read once a split
            seen = spec.class_steps.seen(step)
            view = class_view(spec, present, seen, coco)
            items = labelled(Viewed(self.evaluation_sets[index, split], view), index)
            groups = {group_name(g): (g, group_support(spec, present, view, g))
                      for g in class_groups(spec.class_steps, step)}
            images = None if view.indices is None else (view.indices, len(self.evaluation_sets[index, split]))
            self.views[key] = View(loader(items, batch_size=EVAL_BATCH, shuffle=False, seed=self.config.seed,
                                          device=self.device, workers=0), view.coco if spec.kind == "det" else None,
                                   seen, groups, images)
        return self.views[key]

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
    check_installed(config.log)
    seed_everything(config.seed)
    device = resolve_device(config.device)
    accel = {**set_determinism(config.deterministic, device), "channels_last": config.channels_last,
             "compile": config.compile}
    amp = precision(config.amp, device)
    root, benchmark = data_root(config.data_root, config.synth_train, config.synth_val, config.synth_domain,
                                config.synthetic_variant)
    session.verify(root, config.stream())
    norm = input_normalization(config)
    tasks, experiences = experiences_of(config, load_tasks(
        root, config.stream(), image_size=config.image_size, augment=config.augment, normalization=norm.normalization,
        val_fraction=config.val_fraction, val_seed=config.val_seed))
    strategy, options = create(config.strategy, config.set)
    check_protects(strategy, config.benchmark_file())
    # config.yaml records every resolved hyperparameter, the weights' mean/std as values (timm may change them) and
    # fitted anchors as values
    config = dataclasses.replace(config, set=options, normalize=norm.as_setting() if config.pretrained or
                                 config.pretrained_file else config.normalize, anchors=resolved_anchors(config, tasks))
    model = build_model(model_config(config), [t.spec for t in tasks], device, pretrained=config.pretrained,
                        pretrained_file=config.pretrained_file, channels_last=config.channels_last)
    if config.compile:
        compile_model(model)
    tests = [cached_in_memory(t.test, config.image_size) for t in tasks]
    stream = build_stream([(e.train, e.task) for e in experiences], tests)
    test_loaders = [loader(exp.dataset, batch_size=EVAL_BATCH, shuffle=False, seed=config.seed, device=device,
                           workers=0 if isinstance(test, MemoryCache) else config.workers)
                    for exp, test in zip(stream.test_stream, tests)]
    validation_loaders, evaluation_sets = validation_sets(config, tasks, tests, device)
    chance = {t.spec.name: chance_level(t.spec, test) for t, test in zip(tasks, tests)}
    probes = [probe(task, exp.dataset, config.probe, device) for task, exp in zip(tasks, stream.test_stream)] \
        if config.eval_every else []
    in_memory = plan([(t.spec.name, t.spec.kind, len(t.train)) for t in tasks], config.image_size,
                     config.train_in_memory_mb)
    return Setup(config, device, root, benchmark, tasks, strategy, model, stream, test_loaders, chance, amp,
                 {**amp.to_dict(), **accel}, in_memory, norm, probes, validation_loaders=validation_loaders,
                 experiences=experiences, evaluation_sets=evaluation_sets)


def validation_sets(config: RunConfig, tasks: list[TaskData], tests: list[Any], device: torch.device
                    ) -> tuple[list[DataLoader | None], dict[tuple[int, str], Any]]:
    """Each task's validation split (--val-fraction) as a loader, its items kept after their first read; and every
    evaluation split's items by (task, split), which class-incremental views read from."""
    sets = [None if t.validation is None else cached_in_memory(t.validation, config.image_size) for t in tasks]
    loaders = [None if v is None else loader(labelled(v, k), batch_size=EVAL_BATCH, shuffle=False, seed=config.seed,
                                             device=device, workers=0) for k, v in enumerate(sets)]
    return loaders, {**{(k, TEST): test for k, test in enumerate(tests)},
                     **{(k, VALIDATION): v for k, v in enumerate(sets) if v is not None}}


@dataclass(frozen=True)
class Experience:
    """One stage's training: task ``task`` (an index of ``Setup.tasks``) on its class step ``step``, the images and
    labels ``train`` (the task's own training set when it has one step)."""

    task: int
    step: int
    train: Any


@dataclass(frozen=True)
class View:
    """A task's evaluation as a stage sees it: batches, COCO ground truth, the classes seen (None: all) and the class
    groups reported beside the primary metric (name -> (classes, n images holding one)), and which of the split's
    images it evaluates (None: all; bootstrap draws follow the images, so intervals stay paired across stages)."""

    batches: DataLoader
    coco: dict[str, Any] | None
    classes: tuple[int, ...] | None = None
    groups: dict[str, tuple[tuple[int, ...], int]] | None = None
    images: tuple[tuple[int, ...], int] | None = None   # a subset of the split: (its positions, the split's size)


def experiences_of(config: RunConfig, tasks: list[TaskData]) -> tuple[list[TaskData], list[Experience]]:
    """The tasks with their class steps (from the benchmark file) and the run's experiences in order."""
    protocol = config.benchmark_file()
    stepped = []
    for task in tasks:
        steps = protocol.class_steps(task.spec.name, task.spec.classes)
        if steps.incremental:
            task = dataclasses.replace(task, spec=dataclasses.replace(task.spec, steps=steps.steps,
                                                                      mode=protocol.task(task.spec.name).mode))
        stepped.append(task)
    index = {t.spec.name: k for k, t in enumerate(stepped)}
    experiences, step_of = [], dict.fromkeys(index, 0)
    for entry in protocol.experiences:
        k, step = index[entry.task], step_of[entry.task]
        experiences.append(Experience(k, step, step_training_set(stepped[k].spec, stepped[k].train, step)))
        step_of[entry.task] += 1
    return stepped, experiences


def class_groups(steps: ClassSteps, step: int) -> list[tuple[int, ...]]:
    """The class groups reported after a task reached ``step``: each step's classes so far and, once two or more
    steps followed the first, all of those together (the papers' 16-20 of 15-1)."""
    groups = [steps.new(k) for k in range(step + 1)]
    return groups + ([tuple(c for g in groups[1:] for c in g)] if step >= 2 else [])


@dataclass(frozen=True)
class Probe:
    """A task's images for evaluation inside stages (``--probe``): their loader, and for detection the ground truth
    cut to them."""

    loader: DataLoader
    coco_gt: dict[str, Any] | None
    size: int


def probe(task: TaskData, test: Any, size: int, device: torch.device) -> Probe:
    indices = probe_indices(len(test), size)
    subset = test.subset(indices) if len(indices) < len(test) else test
    coco = task.coco_gt
    if coco is not None and len(indices) < len(test):
        coco = images_only(coco, {task.test.images[i]["id"] for i in indices})
    return Probe(loader(subset, batch_size=EVAL_BATCH, shuffle=False, seed=0, workers=0, device=device), coco,
                 len(indices))


def model_config(config: RunConfig) -> ModelConfig:
    return ModelConfig(backbone=config.backbone, head_channels=config.head_channels, head_stride=config.head_stride,
                       image_size=config.image_size, order=config.order,
                       normalization=input_normalization(config).normalization, anchors=given_anchors(config.anchors))


def resolved_anchors(config: RunConfig, tasks: list[TaskData]) -> str:
    """``config.anchors``, with ``kmeans`` fitted to every detection task's training boxes (the default anchors
    when the run has no detection task)."""
    if config.anchors != KMEANS:
        return config.anchors
    sizes = [t.train.box_sizes() for t in tasks if t.spec.kind == "det"]
    return format_anchors(fit_anchors(torch.cat(sizes))) if sizes else "default"


def input_normalization(config: RunConfig) -> ResolvedNormalization:
    return normalization(config.normalize, backbone=config.backbone, pretrained=config.pretrained,
                         pretrained_file=config.pretrained_file)


def synthetic_settings(config: RunConfig) -> dict[str, Any]:
    """What `clbench eval` needs to find the run's synthetic benchmark without --data-root."""
    return {**{key: getattr(config, key) for key in ("synth_train", "synth_val", "synth_domain")},
            "synth_variant": config.synthetic_variant}


def open_run(setup: Setup, session: Session) -> Recorder:
    """Claim the run folder and write config.yaml, env.json, tasks.json and chance.json into it."""
    config, root = setup.config, setup.root
    run_id = config.run_id or f"{setup.strategy.name}-seed{config.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    hashes = {t.name: (task_folder(root, t), session.tree_hash(task_folder(root, t))) for t in setup.specs}
    env = {**environment(setup.device, hashes), "counts": setup.model.parameter_counts(),
           "seeding": {"python": config.seed, "numpy": config.seed, "torch": config.seed,
                       "loader_generator": "seed + 1000 * stage", "strategy": "StageContext.generator(seed, stage)"},
           "acceleration": setup.accel, "normalization": setup.normalization.to_dict(),
           **data_source(root),
           "training_data": {name: "memory" if kept else "per-image" for name, kept in setup.in_memory.items()},
           "validation": validation_record(setup),
           "bootstrap": setup.bootstrap.to_dict() if setup.bootstrap else None}
    files = {"config.yaml": yaml.safe_dump(config.to_dict(), sort_keys=False), "env.json": to_json(env),
             "tasks.json": to_json([t.to_dict() for t in setup.specs]), "chance.json": to_json(setup.chance)}
    return Recorder.create(Path(config.out), run_id, row_base(setup), files)


def validation_record(setup: Setup) -> dict[str, Any]:
    """env.json's account of the validation split: how it was drawn and each task's images on either side."""
    config = setup.config
    return {"fraction": config.val_fraction, "seed": config.val_seed,
            "stratified": "classification tasks, by class", "images": {
                t.spec.name: {"train": len(t.train), "validation": 0 if t.validation is None else len(t.validation),
                              "test": len(t.test)} for t in setup.tasks}}


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
    done, ckpt = last_resume_point(run_dir, len(setup.experiences))
    recorder = Recorder.reopen(run_dir, row_base(setup), ckpt["record"] if ckpt else None, done)
    if ckpt is not None:
        setup.model.load_state_dict(ckpt["model"])
        setup.strategy.load_state_dict(to_device(ckpt["strategy"], setup.device))
        audit.stats = {int(k): to_device(v, setup.device) for k, v in ckpt["bn_stats"].items()}
        set_rng_state(ckpt["rng"])
    return recorder, done
