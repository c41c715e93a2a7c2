"""Where a comparison's cells run: in this process one after another (the default), or as tasks on a Ray
cluster (``clbench compare --executor ray``; the extra ``clbench[ray]``).

The driver (the `clbench compare` process) is the only writer of the comparison folder. A Ray worker never
sees a path inside it: it gets the cell's configuration, the seed's stage-1 cache as bytes (a Ray
dependency on that seed's stage-1 task) and, for an interrupted cell, the files of its folder as bytes;
it runs the cell in a private temporary folder and streams back, after every finished stage, the files
that changed (a Ray generator task), which the driver writes atomically, checkpoints before tables, as
the sequential executor does. So a driver killed at any moment leaves the same resumable folder as a
sequential run, and rerunning the command resumes it (with either executor).

Faults: a worker process killed or a node removed makes Ray rerun the task (up to ``--retries``); the
rerun starts again from the state the cell was submitted with and replays the same stages, so the
driver receives each stage once and the results are those of an uninterrupted run. An exception in the
cell (bad data, a non-finite loss, a broken plugin) would recur: it is not retried, the cell is
reported by name and the other cells go on.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

from clbench import ClbenchError
from clbench.config import RunConfig
from clbench.joint import run_joint
from clbench.recorder import mark_finished
from clbench.results import atomic_write
from clbench.run import DONE, run_stages
from clbench.runtime import Session

INSTALL = 'pip install "clbench[ray]"'
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": a local Ray instance binds every port to 127.0.0.1


@dataclass(frozen=True)
class Job:
    """One Ray task of a comparison: a strategy cell, a single-task reference run or the joint bound."""

    kind: str            # "run" or "joint"
    sub: str             # the comparison's subfolder: runs, reference, bounds
    cell_id: str
    config: Any          # RunConfig
    stages: int
    cache: Path | None   # the seed's stage-1 cache file (a cell that shares stage 1), else None


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None   # None: start a local instance on this machine, on loopback only
    cell_cpus: int = 1
    cell_gpus: float = 0.0
    retries: int = 2

    def __post_init__(self) -> None:
        if self.cell_cpus < 1:
            raise ClbenchError(f"--cell-cpus {self.cell_cpus}: expected a whole number >= 1")
        if not 0 <= self.cell_gpus <= 64:
            raise ClbenchError(f"--cell-gpus {self.cell_gpus}: expected a fraction or number of GPUs >= 0")
        if self.retries < 0:
            raise ClbenchError(f"--retries {self.retries}: expected a whole number >= 0")


# A local instance: every port on 127.0.0.1 (ray reads this once, when imported), and workers at the driver's
# priority (Ray's default niceness 15 lets any other load on the machine starve the cells).
LOCAL_ENV = {LOOPBACK_ENV: "0", "RAY_worker_niceness": "0"}


def import_ray(local: bool) -> Any:
    """ray, imported for a local instance (``local``: LOCAL_ENV set first) or a cluster; a one-line error
    that says how to install it when it is missing."""
    if local:
        os.environ.update(LOCAL_ENV)
    try:
        import ray
    except ImportError:
        raise ClbenchError(f"--executor ray: Ray is not installed; install it with {INSTALL}") from None
    return ray


def connect(options: RayOptions) -> tuple[Any, bool]:
    """ray, and whether this process started the instance (then it stops it at the end)."""
    ray = import_ray(options.address is None)
    if ray.is_initialized():
        return ray, False
    try:
        if options.address is None:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     _node_ip_address="127.0.0.1", configure_logging=False)
            return ray, True
        ray.init(address=options.address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClbenchError(f"--ray-address {options.address}: cannot connect ({str(exc).splitlines()[0]})") from None
    return ray, False


# the worker side -----------------------------------------------------------------------------------------

_SESSION: Any = None  # one per worker process: data verified and latency measured once, as in a comparison


def _session() -> Any:
    global _SESSION
    if _SESSION is None:
        _SESSION = Session()
    return _SESSION


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def changed_files(folder: Path, before: dict[str, tuple[int, int]]) -> dict[str, bytes]:
    """The files of ``folder`` that are new or changed since ``before`` (updated in place)."""
    now = snapshot(folder)
    changed = {rel: (folder / rel).read_bytes() for rel, stamp in now.items() if before.get(rel) != stamp}
    before.clear()
    before.update(now)
    return changed


def where() -> dict[str, Any]:
    """The node and process a task ran on."""
    import ray
    context = ray.get_runtime_context()
    return {"executor": "ray", "node_id": context.get_node_id(), "host": socket.gethostname(),
            "ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}


def as_driver_wrote_it(rel: str, data: bytes, out: str) -> bytes:
    """config.yaml names the folder the run was written to: the driver's, not the worker's private one."""
    if rel != "config.yaml":
        return data
    values = yaml.safe_load(data)
    values["out"] = out
    return yaml.safe_dump(values, sort_keys=False).encode()


def cell_task(kind: str, cell_id: str, config: dict[str, Any], cache: bytes | None, existing: dict[str, bytes],
              threads: int, out: str) -> Iterator[dict[str, Any]]:
    """Run one job in a private folder; yield {"files": changed files, "stage": k} after every finished stage
    and {"files": ..., "stage": DONE, "where": ...} at the end. ``out``: the driver's folder, as text only."""
    import torch

    torch.set_num_threads(threads)
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="clbench-cell-"))
    try:
        run_dir = work / "runs" / cell_id
        for rel, data in existing.items():
            atomic_write(run_dir / rel, data)
        cache_path = None
        if cache is not None:
            cache_path = work / "stage1.pt"
            cache_path.write_bytes(cache)
        settings = dataclasses.replace(RunConfig(**config), out=str(work / "runs"), run_id=cell_id, progress=False)
        before = snapshot(run_dir) if run_dir.exists() else {}
        if kind == "joint":
            run_joint(settings, session=_session())
            stages: Iterator[int] = iter([DONE])
        else:
            stages = run_stages(settings, stage1_cache=cache_path, session=_session(),
                                resume=(run_dir / "config.yaml").exists())
        for stage in stages:
            files = {rel: as_driver_wrote_it(rel, data, out) for rel, data in changed_files(run_dir, before).items()}
            yield {"files": files, "stage": stage,
                   **({"where": where(), "seconds": time.perf_counter() - start} if stage == DONE else {})}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def stage1_task(config: dict[str, Any], threads: int) -> bytes:
    """Train one seed's shared stage 1 exactly as the first sharing cell of a sequential comparison would
    (the normal run path, stopped after stage 1) and return the stage-1 cache file's bytes."""
    import torch

    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="clbench-stage1-"))
    try:
        cache = work / "stage1.pt"
        settings = dataclasses.replace(RunConfig(**config), out=str(work), run_id="stage1", progress=False, log=())
        for _ in run_stages(settings, stage1_cache=cache, session=_session(), last_stage=1):
            pass
        return cache.read_bytes()
    finally:
        shutil.rmtree(work, ignore_errors=True)


