"""Everything a run writes, written atomically: config.yaml, metrics.csv (tidy), env.json, checkpoints."""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import subprocess
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from clbench import ClbenchError

METRIC_COLUMNS = ("run_id", "benchmark", "strategy", "seed", "stage", "stage_task", "eval_task", "split", "metric",
                  "value", "direction", "n", "ci_low", "ci_high")
OPTIONAL_METRIC_COLUMNS = ("split", "ci_low", "ci_high")   # absent from tables written before they existed
BOOTSTRAP_COLUMNS = ("run_id", "benchmark", "strategy", "seed", "stage", "stage_task", "eval_task", "split", "metric",
                     "values")
TEST, VALIDATION = "test", "validation"   # metrics.csv's split: the task's val folder, or held out of its train
PER_CLASS_COLUMNS = ("run_id", "benchmark", "strategy", "seed", "stage", "stage_task", "eval_task", "class", "metric",
                     "value")
BN_COLUMNS = ("run_id", "benchmark", "strategy", "seed", "stage", "stage_task", "reference_stage", "layer",
              "statistic", "distance")
CURVE_COLUMNS = ("run_id", "benchmark", "strategy", "seed", "stage", "step", "global_step", "eval_task", "metric",
                 "value", "probe")
PACKAGES = ("torch", "torchvision", "timm", "avalanche-lib", "faster-coco-eval", "pycocotools", "pandas", "numpy",
            "pillow", "clbench")


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write to a temporary file beside ``path`` and rename it over: readers see the old or the new file, whole.
    A failed write (full disk, read-only folder) leaves the old file in place and says so."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # os.open applies the umask to 0o666, as open() would; mkstemp would make the file 0600
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        kept = "the previous complete file is unchanged" if path.exists() else "nothing was written"
        raise ClbenchError(f"{path}: could not write ({exc.strerror or exc}); {kept}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
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


def environment(device: torch.device, data_hashes: dict[str, tuple[Path, str]]) -> dict[str, Any]:
    """Package versions, git commit, device and the hash of each task's data folder."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "git_commit": _git_commit(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "data": {task: {"path": str(path), "sha256": digest} for task, (path, digest) in data_hashes.items()},
    }


def data_source(root: Path) -> dict[str, Any]:
    """Where a data root came from, from its manifest.json (`data import` / `data prepare`) or synth.json."""
    for name, made_by in (("manifest.json", None), ("synth.json", "clbench data synth")):
        path = Path(root) / name
        if path.is_file():
            try:
                manifest = json.loads(path.read_text())
            except (OSError, ValueError):
                return {"data_source": {"manifest": str(path), "error": "unreadable"}}
            source = {"made_by": made_by or manifest.get("made_by", "clbench data prepare"),
                      "manifest_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
            for key in ("source", "sources", "seed", "domain"):
                if key in manifest:
                    source[key] = manifest[key]
            return {"data_source": source}
    return {"data_source": {"made_by": "unknown (no manifest.json): the data root as the user made it"}}


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
