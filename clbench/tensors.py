"""Tensor helpers every layer uses (a leaf: imports only torch)."""

from __future__ import annotations

from typing import Any

import torch


def to_device(obj: Any, device: torch.device) -> Any:
    """Move tensors (also inside lists and dicts) to ``device``; non-blocking from pinned memory on CUDA."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj
