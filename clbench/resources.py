"""Resource figures: inference latency per task, peak memory, and the declared budgets."""

from __future__ import annotations

import contextlib
import platform
import resource
import statistics
import time
from typing import Callable

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


class Timer:
    """Milliseconds of a piece of device work: CUDA events on a GPU (the time the GPU spent between them, no host
    round trip counted), ``time.perf_counter`` around it on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.name = "cuda-events" if self.cuda else "perf_counter"

    def __call__(self, work: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            work()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        work()
        return (time.perf_counter() - begin) * 1000


@torch.no_grad()
def latency_ms(model: nn.Module, task: TaskSpec, size: int, device: torch.device, *,
               autocast: contextlib.AbstractContextManager | None = None, repeats: int | None = None,
               warmup: int | None = None) -> float:
    """Median time of one batch-1 forward plus the task's post-processing (decode + NMS, upsampled label map, or
    class), after warm-up (``Timer``: CUDA events on a GPU). ``autocast``: the forward under mixed precision.
    Repeats: 50 after 10 warm-up on CUDA (each is under a few ms), 10 after 3 on the CPU."""
    cuda = device.type == "cuda"
    repeats, warmup = repeats or (50 if cuda else 10), warmup if warmup is not None else (10 if cuda else 3)
    model.eval()
    x = torch.randn(1, 3, size, size, device=device)

    def once() -> None:
        with autocast or contextlib.nullcontext():
            out = model(x)[task.name]
        if task.kind == "det":
            decode_detections(out.float(), model.anchors * size, model.head_stride)
        elif task.kind == "seg":
            seg_labels(out[0].float(), (size, size))
        else:
            out.argmax(1)

    timer = Timer(device)
    times = [timer(once) for _ in range(warmup + repeats)][warmup:]
    return statistics.median(times)


RUN_PEAK = "the run's own: the process's peak RSS was reset when the run started (/proc/self/clear_refs)"
PROCESS_PEAK = ("the process's peak RSS since it started (this system cannot reset it): earlier runs in the same "
                "process are included")


def reset_peak_memory(device: torch.device) -> str:
    """Start a run's own high-water marks, so a comparison's cells do not inherit each other's peaks: CUDA's peak
    statistics, and on Linux the process's peak RSS. Returns how the CPU peak will be measured."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return PROCESS_PEAK
    return RUN_PEAK


def peak_memory_mb(device: torch.device, method: str = PROCESS_PEAK) -> dict[str, float | str]:
    """The peak resident set size (what ``method`` says it covers; resetting it resets getrusage's figure too) and
    CUDA's max allocated since the run started (on CUDA)."""
    out: dict[str, float | str] = {"process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                   "peak_rss_is": method}
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
