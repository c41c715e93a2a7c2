"""Harness overhead: one epoch through clbench's loop vs a bare hand-written PyTorch loop.

Both loops train the same UniHeadNet (same initial weights) on the same in-memory batches, with the
same loss function, optimizer and gradient clipping, in one process, alternating which goes first.
Prints the median time of each and the ratio clbench / bare (target <= 1.05).

    python perf/bench_loop.py [--task det] [--batches 12] [--repeats 5] [--image-size 128] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from clbench.accel import Precision
from clbench.benchmarks import load_task
from clbench.benchmarks.images import collate
from clbench.benchmarks.synthetic import SynthSpec, cached
from clbench.loop import StageSettings, task_loss, train_epoch
from clbench.model import UniHeadNet
from clbench.plugins import create
from clbench.strategy import StageContext
from clbench.tensors import to_device


def bare_epoch(model, task, batches, optimizer, device, image_size, grad_clip):
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for images, targets, _ in batches:
        images, targets = to_device(images, device), to_device(targets, device)
        loss = task_loss(model, task, model(images), targets, (image_size, image_size))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def clbench_epoch(model, task, batches, optimizer, settings, device, image_size):
    ctx = StageContext(model=model, stage=1, task=task, tasks=(task,), seed=0, train_loader=batches, device=device,
                       task_loss=lambda t, o, y: task_loss(model, t, o, y, (image_size, image_size)))
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    train_epoch(ctx, create("naive", {})[0], batches, params, optimizer, scaler, settings, epoch=0)


def timed_epochs(base, task, batches, settings, device, image_size, repeats) -> dict[str, list[float]]:
    """Seconds per epoch of each loop, alternating which goes first; the first round warms up and is not counted."""
    times: dict[str, list[float]] = {"clbench": [], "bare": []}
    for repeat in range(repeats + 1):
        for name in (("clbench", "bare") if repeat % 2 else ("bare", "clbench")):
            model = copy.deepcopy(base).train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
            sync(device)
            start = time.perf_counter()
            if name == "bare":
                bare_epoch(model, task, batches, optimizer, device, image_size, settings.grad_clip)
            else:
                clbench_epoch(model, task, batches, optimizer, settings, device, image_size)
            sync(device)
            if repeat:
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="det", choices=["seg", "det", "cls"])
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    data = load_task(cached(SynthSpec()), args.task, image_size=args.image_size)
    items = [(*data.train[i], 0) for i in range(args.batches * args.batch_size)]
    batches = [collate(items[i:i + args.batch_size]) for i in range(0, len(items), args.batch_size)]
    base = UniHeadNet(tasks=[data.spec]).to(device).to_channels_last()  # as clbench.run builds it
    settings = StageSettings(epochs=1, lr=1e-3, weight_decay=1e-4, grad_clip=10.0, precision=Precision("cpu", None))
    times = timed_epochs(base, data.spec, batches, settings, device, args.image_size, args.repeats)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    bare, ours = statistics.median(times["bare"]), statistics.median(times["clbench"])
    print(f"device: {device_name}; task {args.task}; {args.batches} batches of {args.batch_size} at {args.image_size} px")
    print(f"bare PyTorch loop : {bare:.3f} s/epoch (median of {args.repeats})")
    print(f"clbench loop      : {ours:.3f} s/epoch (median of {args.repeats})")
    print(f"ratio clbench/bare: {ours / bare:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
