"""Synaptic Intelligence (Zenke, Poole & Ganguli, "Continual Learning Through Synaptic Intelligence", ICML 2017)."""

from __future__ import annotations

from typing import Any

import torch

from clbench.regularization import accumulate, normalise_importance, quadratic_penalty, si_importance
from clbench.strategy import StageContext, Strategy, register


@register("si")
class SI(Strategy):
    """Penalise moving the weights whose training path lowered the loss most (eq. 4).

    Importance from each parameter's contribution to the loss drop along its training path (ω = Σ −g·Δθ),
    then a penalty c Σ Ω (θ − θ*)² (eq. 4). g is the gradient of the training loss as the optimizer receives it
    (unscaled, before clipping, including earlier penalty terms, as in the authors' code)."""

    # No: SI integrates every step of every stage, stage 1 included.
    shares_first_stage = False

    def __init__(self, *, lam: float = 10.0, xi: float = 1e-3, normalize: bool = True) -> None:
        if lam < 0 or xi <= 0:
            raise ValueError("need lam >= 0 (c in eq. 4) and xi > 0 (the damping ξ of eq. 5)")
        self.lam, self.xi, self.normalize = lam, xi, normalize
        self.importance: dict[str, torch.Tensor] = {}  # Ω, summed over finished stages
        self.anchor: dict[str, torch.Tensor] = {}      # θ* at the end of the last stage
        self._omega: dict[str, torch.Tensor] = {}      # ω of the running stage
        self._start: dict[str, torch.Tensor] = {}      # θ at the start of the running stage
        self._step: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] = ({}, {})  # this step's g, θ before

    def before_stage(self, ctx: StageContext) -> None:
        trainable = {n: p for n, p in ctx.model.named_parameters() if p.requires_grad}
        self._start = {n: p.detach().clone() for n, p in trainable.items()}
        self._omega = {n: torch.zeros_like(p) for n, p in trainable.items()}

    def loss_term(self, ctx: StageContext, images: torch.Tensor, outputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return self.lam * quadratic_penalty(ctx.model, self.importance, self.anchor) if self.importance else None

    def after_backward(self, ctx: StageContext, grads: dict[str, torch.Tensor]) -> None:
        params = dict(ctx.model.named_parameters())
        self._step = ({n: g.detach().clone() for n, g in grads.items()},
                      {n: params[n].detach().clone() for n in grads})

    def after_step(self, ctx: StageContext) -> None:
        params = dict(ctx.model.named_parameters())
        grads, before = self._step
        for name, grad in grads.items():
            self._omega[name] -= grad * (params[name].detach() - before[name])

    def after_stage(self, ctx: StageContext) -> None:
        params = dict(ctx.model.named_parameters())
        delta = {n: params[n].detach() - start for n, start in self._start.items()}
        new = si_importance(self._omega, delta, self.xi)
        new = normalise_importance(new) if self.normalize else new
        self.importance = accumulate(self.importance or None, new, 1.0)
        self.anchor = {n: params[n].detach().clone() for n in self.importance}
        self._omega, self._start, self._step = {}, {}, ({}, {})

    def state_dict(self) -> dict[str, Any]:
        return {"importance": self.importance, "anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.importance, self.anchor = dict(state["importance"]), dict(state["anchor"])