# the driver side -----------------------------------------------------------------------------------------

def write_files(run_dir: Path, files: dict[str, bytes]) -> None:
    """What a worker sent, written atomically: checkpoints first, the tables last (a stage is in the tables
    only if its checkpoint exists, as in a sequential run)."""
    def order(rel: str) -> int:
        return 0 if rel.startswith("checkpoints/") else 2 if rel.endswith(".csv") else 1
    for rel in sorted(files, key=order):
        target = (run_dir / rel).resolve()
        if run_dir.resolve() not in target.parents:
            raise ClbenchError(f"{run_dir}: a worker sent {rel!r}, which is outside the cell's folder")
        atomic_write(target, files[rel])


def folder_files(run_dir: Path) -> dict[str, bytes]:
    """An interrupted cell's files, to resume it on a worker (nothing if the folder holds no run)."""
    if not (run_dir / "config.yaml").exists():
        return {}
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def sequential_where() -> dict[str, Any]:
    return {"executor": "sequential", "host": socket.gethostname(), "pid": os.getpid(),
            "platform": platform.platform()}


def run_on_ray(jobs: list[Job], folder: Path, options: RayOptions, progress: Any) -> list[str]:
    """Every unfinished job as a Ray task, each seed's missing stage-1 cache first (a dependency of the
    cells that share it); writes what the tasks stream back. Returns one line per failed job."""
    ray, started = connect(options)
    try:
        return _drive(ray, jobs, folder, options, progress)
    finally:
        if started:
            ray.shutdown()


