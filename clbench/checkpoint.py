"""Evaluate a saved checkpoint (the course's `eval.py --weights W --data_root D --tasks all` interface)
through exactly the code a run uses: the same loaders, stream, model and evaluate_task."""

from __future__ import annotations

from pathlib import Path

import torch

from clbench import ClbenchError
from clbench.config import TASK_NAMES, RunConfig
from clbench.evaluate import EVAL_BATCH, evaluate_task
from clbench.tasks import TaskSpec

PRINTED = {"det": "mAP", "seg": "mIoU", "cls": "top1"}


def load_checkpoint(path: Path) -> dict:
    if not Path(path).is_file():
        raise ClbenchError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ClbenchError(f"{path}: not a loadable checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or not {"model", "model_config", "tasks"} <= set(ckpt):
        raise ClbenchError(f"{path}: not a clbench checkpoint (expected model, model_config and tasks)")
    return ckpt


def evaluate_checkpoint(weights: Path, data_root: Path | None, tasks: str, device: str) -> dict[str, dict[str, float]]:
    """task → {its primary metric: value} for the requested tasks of the checkpoint's network."""
    from clbench.benchmarks import load_task
    from clbench.benchmarks.stream import build_stream
    from clbench.run import build_model, data_root as resolve_root, loader, resolve_device
    ckpt = load_checkpoint(weights)
    specs = [TaskSpec(**{**t, "classes": tuple(t["classes"]), "category_ids": tuple(t["category_ids"])})
             for t in ckpt["tasks"]]
    wanted = [t.name for t in specs] if tasks == "all" else [t.strip() for t in tasks.split(",")]
    unknown = [t for t in wanted if t not in {s.name for s in specs}]
    if unknown:
        raise ClbenchError(f"--tasks {tasks}: {unknown[0]!r} is not a task of {weights} "
                           f"(it has {', '.join(s.name for s in specs)}; names are {', '.join(TASK_NAMES)})")
    cfg = ckpt["model_config"]
    config = RunConfig(backbone=cfg["backbone"], head_channels=cfg["head_channels"], head_stride=cfg["head_stride"],
                       image_size=cfg["image_size"], data_root=str(data_root) if data_root else None)
    dev = resolve_device(device)
    root, _ = resolve_root(config)
    data = [load_task(root, name, image_size=cfg["image_size"]) for name in wanted]
    for task in data:
        expected = next(s for s in specs if s.name == task.spec.name)
        if task.spec.classes != expected.classes:
            raise ClbenchError(f"{root}: the {task.spec.name} classes {list(task.spec.classes)} differ from the "
                               f"checkpoint's {list(expected.classes)}")
    model = build_model(config, specs, dev)
    model.load_state_dict(ckpt["model"])
    stream = build_stream([t.test for t in data], [t.test for t in data])
    results = {}
    for task, experience in zip(data, stream.test_stream):
        batches = loader(experience.dataset, batch_size=EVAL_BATCH, shuffle=False, seed=0, workers=0, device=dev)
        coco_gt = task.test.coco if task.spec.kind == "det" else None
        value, _ = evaluate_task(model, task.spec, batches, dev, coco_gt).metrics[PRINTED[task.spec.kind]]
        results[task.spec.name] = {PRINTED[task.spec.kind]: value}
    return results
