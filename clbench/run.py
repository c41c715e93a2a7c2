"""`clbench run`: build data, stream, model and strategy; train every stage; evaluate every task after each."""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader

from clbench import ClbenchError
from clbench.config import RunConfig
from clbench.bn_audit import batchnorm_stats_from, bn_drift
from clbench.evaluate import EVAL_BATCH, evaluate_task
from clbench.freezing import batchnorm_state
from clbench.loop import StageSettings, task_loss, train_stage
from clbench.model import UniHeadNet
from clbench.report import run_table, to_markdown
from clbench.resources import budget_checks, device_name, latency_ms, peak_memory_mb
from clbench.results import (BN_COLUMNS, PER_CLASS_COLUMNS, atomic_write, environment, save_checkpoint, to_json,
                             write_metrics, write_table)
from clbench.plugins import create
from clbench.strategy import StageContext
from clbench.tasks import TaskSpec


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32  # torch derives each worker's seed from the loader's generator
    random.seed(seed)
    np.random.seed(seed)


def loader(dataset: Any, *, batch_size: int, shuffle: bool, seed: int, workers: int, device: torch.device) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=dataset.collate_fn,
                      num_workers=workers, worker_init_fn=_seed_worker, pin_memory=device.type == "cuda",
                      generator=torch.Generator().manual_seed(seed), persistent_workers=False)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ClbenchError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)


def data_root(config: RunConfig) -> tuple[Path, str]:
    """The data root and the benchmark's name: the user's folder, or the synthetic twin from the cache."""
    if config.data_root:
        root = Path(config.data_root)
        if not root.is_dir():
            raise ClbenchError(f"--data-root {root}: folder not found")
        return root, "synthetic" if (root / "synth.json").exists() else root.name
    from clbench.benchmarks import synthetic
    return synthetic.cached(synthetic.SynthSpec(seed=0, n_train=config.synth_train, n_val=config.synth_val)), "synthetic"


