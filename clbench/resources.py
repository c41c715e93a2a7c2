"""Resource figures: inference latency per task, peak memory, and the declared budgets."""

from __future__ import annotations

import platform
import resource
import statistics
import time

import torch
from torch import nn

from clbench.decode import decode_detections, seg_labels
from clbench.tasks import TaskSpec

PARAM_BUDGET = 8_000_000
LATENCY_BUDGET_MS = 150.0  # per 512x512 image, the assignment's T4 figure


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def latency_ms(model: nn.Module, task: TaskSpec, size: int, device: torch.device, *, repeats: int = 10,
               warmup: int = 3) -> float:
    """Median wall time of one batch-1 forward plus the task's post-processing (decode + NMS, upsampled
    label map, or class), after warm-up, with the device synchronised."""
    model.eval()
    x = torch.randn(1, 3, size, size, device=device)
    times = []
    for i in range(warmup + repeats):
        _sync(device)
        start = time.perf_counter()
        out = model(x)[task.name]
        if task.kind == "det":
            decode_detections(out.float(), model.anchors * size, model.head_stride)
        elif task.kind == "seg":
            seg_labels(out[0].float(), (size, size))
        else:
            out.argmax(1)
        _sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """CUDA max allocated (if on CUDA) and the process's peak resident set size."""
    out = {"process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def budget_checks(total_params: int, latency_512: dict[str, float | None], device: str) -> list[dict[str, object]]:
    """The declared budgets as pass/fail lines, each saying where it was measured (None: not measured)."""
    checks = [{"budget": f"parameters < {PARAM_BUDGET:,}", "value": total_params, "pass": total_params < PARAM_BUDGET,
               "device": "any"}]
    for task, ms in latency_512.items():
        checks.append({"budget": f"{task} inference <= {LATENCY_BUDGET_MS:g} ms at 512x512",
                       "value": None if ms is None else round(ms, 2),
                       "pass": None if ms is None else ms <= LATENCY_BUDGET_MS,
                       "device": device if ms is not None else "not measured (--latency-sizes has no 512)"})
    return checks
