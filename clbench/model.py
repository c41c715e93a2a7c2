"""UniHeadNet: a timm backbone, an FPN-style fusion, and ONE head whose output conv is sliced per task.

Output channels of ``head_out`` are laid out as named slices (DESIGN.md §2):
``det`` = A × (5 + C_det) (per anchor: cx, cy, w, h, objectness, class logits), ``seg`` = C_seg,
``cls`` = C_cls. ``UniHeadNet.slices`` is the table freeze/restore strategies use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

from clbench import ClbenchError
from clbench.anchors import DEFAULT_ANCHORS
from clbench.tasks import TaskSpec
from clbench.weights import is_efficientnet_pytorch, map_by_structure, packaged_file

# Fixed default anchors as (w, h) fractions of the input side, so they scale with --image-size.
# The box decode allows 0..4x an anchor, so three anchors cover boxes from ~2% to the full image.


def conv_bn_act(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU(inplace=True))


def slice_table(tasks: Sequence[TaskSpec], num_anchors: int) -> dict[str, slice]:
    """Contiguous output-channel slices in task order; together they cover the output conv exactly."""
    widths = {"det": lambda t: num_anchors * (5 + t.num_classes), "seg": lambda t: t.num_classes,
              "cls": lambda t: t.num_classes}
    table, start = {}, 0
    for task in tasks:
        width = widths[task.kind](task)
        table[task.name] = slice(start, start + width)
        start += width
    return table


class UniHeadNet(nn.Module):
    """Backbone features at strides (8,) 16, 32 fused top-down to ``head_stride``, then one head."""

    def __init__(self, *, tasks: Sequence[TaskSpec], backbone: str = "efficientnet_b0", pretrained: bool | str = False,
                 pretrained_file: str | None = None, head_channels: int = 96, head_stride: int = 8,
                 anchors: Sequence[tuple[float, float]] = DEFAULT_ANCHORS) -> None:
        super().__init__()
        if head_stride not in (8, 16):
            raise ClbenchError(f"head_stride: expected 8 or 16, got {head_stride}")
        self.tasks = {t.name: t for t in tasks}
        self.head_stride = head_stride
        self.channels_last = False
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32), persistent=False)
        self.backbone = _create_backbone(backbone, pretrained, pretrained_file, head_stride)
        channels = self.backbone.feature_info.channels()
        self.lateral = nn.ModuleList(nn.Conv2d(c, head_channels, 1) for c in channels)
        self.head = nn.Sequential(conv_bn_act(head_channels, head_channels), conv_bn_act(head_channels, head_channels))
        self.slices = slice_table(tasks, len(anchors))
        self.head_out = nn.Conv2d(head_channels, max(s.stop for s in self.slices.values()), 1)

    def to_channels_last(self) -> "UniHeadNet":
        """NHWC weights and inputs: 1.2x faster training on this project's CPU as well as on GPUs."""
        self.channels_last = True
        return self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """All task outputs at once: det (B, A, H, W, 5+C), seg (B, C, H, W) at head stride, cls (B, C)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        raw = self.head_out(self.head(self._fuse(self.backbone(x))))
        return {name: self._task_output(task, raw[:, self.slices[name]]) for name, task in self.tasks.items()}

    def _fuse(self, features: list[torch.Tensor]) -> torch.Tensor:
        fused = self.lateral[-1](features[-1])
        for lateral, feature in zip(reversed(self.lateral[:-1]), reversed(features[:-1])):
            fused = lateral(feature) + F.interpolate(fused, size=feature.shape[-2:], mode="nearest")
        return fused

    def _task_output(self, task: TaskSpec, raw: torch.Tensor) -> torch.Tensor:
        if task.kind == "det":
            b, _, h, w = raw.shape
            return raw.view(b, len(self.anchors), 5 + task.num_classes, h, w).permute(0, 1, 3, 4, 2)
        if task.kind == "cls":
            return raw.mean(dim=(2, 3))
        return raw

    def parameter_counts(self) -> dict[str, int]:
        return {"total": sum(p.numel() for p in self.parameters()),
                "trainable": sum(p.numel() for p in self.parameters() if p.requires_grad)}


def _create_backbone(name: str, pretrained: bool | str, pretrained_file: str | None, head_stride: int) -> nn.Module:
    """timm's features-only model of ``name``: random, timm's hub weights (``pretrained=True``), packaged weights
    (``pretrained="lite0"``) or a local file."""
    if pretrained and pretrained_file:
        raise ClbenchError("--pretrained and --pretrained-file are exclusive: name one source of weights")
    if isinstance(pretrained, str):
        pretrained, pretrained_file = False, str(packaged_file(pretrained))
    if name not in timm.list_models():
        raise ClbenchError(f"backbone: timm has no model named {name!r}")
    probe = timm.create_model(name, features_only=True, pretrained=False)
    reductions = probe.feature_info.reduction()
    wanted = [i for i, r in enumerate(reductions) if r >= head_stride]
    try:
        model = timm.create_model(name, features_only=True, pretrained=pretrained, out_indices=wanted)
    except Exception as exc:  # network, hub or missing-weight errors: never fall back to random init
        raise ClbenchError(f"backbone {name!r}: could not load timm's pretrained weights ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}); give a local file with --pretrained-file") from exc
    if pretrained_file:
        load_backbone_file(model, Path(pretrained_file), name)
    return model


def load_backbone_file(backbone: nn.Module, path: Path, arch: str) -> None:
    """Load a timm checkpoint, a backbone state_dict, or an EfficientNet checkpoint in the efficientnet_pytorch
    naming (mapped by structure onto timm's full ``arch``, then cut to the backbone); every backbone tensor must be
    found in it, with its shape."""
    if not path.is_file():
        raise ClbenchError(f"{path}: pretrained weight file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ClbenchError(f"{path}: not a loadable state_dict ({type(exc).__name__})") from exc
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    if is_efficientnet_pytorch(state):
        state = map_by_structure(state, arch, path)
    own = backbone.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise ClbenchError(f"{path}: {len(missing)} of {len(own)} backbone tensors missing (first: {missing[0]}); "
                           "expected a timm checkpoint of the same backbone")
    wrong = [k for k in own if state[k].shape != own[k].shape]
    if wrong:
        raise ClbenchError(f"{path}: tensor {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, "
                           f"expected {tuple(own[wrong[0]].shape)}")
    backbone.load_state_dict({k: state[k] for k in own})