class MemoryCache(torch.utils.data.Dataset):
    """A test set's items kept after their first decode: every task is evaluated after every stage and
    the evaluation transform is deterministic, so decoding and resizing once per run is enough."""

    def __init__(self, dataset: Any) -> None:
        self.dataset, self.items = dataset, {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        if index not in self.items:
            self.items[index] = self.dataset[index]
        return self.items[index]


def cached_in_memory(dataset: Any, image_size: int, budget_bytes: int = 512 * 2**20) -> Any:
    """The dataset behind a MemoryCache when its resized images fit ``budget_bytes`` (float32)."""
    return MemoryCache(dataset) if len(dataset) * 3 * image_size**2 * 4 <= budget_bytes else dataset


_VERIFIED: set[Path] = set()


def verify_once(root: Path) -> None:
    """The full data check of `clbench data verify`, once per data root and process: a bad dataset fails
    in seconds, before any training."""
    from clbench.benchmarks.verify import verify
    if root.resolve() not in _VERIFIED:
        verify(root)
        _VERIFIED.add(root.resolve())


def new_run_dir(config: RunConfig) -> Path:
    run_id = config.run_id or f"{config.strategy}-seed{config.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(config.out) / run_id
    if run_dir.exists():
        raise ClbenchError(f"{run_dir}: already exists; give another --run-id or --out (nothing was overwritten)")
    return run_dir


@dataclass
class Run:
    """A run's state while it trains: the rows of every results table written so far."""

    config: RunConfig
    run_dir: Path
    benchmark: str
    rows: list[dict[str, Any]] = field(default_factory=list)        # metrics.csv
    per_class: list[dict[str, Any]] = field(default_factory=list)   # per_class.csv
    bn_rows: list[dict[str, Any]] = field(default_factory=list)     # bn_drift.csv
    bn_stats: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # stage → BN statistics after it
    resources: dict[str, Any] = field(default_factory=lambda: {"stages": {}})

    def base(self, stage: int, stage_task: str) -> dict[str, Any]:
        return {"run_id": self.run_dir.name, "benchmark": self.benchmark, "strategy": self.config.strategy,
                "seed": self.config.seed, "stage": stage, "stage_task": stage_task}


def build_model(config: RunConfig, specs: list[TaskSpec], device: torch.device) -> UniHeadNet:
    model = UniHeadNet(tasks=specs, backbone=config.backbone, pretrained=config.pretrained,
                       pretrained_file=config.pretrained_file, head_channels=config.head_channels,
                       head_stride=config.head_stride).to(device)
    return model.to_channels_last()


def run(config: RunConfig, *, stage1_cache: Path | None = None,
        on_stage: Callable[[int, str], None] | None = None) -> Path:
    """Train and evaluate every stage; returns the run folder. Finished stages stay on disk if a later one fails.

    ``stage1_cache``: a file holding the model right after stage-1 training for exactly this configuration
    (but the strategy); used if present and the strategy does not change stage 1, written if absent.
    ``on_stage(stage, task)`` is called before each stage (progress displays).
    """
    seed_everything(config.seed)
    device = resolve_device(config.device)
    root, benchmark = data_root(config)
    from clbench.benchmarks import load_tasks
    from clbench.benchmarks.stream import build_stream
    verify_once(root)
    tasks = load_tasks(root, config.order, image_size=config.image_size, augment=config.augment)
    specs = tuple(t.spec for t in tasks)
    strategy, options = create(config.strategy, config.set)
    config = dataclasses.replace(config, set=options)  # config.yaml records every resolved hyperparameter
    model = build_model(config, list(specs), device)
    stream = build_stream([t.train for t in tasks], [cached_in_memory(t.test, config.image_size) for t in tasks])
    state = open_run(config, benchmark, root, device, model)
    test_loaders = [loader(exp.dataset, batch_size=EVAL_BATCH, shuffle=False, seed=config.seed, workers=config.workers,
                           device=device) for exp in stream.test_stream]
    evaluate_all(state, model, tasks, test_loaders, device, stage=0, stage_task="none")
    for stage, experience in enumerate(stream.train_stream, start=1):
        if on_stage:
            on_stage(stage, specs[stage - 1].name)
        ctx = StageContext(model=model, stage=stage, task=specs[stage - 1], tasks=specs, device=device,
                           train_loader=loader(experience.dataset, batch_size=config.batch_size[specs[stage - 1].name],
                                               shuffle=True, seed=config.seed + 1000 * stage, workers=config.workers,
                                               device=device),
                           task_loss=lambda task, out, y, m=model: task_loss(m, task, out, y, (config.image_size,) * 2))
        run_stage(state, ctx, strategy, stage1_cache if stage == 1 and not strategy.changes_first_stage else None)
        evaluate_all(state, model, tasks, test_loaders, device, stage=stage, stage_task=ctx.task.name)
        save_checkpoint(state.run_dir / "checkpoints" / f"stage{stage}.pt", {
            "model": model.state_dict(), "strategy": strategy.state_dict(), "stage": stage, "task": ctx.task.name,
            "model_config": model_config(config), "tasks": [dataclasses.asdict(t) for t in specs]})
    write_resources(state, model, specs, device)
    return state.run_dir


def open_run(config: RunConfig, benchmark: str, root: Path, device: torch.device, model: UniHeadNet) -> Run:
    """Create the run folder (never over an existing one) with config.yaml and env.json."""
    from clbench.benchmarks import TASK_DIRS
    state = Run(config, new_run_dir(config), benchmark)
    state.run_dir.mkdir(parents=True)
    atomic_write(state.run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    atomic_write(state.run_dir / "env.json", to_json({
        **environment(device, {t: root / TASK_DIRS[t] for t in config.order}), "counts": model.parameter_counts(),
        "seeding": {"python": config.seed, "numpy": config.seed, "torch": config.seed,
                    "loader_generator": "seed + 1000 * stage"}}))
    return state


def run_stage(state: Run, ctx: StageContext, strategy: Any, cache: Path | None) -> None:
    """Train (or restore from the stage-1 cache), then the strategy's after_stage; records time and params."""
    seconds, saved = train_or_restore(ctx, strategy, state.config, cache)
    strategy.after_stage(ctx)
    state.resources["stages"][ctx.stage] = {"task": ctx.task.name, "train_seconds": seconds,
                                            "seconds_saved_by_cache": saved,
                                            "parameters": ctx.model.parameter_counts()}


def model_config(config: RunConfig) -> dict[str, Any]:
    """What `clbench eval` needs to rebuild the network of a checkpoint."""
    return {"backbone": config.backbone, "head_channels": config.head_channels, "head_stride": config.head_stride,
            "image_size": config.image_size, "order": list(config.order)}


def train_or_restore(ctx: StageContext, strategy: Any, config: RunConfig, cache: Path | None) -> tuple[float, float]:
    """Train the stage's epochs (not its after_stage hook); from/to ``cache`` when given.
    Returns (training seconds spent, training seconds the cache saved)."""
    settings = StageSettings(epochs=config.epochs[ctx.task.name], lr=config.lr[ctx.task.name],
                             weight_decay=config.weight_decay, grad_clip=config.grad_clip, amp=config.amp)
    if cache is not None and cache.exists():
        saved = torch.load(cache, map_location=ctx.device, weights_only=True)
        ctx.model.load_state_dict(saved["model"])
        torch.set_rng_state(saved["rng"])
        ctx.train_loader.generator.set_state(saved["loader_rng"])  # as if its epochs had drawn their shuffles
        return 0.0, float(saved["seconds"])
    start = time.perf_counter()
    train_stage(ctx, strategy, settings, progress=config.progress)
    seconds = time.perf_counter() - start
    if cache is not None:
        save_checkpoint(cache, {"model": ctx.model.state_dict(), "rng": torch.get_rng_state(),
                                "loader_rng": ctx.train_loader.generator.get_state(), "seconds": seconds})
    return seconds, 0.0


def evaluate_all(state: Run, model: torch.nn.Module, tasks: list[Any], test_loaders: list[DataLoader],
                 device: torch.device, *, stage: int, stage_task: str) -> None:
    """Evaluate every task, audit BN drift, rewrite the results tables atomically; times both (resources.json)."""
    start = time.perf_counter()
    primary = {}  # task → (value, n) of its primary metric after this stage
    for task, test_loader in zip(tasks, test_loaders):
        coco_gt = task.test.coco if task.spec.kind == "det" else None
        result = evaluate_task(model, task.spec, test_loader, device, coco_gt)
        primary[task.spec.name] = result.metrics[task.spec.metric]
        for metric, (value, n) in result.metrics.items():
            state.rows.append({**state.base(stage, stage_task), "eval_task": task.spec.name, "metric": metric,
                               "value": value, "direction": task.spec.direction, "n": n})
        for metric, values in result.per_class.items():
            state.per_class += [{**state.base(stage, stage_task), "eval_task": task.spec.name, "class": name,
                                 "metric": metric, "value": value} for name, value in values.items()]
        if result.detections is not None:
            atomic_write(state.run_dir / "predictions" / f"stage{stage}_{task.spec.name}.json",
                         json.dumps(result.detections))
    if stage > 0:
        audit_start = time.perf_counter()
        audit_batchnorm(state, model, tasks, test_loaders, device, stage=stage, stage_task=stage_task, primary=primary)
        state.resources["stages"][stage].update(eval_seconds=audit_start - start,
                                                bn_audit_seconds=time.perf_counter() - audit_start)
    write_metrics(state.run_dir / "metrics.csv", state.rows)
    write_table(state.run_dir / "per_class.csv", state.per_class, PER_CLASS_COLUMNS)
    write_table(state.run_dir / "bn_drift.csv", state.bn_rows, BN_COLUMNS)


def audit_batchnorm(state: Run, model: torch.nn.Module, tasks: list[Any], test_loaders: list[DataLoader],
                    device: torch.device, *, stage: int, stage_task: str, primary: dict[str, tuple[float, int]]) -> None:
    """Drift of every BN layer since the end of each earlier stage (after every stage) and, after the last
    stage, each earlier task re-evaluated with the BN statistics of its own stage (metric ``<primary>_own_bn``):
    the part of the drop BN explains. Only the last stage's drop is reported, so earlier stages skip the
    re-evaluation; where the statistics did not move (e.g. bn_frozen) the forward would be identical, so the
    stage's own value (``primary``) is taken."""
    current = batchnorm_state(model)
    state.bn_stats[stage] = current
    for ref_stage, reference in state.bn_stats.items():
        if ref_stage < stage:
            state.bn_rows += [{**state.base(stage, stage_task), "reference_stage": ref_stage, "layer": layer,
                               "statistic": stat, "distance": d} for layer, stat, d in bn_drift(current, reference)]
    if stage < len(tasks):
        return
    for own_stage, (task, test_loader) in enumerate(zip(tasks[: stage - 1], test_loaders), start=1):
        own = state.bn_stats[own_stage]
        value, n = primary[task.spec.name]
        if not all(torch.equal(own[key], current[key]) for key in own):
            with batchnorm_stats_from(model, own):
                coco_gt = task.test.coco if task.spec.kind == "det" else None
                value, n = evaluate_task(model, task.spec, test_loader, device, coco_gt).metrics[task.spec.metric]
        state.rows.append({**state.base(stage, stage_task), "eval_task": task.spec.name,
                           "metric": f"{task.spec.metric}_own_bn", "value": value, "direction": "higher", "n": n})


_LATENCY: dict[tuple, dict[str, dict[int, float]]] = {}  # per process: latency does not depend on the weights


def write_resources(state: Run, model: UniHeadNet, specs: tuple[TaskSpec, ...], device: torch.device) -> None:
    """resources.json: parameters and times per stage, evaluation share, latency, peak memory, budgets."""
    key = (state.config.backbone, state.config.head_channels, state.config.head_stride,
           tuple((t.name, t.num_classes) for t in specs), str(device))
    if key not in _LATENCY:
        _LATENCY[key] = {t.name: {size: latency_ms(model, t, size, device) for size in (256, 512)} for t in specs}
    stages = state.resources["stages"]
    for stage in stages.values():
        stage.update(eval_share_of_stage_time(stage["train_seconds"] + stage["seconds_saved_by_cache"],
                                              stage["eval_seconds"], stage["bn_audit_seconds"]))
    train = sum(s["train_seconds"] for s in stages.values())
    trained = sum(s["train_seconds"] + s["seconds_saved_by_cache"] for s in stages.values())
    evaluation = sum(s["eval_seconds"] for s in stages.values())
    audit = sum(s["bn_audit_seconds"] for s in stages.values())
    name = device_name(device)
    atomic_write(state.run_dir / "resources.json", to_json({
        "device": name, "stages": stages, "train_seconds": train, "eval_seconds": evaluation,
        "bn_audit_seconds": audit, **eval_share_of_stage_time(trained, evaluation, audit),
        "latency_ms": _LATENCY[key], "memory": peak_memory_mb(device),
        "budgets": budget_checks(model.parameter_counts()["total"], {t: v[512] for t, v in _LATENCY[key].items()}, name),
    }))


def eval_share_of_stage_time(train: float, evaluation: float, audit: float) -> dict[str, float | None]:
    """Shares of a stage's time (training + evaluation + BN audit). Training is what the stage took when it
    was trained, also when this run restored it from the stage-1 cache."""
    total = train + evaluation + audit
    return {"eval_share": evaluation / total if total else None,
            "eval_and_bn_audit_share": (evaluation + audit) / total if total else None}


def summary(run_dir: Path) -> str:
    """What `clbench run` prints: the stage table (DESIGN's default threshold of 5%) and the time line."""
    import pandas as pd
    table, note = run_table(pd.read_csv(run_dir / "metrics.csv"), threshold=5.0)
    return (to_markdown(table) + "\n" + note + "\n"
            + resource_line(json.loads((run_dir / "resources.json").read_text())))


def resource_line(report: dict[str, Any]) -> str:
    """One line of resources.json: time split, evaluation share per stage, peak memory, device."""
    stages = report["stages"]
    per_stage = " / ".join(f"{100 * s['eval_share']:.1f}%" for s in stages.values())
    memory = report["memory"]
    peak = (f"{memory['cuda_max_allocated_mb']:.0f} MB CUDA" if memory.get("cuda_max_allocated_mb") is not None
            else f"{memory['process_peak_rss_mb']:.0f} MB RSS")
    return (f"Time: training {report['train_seconds']:.1f} s, evaluation {report['eval_seconds']:.1f} s "
            f"({100 * report['eval_share']:.1f}% of stage time; per stage {per_stage}), BN audit "
            f"{report['bn_audit_seconds']:.1f} s; peak memory {peak}; device {report['device']}.")
