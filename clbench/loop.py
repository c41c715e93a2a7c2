"""The training loop: plain PyTorch with strategy hooks at fixed points (see ``clbench.strategy``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from tqdm import tqdm

from clbench import ClbenchError
from clbench.accel import Precision
from clbench.incremental import restrict_logits
from clbench.losses import cls_loss, det_loss, seg_loss
from clbench.strategy import StageContext, Strategy, loss_terms, summed
from clbench.tasks import TaskSpec
from clbench.tensors import to_device


@dataclass(frozen=True)
class StageSettings:
    epochs: int
    lr: float
    weight_decay: float
    grad_clip: float
    precision: Precision            # --amp on the stage's device (``clbench.accel.precision``)
    schedule: str = "constant"      # the learning rate over the stage's steps: constant or cosine (to 0)
    warmup: float = 0.0             # linear warm-up over this fraction of the stage's steps
    assign: str = "centre"          # detection's target assignment (``clbench.losses.assign_targets``)


def lr_factor(step: int, steps: int, schedule: str, warmup: float) -> float:
    """The learning rate's factor at optimizer step ``step`` (0-based) of ``steps``: a linear warm-up over the first
    ``ceil(warmup * steps)`` steps ((step + 1) / W, so step 0 already moves), then 1 (constant) or half a cosine from 1
    to 0 over the remaining steps (cosine: the last step's factor is 0.5 · (1 + cos(π (R−1)/R)), never exactly 0)."""
    warm = math.ceil(warmup * steps)
    if step < warm:
        return (step + 1) / warm
    if schedule == "constant":
        return 1.0
    rest = max(steps - warm, 1)
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / rest))


def scheduler(optimizer: torch.optim.Optimizer, steps: int, schedule: str,
              warmup: float) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr_factor`` as a LambdaLR, stepped once after every optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps, schedule, warmup))


class NonFiniteLoss(ClbenchError):
    pass


def task_loss(model: torch.nn.Module, task: TaskSpec, outputs: dict[str, torch.Tensor], targets: Any,
              input_hw: tuple[int, int], assign: str = "centre", classes: tuple[int, ...] | None = None) -> torch.Tensor:
    """The task's own loss on the model's outputs for it (``assign``: detection's target assignment; ``classes``:
    the classes introduced so far, the others' logits masked out, DESIGN.md §8)."""
    out = restrict_logits(outputs[task.name], task.kind, classes)
    if task.kind == "det":
        anchors_px = model.anchors * out.new_tensor([input_hw[1], input_hw[0]])
        return det_loss(out.float(), targets, anchors_px, model.head_stride, assign)
    if task.kind == "seg":
        return seg_loss(out.float(), targets)
    return cls_loss(out.float(), targets)


OnStep = Callable[[int, dict[str, float]], None]


