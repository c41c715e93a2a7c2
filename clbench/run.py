"""`clbench run`: build data, stream, model and strategy; train every stage; evaluate every task after each."""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader

from clbench import ClbenchError
from clbench.config import RunConfig
from clbench.evaluate import evaluate_task
from clbench.loop import StageSettings, task_loss, train_stage
from clbench.model import UniHeadNet
from clbench.report import FOOTNOTE, stage_table, to_markdown
from clbench.results import atomic_write, environment, save_checkpoint, to_json, write_metrics
from clbench.plugins import create
from clbench.strategy import StageContext
from clbench.tasks import PRIMARY_METRIC


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


def new_run_dir(config: RunConfig) -> Path:
    run_id = config.run_id or f"{config.strategy}-seed{config.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(config.out) / run_id
    if run_dir.exists():
        raise ClbenchError(f"{run_dir}: already exists; give another --run-id or --out (nothing was overwritten)")
    return run_dir


@dataclass
class Run:
    """A run's state while it trains; ``rows`` are the tidy metrics rows written so far."""

    config: RunConfig
    run_dir: Path
    benchmark: str
    rows: list[dict[str, Any]]


def run(config: RunConfig) -> Path:
    """Train and evaluate every stage; returns the run folder. Finished stages stay on disk if a later one fails."""
    seed_everything(config.seed)
    device = resolve_device(config.device)
    root, benchmark = data_root(config)
    from clbench.benchmarks import TASK_DIRS, load_tasks
    from clbench.benchmarks.stream import build_stream
    tasks = load_tasks(root, config.order, image_size=config.image_size)
    strategy, options = create(config.strategy, config.set)
    config = dataclasses.replace(config, set=options)  # config.yaml records every resolved hyperparameter
    model = UniHeadNet(tasks=[t.spec for t in tasks], backbone=config.backbone, pretrained=config.pretrained,
                       pretrained_file=config.pretrained_file, head_channels=config.head_channels,
                       head_stride=config.head_stride).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    stream = build_stream([t.train for t in tasks], [t.test for t in tasks])
    state = Run(config, new_run_dir(config), benchmark, [])
    state.run_dir.mkdir(parents=True)
    atomic_write(state.run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    atomic_write(state.run_dir / "env.json", to_json({**environment(device, {t: root / TASK_DIRS[t] for t in config.order}),
                                                      "counts": model.parameter_counts(),
                                                      "seeding": {"python": config.seed, "numpy": config.seed,
                                                                  "torch": config.seed,
                                                                  "loader_generator": "seed + 1000 * stage"}}))
    specs = tuple(t.spec for t in tasks)
    test_loaders = [loader(exp.dataset, batch_size=32, shuffle=False, seed=config.seed, workers=config.workers,
                           device=device) for exp in stream.test_stream]
    evaluate_all(state, model, tasks, test_loaders, device, stage=0, stage_task="none")
    for stage, experience in enumerate(stream.train_stream, start=1):
        spec = specs[stage - 1]
        settings = StageSettings(epochs=config.epochs[spec.name], lr=config.lr[spec.name],
                                 weight_decay=config.weight_decay, grad_clip=config.grad_clip, amp=config.amp)
        ctx = StageContext(model=model, stage=stage, task=spec, tasks=specs, device=device,
                           train_loader=loader(experience.dataset, batch_size=config.batch_size[spec.name], shuffle=True,
                                               seed=config.seed + 1000 * stage, workers=config.workers, device=device),
                           task_loss=lambda task, out, y, m=model: task_loss(m, task, out, y, (config.image_size,) * 2))
        train_stage(ctx, strategy, settings, progress=config.progress)
        evaluate_all(state, model, tasks, test_loaders, device, stage=stage, stage_task=spec.name)
        save_checkpoint(state.run_dir / "checkpoints" / f"stage{stage}.pt",
                        {"model": model.state_dict(), "strategy": strategy.state_dict(), "stage": stage,
                         "task": spec.name})
    return state.run_dir


def evaluate_all(state: Run, model: torch.nn.Module, tasks: list[Any], test_loaders: list[DataLoader],
                 device: torch.device, *, stage: int, stage_task: str) -> None:
    """Evaluate every task, append the rows, rewrite metrics.csv atomically."""
    for task, test_loader in zip(tasks, test_loaders):
        coco_gt = task.test.coco if task.spec.kind == "det" else None
        for metric, (value, n) in evaluate_task(model, task.spec, test_loader, device, coco_gt).items():
            state.rows.append({"run_id": state.run_dir.name, "benchmark": state.benchmark,
                               "strategy": state.config.strategy, "seed": state.config.seed, "stage": stage,
                               "stage_task": stage_task, "eval_task": task.spec.name, "metric": metric,
                               "value": value, "direction": task.spec.direction, "n": n})
    write_metrics(state.run_dir / "metrics.csv", state.rows)


def summary(run_dir: Path) -> str:
    import pandas as pd
    rows = pd.read_csv(run_dir / "metrics.csv")
    return to_markdown(stage_table(rows)) + "\n" + FOOTNOTE
