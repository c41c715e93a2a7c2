"""Importance-weighted quadratic penalties as pure functions: EWC's diagonal Fisher (Kirkpatrick et al. 2017),
MAS's output-sensitivity (Aljundi et al. 2018), SI's path integral (Zenke et al. 2017), and the penalty."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn


def gradient_importance(model: nn.Module, batches: Iterable, objective: Callable[[object, object], torch.Tensor],
                        max_batches: int, transform: Callable[[torch.Tensor], torch.Tensor],
                        batch_limit: int | None = None) -> dict[str, torch.Tensor]:
    """The mean over ``max_batches`` batches of ``transform(∂ objective / ∂θ)`` for every parameter that
    requires grad (zero where the objective does not reach). With ``batch_limit``, ``batches`` yields
    (source batch index, batch) and every batch of the first ``batch_limit`` source batches counts."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    for item in batches:
        source, (images, targets) = item if batch_limit is not None else (None, item)
        if batch_limit is not None and source > batch_limit:
            break
        count += 1
        grads = torch.autograd.grad(objective(images, targets), list(params.values()), allow_unused=True)
        for (name, _), grad in zip(params.items(), grads):
            if grad is not None:
                total[name] += transform(grad.detach())
        if count == max_batches:
            break
    return {n: t / max(count, 1) for n, t in total.items()}


def diagonal_fisher(model: nn.Module, batches: Iterable, loss_fn: Callable[[object, object], torch.Tensor],
                    max_batches: int) -> dict[str, torch.Tensor]:
    """The "batched" diagonal Fisher: the square of each batch's mean gradient, averaged over batches. An
    approximation of F_i (eq. 3 of Kirkpatrick et al.): cross terms between a batch's samples enter, and it shrinks
    as the batch grows. Costs one backward pass per batch."""
    return gradient_importance(model, batches, loss_fn, max_batches, torch.square)


def per_sample_fisher(model: nn.Module, batches: Iterable, loss_fn: Callable[[object, object], torch.Tensor],
                      max_batches: int) -> dict[str, torch.Tensor]:
    """The empirical diagonal Fisher as defined: the mean over samples of the squared gradient of each sample's own
    loss (F_i = 1/N Σ_n (∂ℓ_n/∂θ_i)²). One backward pass per sample: the detection and segmentation losses have
    data-dependent branches, so torch.func.vmap cannot batch them, and the loop is exact for every kind."""
    return gradient_importance(model, _one_by_one(batches), loss_fn, max_batches=-1, transform=torch.square,
                               batch_limit=max_batches)


def _one_by_one(batches: Iterable) -> Iterable:
    """Each batch's samples as batches of one (detection targets are a list of per-image dicts), tagged with the
    batch they came from."""
    for index, (images, targets) in enumerate(batches, start=1):
        for i in range(len(images)):
            yield index, (images[i:i + 1], [targets[i]] if isinstance(targets, list) else targets[i:i + 1])


def output_sq_norm(kind: str, output: torch.Tensor) -> torch.Tensor:
    """MAS's ‖F(x)‖²₂ for one task's output, taken where the task makes its predictions and averaged over
    them and over the batch: per image (cls logits), per pixel (seg, over classes), per grid cell and anchor
    (det, over box, objectness and class values)."""
    output = output.float()
    per_position = (output ** 2).sum(dim=1 if kind in ("cls", "seg") else -1)
    return per_position.mean()


def mas_importance(model: nn.Module, batches: Iterable, output_fn: Callable[[object], torch.Tensor], kind: str,
                   max_batches: int) -> dict[str, torch.Tensor]:
    """Ω_i = mean |∂ ‖F(x)‖²₂ / ∂θ_i| (Aljundi et al. eq. 3-4, with the batch mean in place of per-sample
    gradients), F = this task's output slice."""
    return gradient_importance(model, batches, lambda x, _: output_sq_norm(kind, output_fn(x)), max_batches,
                               torch.abs)


def si_importance(omega: dict[str, torch.Tensor], delta: dict[str, torch.Tensor], xi: float) -> dict[str, torch.Tensor]:
    """Zenke et al. eq. 5: Ω = ω / (Δ² + ξ), with Δ the parameter's change over the task. Negative path
    integrals (steps that raised the loss, e.g. from weight decay or momentum) count as 0, so Ω ≥ 0."""
    return {n: omega[n].clamp(min=0) / (delta[n] ** 2 + xi) for n in omega}


def normalise_importance(importance: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scale so the mean entry is 1: task losses and outputs differ ~100x in scale, so one λ fits all tasks."""
    total = sum(f.sum() for f in importance.values())
    entries = sum(f.numel() for f in importance.values())
    mean = float(total) / max(entries, 1)
    return {n: f / mean for n, f in importance.items()} if mean > 0 else importance


def quadratic_penalty(model: nn.Module, importance: dict[str, torch.Tensor],
                      anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ_i Ω_i (θ_i − θ*_i)² over the parameters in ``importance`` (EWC eq. 3 without λ/2; SI eq. 4 and
    MAS eq. 2 without their strength)."""
    params = dict(model.named_parameters())
    terms = [(importance[n] * (params[n] - anchor[n]) ** 2).sum() for n in importance]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def accumulate(previous: dict[str, torch.Tensor] | None, new: dict[str, torch.Tensor],
               gamma: float) -> dict[str, torch.Tensor]:
    """γ · previous + new, per parameter (a parameter missing from one counts as 0 there): online EWC's
    F ← γ F_prev + F_new (Schwarz et al. 2018), and the running importance of SI and MAS (γ = 1)."""
    if previous is None:
        return dict(new)
    out = {n: gamma * f for n, f in previous.items()}
    for name, f in new.items():
        out[name] = out[name] + f if name in out else f
    return out
