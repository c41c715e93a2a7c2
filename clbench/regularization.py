"""EWC (Kirkpatrick et al. 2017) as pure functions: a diagonal Fisher and the quadratic penalty."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn


def diagonal_fisher(model: nn.Module, batches: Iterable, loss_fn: Callable[[object, object], torch.Tensor],
                    max_batches: int) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher: the mean over ``max_batches`` batches of the squared gradient of the
    task loss, for every parameter that requires grad (F_i in eq. 3 of Kirkpatrick et al.)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    for count, (images, targets) in enumerate(batches, start=1):
        grads = torch.autograd.grad(loss_fn(images, targets), list(params.values()), allow_unused=True)
        for (name, _), grad in zip(params.items(), grads):
            if grad is not None:
                fisher[name] += grad.detach() ** 2
        if count == max_batches:
            break
    return {n: f / max(count, 1) for n, f in fisher.items()}


def normalise_fisher(fisher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scale a Fisher so its mean entry is 1: task losses differ ~100x in scale, so one λ fits all tasks."""
    total = sum(f.sum() for f in fisher.values())
    entries = sum(f.numel() for f in fisher.values())
    mean = float(total) / max(entries, 1)
    return {n: f / mean for n, f in fisher.items()} if mean > 0 else fisher


def ewc_penalty(model: nn.Module, fisher: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ_i F_i (θ_i − θ*_i)² over the parameters in ``fisher`` (eq. 3 without λ/2)."""
    params = dict(model.named_parameters())
    terms = [(fisher[n] * (params[n] - anchor[n]) ** 2).sum() for n in fisher]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def online_fisher(previous: dict[str, torch.Tensor] | None, new: dict[str, torch.Tensor],
                  gamma: float) -> dict[str, torch.Tensor]:
    """Online EWC (Schwarz et al. 2018): F ← γ F_prev + F_new."""
    if previous is None:
        return dict(new)
    return {n: gamma * previous.get(n, torch.zeros_like(f)) + f for n, f in new.items()}
