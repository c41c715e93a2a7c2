"""What a run needs from its environment, apart from training: seeding, the device, the data root, the
loaders, the network, and a Session that carries what is worth computing once per process."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import random
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from clbench import ClbenchError
from clbench.anchors import DEFAULT_ANCHORS
from clbench.benchmarks import synthetic
from clbench.benchmarks.layouts import TASK_DIRS
from clbench.benchmarks.verify import verify
from clbench.model import UniHeadNet
from clbench.pretrained import IMAGENET, Normalization
from clbench.tasks import TaskSpec


@dataclass
class Session:
    """Results of work that does not change within a process and is shared by the runs of a comparison:
    data roots already verified, dataset fingerprints, inference latency per architecture (it does not
    depend on the weights). One per `clbench run`; `clbench compare` passes one to all its cells."""

    verified: set[Path] = field(default_factory=set)   # task folders already checked
    tree_hashes: dict[Path, str] = field(default_factory=dict)
    latency: dict[tuple, dict[str, dict[str, dict[int, float]]]] = field(default_factory=dict)

    def verify(self, root: Path, stream: list[tuple[str, str, str | None]] | None = None) -> None:
        """The full check of `clbench data verify` of the run's task folders, once per folder: a bad dataset fails
        in seconds."""
        tasks = [(name, kind, folder) for name, kind, folder in stream or []
                 if (root / (folder or TASK_DIRS[kind])).resolve() not in self.verified]
        if stream is None or tasks:
            verify(root, tasks if stream is not None else None)
            self.verified.update((root / (folder or TASK_DIRS[kind])).resolve() for _, kind, folder in tasks)

    def tree_hash(self, root: Path) -> str:
        """sha256 over every file's relative path and bytes, in sorted order: a dataset's fingerprint."""
        key = Path(root).resolve()
        if key not in self.tree_hashes:
            digest = hashlib.sha256()
            for path in sorted(p for p in key.rglob("*") if p.is_file()):
                digest.update(path.relative_to(key).as_posix().encode("utf-8", "surrogateescape") + b"\0")
                digest.update(hashlib.sha256(path.read_bytes()).digest())
            self.tree_hashes[key] = digest.hexdigest()
        return self.tree_hashes[key]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states as tensors and plain values: loadable with weights_only."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """Whatever runs inside (in-stage evaluation) leaves training as it was: every module's train/eval mode (a
    strategy's eval-mode BatchNorm included) and the random states ``rng_state`` covers."""
    modes, state = [(module, module.training) for module in model.modules()], rng_state()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        set_rng_state(state)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32  # torch derives each worker's seed from the loader's generator
    random.seed(seed)
    np.random.seed(seed)
    _die_with_parent()


def _die_with_parent() -> None:
    """A data-loader worker gets SIGKILL the moment its training process dies (Linux), so a killed cell leaves
    no orphan (torch's own check notices a dead parent only after seconds)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def loader(dataset: Any, *, batch_size: int, shuffle: bool, seed: int, workers: int, device: torch.device) -> DataLoader:
    """A loader with its own generator (``seed``) whose workers are seeded from it."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=dataset.collate_fn,
                      num_workers=workers, worker_init_fn=_seed_worker, pin_memory=device.type == "cuda",
                      generator=torch.Generator().manual_seed(seed), persistent_workers=False)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ClbenchError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)


def data_root(path: str | None, synth_train: int, synth_val: int, synth_domain: str = "distinct",
              synth_variant: str = "default") -> tuple[Path, str]:
    """The data root and the benchmark's name: the user's folder, or the synthetic twin from the cache
    ("synthetic", "synthetic-shared" for the shared image domain, "-voc21" added for the 21-class variant)."""
    if path:
        root = Path(path)
        if not root.is_dir():
            raise ClbenchError(f"--data-root {root}: folder not found")
        return root, synthetic_name(root) if (root / "synth.json").exists() else root.name
    spec = synthetic.SynthSpec(seed=0, n_train=synth_train, n_val=synth_val, domain=synth_domain, variant=synth_variant)
    root = synthetic.cached(spec)
    return root, synthetic_name(root)


def synthetic_name(root: Path) -> str:
    """"synthetic", "synthetic-<domain>" and/or "-<variant>" from the folder's synth.json (older folders have
    neither: distinct, default)."""
    try:
        settings = json.loads((root / "synth.json").read_text())
        domain, variant = settings.get("domain", "distinct"), settings.get("variant", "default")
    except (OSError, ValueError, AttributeError):
        domain, variant = "distinct", "default"
    return "synthetic" + ("" if domain == "distinct" else f"-{domain}") + ("" if variant == "default" else f"-{variant}")


class MemoryCache(Dataset):
    """A test set's items kept after their first decode: every task is evaluated after every stage and
    the evaluation transform is deterministic, so decoding and resizing once per run is enough. It holds
    only in the process that reads it (loader workers would each fill, and throw away, a private copy),
    so a run reads a cached test set without workers."""

    def __init__(self, dataset: Any) -> None:
        self.dataset, self.items = dataset, {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        if index not in self.items:
            self.items[index] = self.dataset[index]
        return self.items[index]


def cached_in_memory(dataset: Any, image_size: int, budget_bytes: int = 512 * 2**20) -> Any:
    """The dataset behind a MemoryCache when its resized images fit ``budget_bytes`` (float32)."""
    return MemoryCache(dataset) if len(dataset) * 3 * image_size**2 * 4 <= budget_bytes else dataset


@dataclass(frozen=True)
class ModelConfig:
    """What rebuilds the network of a checkpoint (saved in every checkpoint as ``model_config``)."""

    backbone: str
    head_channels: int
    head_stride: int
    image_size: int
    order: tuple[str, ...]
    normalization: Normalization = IMAGENET   # the input's mean/std: `clbench eval` normalises the same way
    anchors: tuple[tuple[float, float], ...] = DEFAULT_ANCHORS   # detection's, as fractions (fitted ones too)

    def to_dict(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "head_channels": self.head_channels, "head_stride": self.head_stride,
                "image_size": self.image_size, "order": list(self.order), **self.normalization.to_dict(),
                "anchors": [list(a) for a in self.anchors]}

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """A checkpoint's model_config (without mean/std: written before 0.2, ImageNet's; without anchors: the
        defaults)."""
        normalization = Normalization(tuple(cfg["mean"]), tuple(cfg["std"])) if "mean" in cfg else IMAGENET
        anchors = tuple((float(w), float(h)) for w, h in cfg["anchors"]) if "anchors" in cfg else DEFAULT_ANCHORS
        return cls(cfg["backbone"], int(cfg["head_channels"]), int(cfg["head_stride"]), int(cfg["image_size"]),
                   tuple(cfg["order"]), normalization, anchors)


def build_model(model_config: ModelConfig, specs: list[TaskSpec], device: torch.device, *,
                pretrained: bool | str = False, pretrained_file: str | None = None, channels_last: bool = True) -> UniHeadNet:
    model = UniHeadNet(tasks=specs, backbone=model_config.backbone, pretrained=pretrained,
                       pretrained_file=pretrained_file, head_channels=model_config.head_channels,
                       head_stride=model_config.head_stride, anchors=model_config.anchors).to(device)
    return model.to_channels_last() if channels_last else model