def train_stage(ctx: StageContext, strategy: Strategy, settings: StageSettings, *, progress: bool = True,
                on_step: OnStep | None = None) -> list[float]:
    """Train one stage's epochs (the caller runs ``strategy.after_stage``); returns each epoch's mean loss.
    ``on_step(step, values)``: after each step (counted from 1 over the stage), the loss, the task's loss and
    each strategy's term (trackers)."""
    strategy.before_stage(ctx)
    params = {n: p for n, p in ctx.model.named_parameters() if p.requires_grad}
    if not params:
        raise ClbenchError(f"stage {ctx.stage} ({ctx.task.name}): strategy {strategy.name!r} left no trainable parameter")
    optimizer = torch.optim.AdamW(params.values(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = scheduler(optimizer, settings.epochs * len(ctx.train_loader), settings.schedule, settings.warmup)
    scaler = settings.precision.scaler()
    losses = []
    for epoch in range(settings.epochs):
        ctx.model.train()
        strategy.before_epoch(ctx)
        batches = tqdm(ctx.train_loader, desc=f"stage {ctx.stage} {ctx.task.name} epoch {epoch + 1}/{settings.epochs}",
                       leave=False, disable=not progress, dynamic_ncols=True)
        offset = epoch * len(ctx.train_loader)
        epoch_step = (lambda i, values, o=offset: on_step(o + i, values)) if on_step else None
        losses.append(train_epoch(ctx, strategy, batches, params, optimizer, scaler, settings, epoch, epoch_step,
                                  schedule))
    return losses


def train_epoch(ctx: StageContext, strategy: Strategy, batches: Iterable, params: dict[str, torch.nn.Parameter],
                optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, settings: StageSettings,
                epoch: int, on_step: OnStep | None = None,
                schedule: torch.optim.lr_scheduler.LRScheduler | None = None) -> float:
    """One pass over ``batches`` of (images, targets, task labels); returns the mean loss. ``schedule`` steps after
    every optimizer step (also one the fp16 GradScaler skipped: the schedule follows the step count)."""
    total, steps = 0.0, 0
    for step, (images, targets, _) in enumerate(batches):
        images, targets = to_device(images, ctx.device), to_device(targets, ctx.device)
        with settings.precision.autocast():
            outputs = ctx.model(images)
            own = strategy.task_loss(ctx, images, outputs, targets)
            if own is None:
                own = ctx.task_loss(ctx.task, outputs, targets)
            terms = loss_terms(strategy, ctx, images, outputs)
            term = summed(list(terms.values()))
            loss = own if term is None else own + term
        where = f"stage {ctx.stage} ({ctx.task.name}), epoch {epoch + 1}, step {step + 1}"
        value, stepped = optimizer_step(loss, params, optimizer, scaler, settings.grad_clip, where,
                                        lambda grads: strategy.after_backward(ctx, grads))
        if stepped:  # a step the GradScaler skipped (fp16 gradients overflowed) is not a step
            strategy.after_step(ctx)
        if schedule is not None:
            schedule.step()
        total, steps = total + value, steps + 1
        if on_step:
            on_step(step + 1, {"train/loss": value, f"train/loss_{ctx.task.name}": own.item(),
                               **{f"train/term_{name}": t.item() for name, t in terms.items()}})
        if hasattr(batches, "set_postfix") and step % 5 == 0:
            batches.set_postfix(loss=f"{value:.3f}")
    return total / max(steps, 1)


def optimizer_step(loss: torch.Tensor, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, grad_clip: float, where: str,
                   edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor] | None] | None = None
                   ) -> tuple[float, bool]:
    """One step: a non-finite loss is an error naming ``where``; backward (scaled under fp16), unscale, the
    gradients ``edit`` returns put in place, clip, step. Returns the loss value and whether the optimizer
    stepped: under fp16 the GradScaler skips a step whose scaled gradients overflowed (and lowers its scale:
    that is how a skip shows), common in the first steps while the scale settles."""
    value = loss.item()
    if not math.isfinite(value):
        raise NonFiniteLoss(f"{where}: loss is {value}; lower --lr or check the data (finished stages are kept)")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    if edit is not None:
        replace_gradients(params, edit({n: p.grad for n, p in params.items() if p.grad is not None}))
    torch.nn.utils.clip_grad_norm_(params.values(), grad_clip)
    scale = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    return value, scale is None or scaler.get_scale() >= scale


def replace_gradients(params: dict[str, torch.nn.Parameter], new: dict[str, torch.Tensor] | None) -> None:
    """Put the gradients ``after_backward`` returned in place; a name that is not trainable is an error."""
    for name, grad in (new or {}).items():
        if name not in params:
            raise ClbenchError(f"after_backward returned a gradient for {name!r}, which is not a trainable parameter")
        if grad.shape != params[name].shape:
            raise ClbenchError(f"after_backward returned a {tuple(grad.shape)} gradient for {name!r}, which is "
                               f"{tuple(params[name].shape)}")
        params[name].grad = grad
