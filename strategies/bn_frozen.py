"""Frozen BatchNorm statistics: the remedy for the BN drift the original report blamed for its −47% drop."""

from __future__ import annotations

from clbench.freezing import batchnorm_layers
from clbench.strategy import StageContext, Strategy, register


@register("bn_frozen")
class BNFrozen(Strategy):
    """From stage 2 every BatchNorm keeps its running statistics (eval mode that survives model.train())."""

    def __init__(self, *, freeze_affine: bool = False, from_stage: int = 2) -> None:
        if from_stage < 1:
            raise ValueError("from_stage must be >= 1")
        self.freeze_affine = freeze_affine
        self.from_stage = from_stage

    def before_stage(self, ctx: StageContext) -> None:
        if ctx.stage >= self.from_stage and self.freeze_affine:
            for layer in batchnorm_layers(ctx.model):
                layer.requires_grad_(False)

    def before_epoch(self, ctx: StageContext) -> None:
        if ctx.stage >= self.from_stage:
            for layer in batchnorm_layers(ctx.model):
                layer.eval()

    @property
    def shares_first_stage(self) -> bool:  # type: ignore[override]
        return self.from_stage >= 2  # from_stage 1 changes how stage 1 trains
