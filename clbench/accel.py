"""What a GPU user sets besides the data: mixed precision, memory format, torch.compile and determinism.

Every one of them is a RunConfig field, recorded in config.yaml; what it resolved to on the device the run
used (the autocast dtype, whether a GradScaler runs, the cuDNN flags) is recorded in env.json.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from clbench import ClbenchError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
BACKEND = "inductor"  # torch.compile's backend (the tests use "eager": inductor compiles for minutes on a CPU)


@dataclass(frozen=True)
class Precision:
    """The training precision of a run: autocast to ``dtype`` (None: float32) on ``device_type``; fp16 also
    scales the loss (a GradScaler), bf16 does not need to (float32's exponent range)."""

    device_type: str
    dtype: torch.dtype | None

    @property
    def name(self) -> str:
        return next((k for k, v in DTYPES.items() if v == self.dtype), "off")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device_type, enabled=self.dtype == torch.float16)

    def to_dict(self) -> dict[str, Any]:
        return {"amp": self.name, "autocast_dtype": str(self.dtype).replace("torch.", "") if self.dtype else None,
                "grad_scaler": self.dtype == torch.float16}


def precision(amp: str, device: torch.device) -> Precision:
    """``--amp`` on ``device``: auto = bf16 on a CUDA device that supports it, fp16 on one that does not,
    float32 on the CPU (bf16 autocast trains 1.6x slower on this project's CPU); bf16/fp16 are honoured on
    either device (the CPU's autocast runs both: that is how the AMP paths are tested without a GPU), except bf16 on
    a GPU without it: an error before anything runs (autocast would silently fall back to float32)."""
    if amp == "auto":
        if device.type != "cuda":
            return Precision(device.type, None)
        return Precision("cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ClbenchError("--amp bf16: this GPU has no bfloat16 support; use --amp fp16 (or auto, which picks it)")
    return Precision(device.type, DTYPES.get(amp))


def set_determinism(deterministic: bool, device: torch.device) -> dict[str, Any]:
    """Process-wide switches for one run (a comparison sets them again for every cell); returns them for env.json.

    On: cuDNN picks deterministic kernels without benchmarking, ``torch.use_deterministic_algorithms`` (warn-only:
    an op without a deterministic kernel warns instead of stopping a run; the seg loss's upsampling, the one
    such op in training, has a deterministic form, ``clbench.losses.upsample``), and cuBLAS gets a fixed
    workspace (``CUBLAS_WORKSPACE_CONFIG``, read when cuBLAS starts: set before the first CUDA matmul).
    Off: cuDNN benchmark mode on CUDA (fastest kernels per shape; the same seed gives close, not equal, results)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic and device.type == "cuda"
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    return {"deterministic": deterministic, "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32}


def compile_model(model: nn.Module) -> nn.Module:
    """torch.compile ``model`` in place (``nn.Module.compile``): the same object, the same parameter names and
    state_dict keys, so checkpoints, strategies' parameter tables and ``evaluation_state`` are unaffected.
    Training and inference compile separately (train/eval mode is part of the guard)."""
    model.compile(backend=BACKEND)
    return model


def is_compiled(model: nn.Module) -> bool:
    return getattr(model, "_compiled_call_impl", None) is not None


def compiled_like(original: nn.Module, twin: nn.Module) -> nn.Module:
    """``twin`` (a deep copy of ``original``) compiled if ``original`` is: torch drops the compiled call when a
    module is copied, so a teacher snapshot of a compiled student would otherwise run eagerly."""
    if is_compiled(original) and not is_compiled(twin):
        compile_model(twin)
    return twin
