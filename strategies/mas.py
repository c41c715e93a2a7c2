"""Memory Aware Synapses (Aljundi et al., "Memory Aware Synapses: Learning what (not) to forget", ECCV 2018)."""

from __future__ import annotations

from typing import Any

import torch

from clbench.freezing import no_bn_update
from clbench.regularization import accumulate, mas_importance, normalise_importance, quadratic_penalty
from clbench.strategy import StageContext, Strategy, register


@register("mas")
class MAS(Strategy):
    """Penalise moving the weights the earlier tasks' outputs are most sensitive to (eq. 2).

    Importance = how strongly a parameter moves the task's output (|∂‖F(x)‖²/∂θ| on that task's own slice,
    per pixel for seg, per grid cell for det); penalty λ Σ Ω (θ − θ*)² (eq. 2), Ω summed over tasks."""

    shares_first_stage = True  # importances are measured in after_stage

    def __init__(self, *, lam: float = 10.0, batches: int = 8, normalize: bool = True) -> None:
        if lam < 0 or batches < 1:
            raise ValueError("need lam >= 0 and batches >= 1")
        self.lam, self.batches, self.normalize = lam, batches, normalize
        self.importance: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def loss_term(self, ctx: StageContext, images: torch.Tensor, outputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return self.lam * quadratic_penalty(ctx.model, self.importance, self.anchor) if self.importance else None

    def after_stage(self, ctx: StageContext) -> None:
        if ctx.is_last:
            return  # nothing left to protect
        ctx.model.eval()  # the function the network serves, and BN statistics untouched
        with no_bn_update(ctx.model):
            new = mas_importance(ctx.model, ctx.device_batches(), lambda x: ctx.model(x)[ctx.task.name],
                                 ctx.task.kind, self.batches)
        new = normalise_importance(new) if self.normalize else new
        self.importance = accumulate(self.importance or None, new, 1.0)
        self.anchor = {n: p.detach().clone() for n, p in ctx.model.named_parameters() if n in self.importance}

    def state_dict(self) -> dict[str, Any]:
        return {"importance": self.importance, "anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.importance, self.anchor = dict(state["importance"]), dict(state["anchor"])
