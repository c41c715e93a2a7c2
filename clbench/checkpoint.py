"""Evaluate a saved checkpoint (the course's `eval.py --weights W --data_root D --tasks all` interface)
through exactly the code a run uses — the same loaders, stream, model and evaluate_task — without the trainer."""

from __future__ import annotations

from pathlib import Path

import torch

from clbench import ClbenchError
from clbench.benchmarks import load_task, task_folder
from clbench.benchmarks.steps import Viewed, class_view
from clbench.benchmarks.stream import labelled
from clbench.config import FIELDS
from clbench.evaluate import EVAL_BATCH, evaluate_task
from clbench.runtime import ModelConfig, build_model, data_root, loader, resolve_device
from clbench.tasks import TaskSpec


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


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """``model.load_state_dict`` whose mismatch names the first tensor (and shapes) that disagree."""
    own = model.state_dict()
    for name, tensor in weights.items():
        if name not in own:
            raise ClbenchError(f"{source}: tensor {name!r} has no place in the network its model_config describes")
        if tuple(own[name].shape) != tuple(tensor.shape):
            raise ClbenchError(f"{source}: tensor {name!r} is {tuple(tensor.shape)} in the checkpoint but "
                               f"{tuple(own[name].shape)} in the network its model_config describes")
    missing = [name for name in own if name not in weights]
    if missing:
        raise ClbenchError(f"{source}: tensor {missing[0]!r} of the network is missing from the checkpoint")
    model.load_state_dict(weights)


def evaluate_checkpoint(weights: Path, root: Path | None, tasks: str, device: str) -> dict[str, dict[str, float]]:
    """task → {its primary metric: value} for the requested tasks of the checkpoint's network."""
    ckpt = load_checkpoint(weights)
    specs, model_config = _described(ckpt, weights)
    wanted = [t.name for t in specs] if tasks == "all" else [t.strip() for t in tasks.split(",")]
    unknown = [t for t in wanted if t not in {s.name for s in specs}]
    if unknown:
        raise ClbenchError(f"--tasks {tasks}: {unknown[0]!r} is not a task of {weights} "
                           f"(it has {', '.join(s.name for s in specs)})")
    dev = resolve_device(device)
    by_name = {s.name: s for s in specs}
    data = _test_data(ckpt, root, [by_name[name] for name in wanted], model_config)
    model = _network(ckpt, weights, specs, model_config, dev)
    served = ckpt.get("evaluation") or {}   # what the run served each task with (e.g. bn_per_task's statistics)
    seen = ckpt.get("seen") or {}   # class-incremental tasks: the classes the run had introduced by this stage
    results = {}
    for k, (name, task) in enumerate(zip(wanted, data)):
        spec = by_name[name]
        test, coco, classes = task.test, task.coco_gt, None
        if name in seen:
            classes = tuple(int(c) for c in seen[name])
            view = class_view(spec, task.test.present_labels(), classes, coco)
            test, coco = Viewed(task.test, view), view.coco if spec.kind == "det" else coco
        batches = loader(labelled(test, k), batch_size=EVAL_BATCH, shuffle=False, seed=0, workers=0, device=dev)
        value, _ = evaluate_task(model, spec, batches, dev, coco, served.get(name),
                                 classes=classes).metrics[spec.metric]
        results[name] = {spec.metric: value}
    return results


def _described(ckpt: dict, weights: Path) -> tuple[list[TaskSpec], ModelConfig]:
    """The checkpoint's tasks and the configuration that rebuilds its network."""
    try:
        return [TaskSpec.from_dict(t) for t in ckpt["tasks"]], ModelConfig.from_dict(ckpt["model_config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ClbenchError(f"{weights}: malformed model_config or tasks ({type(exc).__name__}: {exc})") from None


def _test_data(ckpt: dict, root: Path | None, specs: list[TaskSpec], model_config: ModelConfig) -> list:
    """Each task's data as the run read it (its folder, the input size and normalisation), classes checked."""
    synth = {key: ckpt.get("synthetic", {}).get(key, FIELDS[key].default)  # the run's synthetic benchmark
             for key in ("synth_train", "synth_val", "synth_domain")}
    synth["synth_variant"] = ckpt.get("synthetic", {}).get("synth_variant", "default")
    data_dir, _ = data_root(str(root) if root else None, **synth)
    data = [load_task(data_dir, spec.kind, image_size=model_config.image_size, normalization=model_config.normalization,
                      name=spec.name, folder=spec.folder) for spec in specs]
    for spec, task in zip(specs, data):
        if task.spec.classes != spec.classes:
            raise ClbenchError(f"{task_folder(data_dir, task.spec)}: the {spec.name} classes {list(task.spec.classes)} "
                               f"differ from the checkpoint's {list(spec.classes)}")
    return data


def _network(ckpt: dict, weights: Path, specs: list[TaskSpec], model_config: ModelConfig,
             device: torch.device) -> torch.nn.Module:
    """The network its model_config describes, with the checkpoint's weights; its served states checked."""
    try:
        model = build_model(model_config, specs, device)
    except (RuntimeError, ValueError) as exc:
        raise ClbenchError(f"{weights}: its model_config does not build a network ({exc})") from None
    load_weights(model, ckpt["model"], weights)
    for name, state in (ckpt.get("evaluation") or {}).items():
        if not isinstance(state, dict) or any(key not in ckpt["model"] for key in state):
            raise ClbenchError(f"{weights}: evaluation state of {name!r} names tensors the network does not have")
    return model
