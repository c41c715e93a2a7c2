"""Pure helpers for freezing: parameter name patterns, BatchNorm layers, output-conv slices."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

from clbench import ClbenchError


def name_matches(name: str, pattern: str) -> bool:
    """``blocks.1`` matches ``backbone.blocks.1.0.conv.weight`` but not ``backbone.blocks.10.…``."""
    return f".{name}.".find(f".{pattern}.") >= 0


def freeze_matching(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Set requires_grad=False on every parameter matching a pattern; a pattern that matches nothing is an
    error (a silent no-op would make a strategy look like it works)."""
    frozen = []
    for pattern in patterns:
        names = [n for n, _ in model.named_parameters() if name_matches(n, pattern)]
        if not names:
            raise ClbenchError(f"freeze pattern {pattern!r} matches no parameter of the model "
                               f"(parameter names look like {next(iter(dict(model.named_parameters())))!r})")
        frozen += names
    params = dict(model.named_parameters())
    for name in frozen:
        params[name].requires_grad_(False)
    return frozen


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def batchnorm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every BN layer's running_mean, running_var and num_batches_tracked, cloned."""
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}


@contextmanager
def no_bn_update(model: nn.Module) -> Iterator[None]:
    """Forward passes that leave every BN running statistic (and its batch counter) bit-identical.

    Normalisation stays what the layer's mode says (batch statistics in train mode, running ones in eval):
    with ``track_running_stats`` off, PyTorch's BatchNorm neither reads nor writes the running buffers in
    train mode. Backward passes of graphs built inside may run after the context exits."""
    layers = batchnorm_layers(model)
    tracking = [layer.track_running_stats for layer in layers]
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer, track in zip(layers, tracking):
            layer.track_running_stats = track


@contextmanager
def swapped_state(model: nn.Module, tensors: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """Temporarily load ``tensors`` (``state_dict`` names) into the model; its own are put back on exit."""
    if not tensors:
        yield
        return
    own = model.state_dict()
    unknown = [name for name in tensors if name not in own]
    if unknown:
        raise ClbenchError(f"tensor {unknown[0]!r} to swap in is not in the model")
    saved = {name: own[name].clone() for name in tensors}
    model.load_state_dict(tensors, strict=False)
    try:
        yield
    finally:
        model.load_state_dict(saved, strict=False)


def snapshot_slice(conv: nn.Conv2d, channels: slice) -> dict[str, torch.Tensor]:
    return {"weight": conv.weight.detach()[channels].clone(), "bias": conv.bias.detach()[channels].clone()}


@torch.no_grad()
def restore_slice(conv: nn.Conv2d, channels: slice, saved: dict[str, torch.Tensor]) -> None:
    conv.weight[channels] = saved["weight"].to(conv.weight.device)
    conv.bias[channels] = saved["bias"].to(conv.bias.device)


def keep_gradient_in_slice(param: torch.Tensor, channels: slice) -> torch.utils.hooks.RemovableHandle:
    """A gradient hook that zeroes every output channel's gradient except ``channels``."""
    mask = torch.zeros(param.shape[0], *([1] * (param.dim() - 1)), device=param.device, dtype=param.dtype)
    mask[channels] = 1
    return param.register_hook(lambda grad: grad * mask)
