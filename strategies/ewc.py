"""Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017); online EWC (Schwarz et al., ICML 2018).

Two Fishers (``--set ewc.fisher=batched|per_sample``). ``batched`` (the default, as every published clbench figure
used it) squares each batch's mean gradient: ``fisher_batches`` backward passes, but an approximation that van de
Ven's 2025 comparison shows changes EWC's results. ``per_sample`` is the empirical Fisher as Kirkpatrick et al.
define it, the mean of each sample's squared gradient: one backward pass per sample of those batches."""

from __future__ import annotations

from typing import Any

import torch

from clbench.freezing import no_bn_update
from clbench.regularization import accumulate, diagonal_fisher, normalise_importance, per_sample_fisher, quadratic_penalty
from clbench.strategy import StageContext, Strategy, register


@register("ewc")
class EWC(Strategy):
    """Penalise moving weights the earlier tasks' Fisher marks as important: λ/2 Σ F (θ − θ*)²."""

    shares_first_stage = True  # no Fisher before stage 1 ends: no penalty in stage 1

    FISHERS = {"batched": diagonal_fisher, "per_sample": per_sample_fisher}

    def __init__(self, *, lam: float = 10.0, fisher_batches: int = 8, online: bool = False, gamma: float = 1.0,
                 normalize: bool = True, fisher: str = "batched") -> None:
        if lam < 0 or fisher_batches < 1 or not 0 <= gamma <= 1:
            raise ValueError("need lam >= 0, fisher_batches >= 1 and 0 <= gamma <= 1")
        if fisher not in self.FISHERS:
            raise ValueError(f"fisher {fisher!r}: expected one of {', '.join(self.FISHERS)}")
        self.lam, self.fisher_batches, self.online, self.gamma, self.normalize = lam, fisher_batches, online, gamma, normalize
        self.estimate = self.FISHERS[fisher]
        self.fisher: dict[str, dict[str, torch.Tensor]] = {}   # per task, or one "online" entry
        self.anchor: dict[str, dict[str, torch.Tensor]] = {}   # θ* for each Fisher

    def loss_term(self, ctx: StageContext, images: torch.Tensor, outputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if not self.fisher:
            return None
        penalty = sum(quadratic_penalty(ctx.model, self.fisher[k], self.anchor[k]) for k in self.fisher)
        return self.lam / 2 * penalty

    def after_stage(self, ctx: StageContext) -> None:
        if ctx.is_last:
            return  # nothing left to protect: a Fisher here would cost 8 forward/backward passes for nothing
        ctx.model.eval()  # the Fisher of the network as it serves, and its BN statistics untouched
        with no_bn_update(ctx.model):
            fisher = self.estimate(ctx.model, ctx.device_batches(),
                                   lambda x, y: ctx.task_loss(ctx.task, ctx.model(x), y), self.fisher_batches)
        fisher = normalise_importance(fisher) if self.normalize else fisher
        anchor = {n: p.detach().clone() for n, p in ctx.model.named_parameters() if n in fisher}
        key = "online" if self.online else ctx.task.name
        self.fisher[key] = accumulate(self.fisher.get(key), fisher, self.gamma) if self.online else fisher
        self.anchor[key] = anchor

    def state_dict(self) -> dict[str, Any]:
        return {"fisher": self.fisher, "anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fisher, self.anchor = dict(state["fisher"]), dict(state["anchor"])
