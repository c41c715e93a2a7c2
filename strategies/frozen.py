"""The ``frozen`` bound: the zero-interference end of the stability-plasticity trade-off."""

from __future__ import annotations

from clbench.freezing import batchnorm_layers, keep_gradient_in_slice
from clbench.strategy import StageContext, register

from .freeze_restore import FreezeRestore


@register("frozen")
class Frozen(FreezeRestore):
    """After stage 1 the backbone, neck and head convolutions are frozen, their BatchNorm statistics too; each
    later task trains only its own output-conv slice, and earlier tasks' slices are restored after every stage
    (weight decay would move them): every earlier task is served bit-identically, at the price of what the
    frozen features let a new task learn. A bound (`clbench compare --bounds frozen`), not in --strategies all."""

    shares_first_stage = True  # stage 1 is plain training; after_stage only snapshots
    bound = True               # the zero-interference end: compare --bounds frozen, never in --strategies all

    def __init__(self) -> None:
        super().__init__(patterns=(), last_stage_slice_only=True)

    def before_stage(self, ctx: StageContext) -> None:
        if ctx.stage < 2:
            return
        for param in ctx.model.parameters():
            param.requires_grad_(False)
        channels = ctx.model.slices[ctx.task.name]
        for param in (ctx.model.head_out.weight, ctx.model.head_out.bias):
            param.requires_grad_(True)
            self._hooks.append(keep_gradient_in_slice(param, channels))

    def before_epoch(self, ctx: StageContext) -> None:
        if ctx.stage >= 2:
            for layer in batchnorm_layers(ctx.model):
                layer.eval()
