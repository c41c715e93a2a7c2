"""Everything a run writes, written atomically: config.yaml, metrics.csv (tidy), env.json, checkpoints."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import torch

METRIC_COLUMNS = ("run_id", "benchmark", "strategy", "seed", "stage", "stage_task", "eval_task", "metric", "value",
                  "direction", "n")
PER_CLASS_COLUMNS = ("run_id", "benchmark", "strategy", "seed", "stage", "stage_task", "eval_task", "class", "metric",
                     "value")
BN_COLUMNS = ("run_id", "benchmark", "strategy", "seed", "stage", "stage_task", "reference_stage", "layer",
              "statistic", "distance")
PACKAGES = ("torch", "torchvision", "timm", "avalanche-lib", "faster-coco-eval", "pycocotools", "pandas", "numpy",
            "pillow", "clbench")


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write to a temporary file beside ``path`` and rename it over: readers see the old or the new file, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the mode open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_table(path: Path, rows: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    atomic_write(path, pd.DataFrame(rows, columns=list(columns)).to_csv(index=False, lineterminator="\n"))


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    write_table(path, rows, METRIC_COLUMNS)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """A dict of state_dicts and plain values, loadable with ``torch.load(path, weights_only=True)``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, buffer.getvalue())


@functools.lru_cache(maxsize=None)
def tree_hash(root: Path) -> str:
    """sha256 over every file's relative path and bytes, in sorted order: a dataset's fingerprint
    (once per folder and process: a comparison's cells share their data)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def environment(device: torch.device, data_roots: dict[str, Path]) -> dict[str, Any]:
    """Package versions, git commit, device and the hash of each task's data folder."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "git_commit": _git_commit(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "data": {task: {"path": str(path), "sha256": tree_hash(path)} for task, path in data_roots.items()},
    }


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"