def _drive(ray: Any, jobs: list[Job], folder: Path, options: RayOptions, progress: Any) -> list[str]:
    resources = {"num_cpus": options.cell_cpus, "num_gpus": options.cell_gpus, "max_retries": options.retries,
                 "retry_exceptions": False}
    remote_cell = ray.remote(cell_task).options(**resources)
    remote_stage1 = ray.remote(stage1_task).options(**resources)
    caches: dict[Path, Any] = {}
    pending: dict[Any, Job] = {}
    for job in jobs:
        run_dir = folder / job.sub / job.cell_id
        if (run_dir / "done.json").exists():
            progress.job_done(job, skipped=True)
            continue
        if job.cache is not None and job.cache not in caches:
            caches[job.cache] = ray.put(job.cache.read_bytes()) if job.cache.exists() else \
                remote_stage1.remote(job.config.to_dict(), options.cell_cpus)
        existing = folder_files(run_dir) if job.kind == "run" else {}
        if run_dir.exists() and not existing:
            shutil.rmtree(run_dir)  # a folder without a run in it (the folder lock excludes any other writer)
        generator = remote_cell.remote(job.kind, job.cell_id, job.config.to_dict(), caches.get(job.cache), existing,
                                       options.cell_cpus, str(folder / job.sub))
        pending[generator] = job
        progress.job_started(job)
    return _collect(ray, pending, {ref: path for path, ref in caches.items() if not path.exists()}, folder, progress)


def _collect(ray: Any, pending: dict[Any, Job], waiting_caches: dict[Any, Path], folder: Path,
             progress: Any) -> list[str]:
    """Write what the cells stream back as it comes (and the stage-1 caches they computed); one line per failure."""
    failures: list[str] = []
    while pending or waiting_caches:
        ready, _ = ray.wait(list(pending) + list(waiting_caches), num_returns=1, timeout=5.0)
        for ref in ready:
            if ref in waiting_caches:
                path = waiting_caches.pop(ref)
                try:
                    atomic_write(path, ray.get(ref))
                except ray.exceptions.RayError:  # the cells that depend on it fail with the same cause, reported
                    pass
                continue
            failure = _next_chunk(ray, ref, pending, folder, progress)
            if failure:
                failures.append(failure)
    return failures


def _next_chunk(ray: Any, ref: Any, pending: dict[Any, Job], folder: Path, progress: Any) -> str | None:
    """One chunk of a cell written (or the cell's end noted); the failure line when the cell failed."""
    job = pending[ref]
    try:
        chunk = ray.get(next(ref))
    except StopIteration:
        del pending[ref]
        return None
    except ray.exceptions.RayError as exc:  # the cell raised (not retried), or its retries are used up
        del pending[ref]
        line = f"{job.sub}/{job.cell_id}: failed: {cause(exc)}"
        progress.job_failed(job, line)
        return line
    _commit_chunk(folder / job.sub / job.cell_id, chunk)
    progress.job_stage(job, chunk["stage"])
    return None


def _commit_chunk(run_dir: Path, chunk: dict[str, Any]) -> None:
    write_files(run_dir, chunk["files"])
    if chunk["stage"] == DONE:
        mark_finished(run_dir, chunk["where"], chunk["seconds"])


def cause(exc: BaseException) -> str:
    """One line: the original exception of a Ray task error, or what Ray says about a lost worker or node."""
    original = getattr(exc, "cause", None)
    if isinstance(original, BaseException):
        exc = original
    lines = [line for line in str(exc).splitlines() if line.strip()]
    text = lines[-1] if isinstance(exc, ClbenchError) or not lines else lines[0]
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, ClbenchError) else text
