"""RunConfig: one precedence chain, defaults < YAML < CLI; unknown keys are errors with a hint.

YAML keys mirror the CLI flags (``image_size`` ↔ ``--image-size``). Per-task settings (epochs, lr,
batch_size) take one value for every task or ``seg=3,det=6,cls=2`` (a mapping in YAML).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from clbench import ClbenchError, did_you_mean
from clbench.anchors import parse_anchors
from clbench.losses import ASSIGNMENTS
from clbench.pretrained import PACKAGED, parse_normalize
from clbench.protocol import Protocol, load_protocol, one_per_task

KINDS = ("seg", "det", "cls")
TASK_NAMES = KINDS   # the default tasks: one of each kind, named after it
# Per-task settings a task takes from its kind when none is given for it (DESIGN.md §6a).
KIND_DEFAULTS: dict[str, dict[str, Any]] = {"epochs": {"seg": 4, "det": 6, "cls": 3},
                                            "lr": {"seg": 2e-3, "det": 2e-3, "cls": 2e-3},
                                            "batch_size": {"seg": 16, "det": 16, "cls": 16},
                                            "augment": {"seg": False, "det": False, "cls": False}}
ALL = "*"   # a per-task value given once, for every task
TASK_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def _per_task(cast: Callable[[str], Any]) -> Callable[[Any], dict[str, Any]]:
    """One value for every task (``3``) or per task name (``seg=3,det=6`` or a YAML mapping); which names exist
    and the values a task takes from its kind are settled by ``RunConfig`` against its ``tasks``."""
    def parse(value: Any) -> dict[str, Any]:
        if isinstance(value, dict):
            items = value.items()
        elif isinstance(value, str) and "=" in value:
            items = (part.split("=", 1) for part in value.split(","))
        else:
            return {ALL: cast(value)}
        return {str(k).strip(): cast(v) for k, v in items}
    return parse


def _tasks(value: Any) -> dict[str, str]:
    """The tasks a run may train: name -> kind, or kind:folder (a folder of the data root; default the kind's own,
    e.g. mini_voc_seg), as ``seg_a=seg,seg_b=seg:voc_extra`` or a YAML mapping."""
    items = value.items() if isinstance(value, dict) else (part.split("=", 1) for part in str(value).split(","))
    out = {}
    for name, spec in ((str(k).strip(), str(v).strip()) for k, v in items):
        kind, _, folder = spec.partition(":")
        if not TASK_NAME.fullmatch(name) or kind not in KINDS or (folder and not RUN_ID.fullmatch(folder)):
            raise ValueError(f"{name}={spec}: expected NAME=KIND or NAME=KIND:FOLDER, KIND one of {', '.join(KINDS)}, "
                             "FOLDER a folder of the data root")
        out[name] = spec
    if not out:
        raise ValueError("expected at least one task")
    return out


def _order(value: Any) -> tuple[str, ...]:
    """The stages' tasks by name, each once (which names exist: ``tasks``)."""
    order = tuple(v.strip() for v in value.split(",")) if isinstance(value, str) else tuple(value)
    if not order or len(set(order)) != len(order):
        raise ValueError("expected a permutation of the task names, each once (some of them: single-task runs)")
    return order


def _sizes(value: Any) -> tuple[int, ...]:
    """Image sides, e.g. 256,512 (empty: none)."""
    items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value or ())
    sizes = tuple(whole_number(v) for v in items)
    if any(s < 32 for s in sizes):
        raise ValueError("expected sides >= 32")
    return sizes


def _choice(*options: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return value
    return parse


AMP_CHOICES = ("auto", "bf16", "fp16", "off")


def _amp(value: Any) -> str:
    """Mixed precision: auto, bf16, fp16 or off; a boolean (config files before 0.2) reads as auto / off."""
    if isinstance(value, bool) or str(value).lower() in ("true", "false", "yes", "no"):
        return "auto" if parse_bool(value) else "off"
    return _choice(*AMP_CHOICES)(str(value).lower())


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes", "on"):
        return True
    if str(value).lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def whole_number(value: Any) -> int:
    """A whole number: 3, "3", 3.0; never a boolean or 2.5."""
    if isinstance(value, bool):
        raise ValueError("expected a whole number, not a boolean")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("expected a whole number")
        return int(value)
    return int(value)


def finite_float(value: Any) -> float:
    """A finite number (nan and inf are refused: they fail only later, as a NaN loss)."""
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError("expected a finite number")
    return out


def at_least(cast: Callable[[Any], Any], low: float, *, strict: bool = False) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        out = cast(value)
        if out < low or (strict and out == low):
            raise ValueError("expected a positive number" if strict and low == 0 else
                             f"expected a number {'>' if strict else '>='} {low:g}")
        return out
    return parse


def _fraction(value: Any) -> float:
    """A fraction in [0, 1)."""
    out = finite_float(value)
    if not 0 <= out < 1:
        raise ValueError("expected a fraction in [0, 1)")
    return out


def _positive(cast: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return at_least(cast, 0, strict=True)


RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]*")


def run_id_name(value: Any) -> str | None:
    """A run id is a plain folder name (letters, digits, . _ + = -), never a path."""
    name = _optional_str(value)
    if name is not None and not RUN_ID.fullmatch(name):
        raise ValueError("expected a plain name (letters, digits and . _ + = -, not starting with . or -), not a path")
    return name


def _options(value: Any) -> dict[str, Any]:
    """Strategy hyperparameters: ``--set lwf.lam=2`` (repeatable) or a YAML mapping {lwf.lam: 2}."""
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    items = [value] if isinstance(value, str) else list(value)
    out = {}
    for item in items:
        key, sep, val = str(item).partition("=")
        if not sep or not key:
            raise ValueError("expected STRATEGY.PARAM=VALUE, e.g. ewc.lam=5000")
        out[key.strip()] = val.strip()
    return out


def _pretrained(value: Any) -> bool | str:
    """true / false (timm's hub or none), or the name of weights a package ships (``clbench.weights.PACKAGED``)."""
    if isinstance(value, str) and value.strip().lower() in PACKAGED:
        return value.strip().lower()
    try:
        return parse_bool(value)
    except ValueError:
        raise ValueError(f"expected true, false or {', '.join(PACKAGED)}") from None


FIELDS_DEFAULT_BACKBONE = "efficientnet_b0"


def _optional_str(value: Any) -> str | None:
    return None if value in (None, "", "none", "None") else str(value)


class FrozenDict(dict):
    """A dict that refuses changes after construction: RunConfig's per-task and option mappings."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("RunConfig is immutable: use dataclasses.replace(config, field=...)")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _refuse  # type: ignore

    def __reduce__(self) -> tuple:
        return FrozenDict, (dict(self),)

    def __deepcopy__(self, memo: dict) -> "FrozenDict":
        return self  # immutable: a copy is the same value


def _frozen(value: Any) -> Any:
    return FrozenDict(value) if isinstance(value, dict) else value


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return list(value) if isinstance(value, tuple) else value


# Field roles (metadata), read by `clbench compare` and the stage-1 cache instead of hand-kept name lists:
#   per_cell:    compare sets it for each cell (no compare flag)
TRACKER_NAMES = ("tensorboard", "mlflow")


def _trackers(value: Any) -> tuple[str, ...]:
    """Experiment trackers, e.g. tensorboard,mlflow (empty: none)."""
    items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value or ())
    unknown = [v for v in items if v not in TRACKER_NAMES]
    if unknown or len(set(items)) != len(items):
        raise ValueError(f"expected distinct names among {', '.join(TRACKER_NAMES)}")
    return tuple(items)


#   output_only: changes where or how results are shown, never their values (out of every settings hash)
#   strategy:    what a strategy is and its options (out of the stage-1 cache key: see Strategy.shares_first_stage)


@dataclass(frozen=True)
class RunConfig:
    """Every setting of one run; validated and normalised on construction, also when built in code."""

    strategy: str = field(default="naive", metadata={"parse": str, "per_cell": True, "strategy": True, "help":
                          "a strategy (see `clbench strategies`), "
                          "a combination a+b, or path/file.py:Class / package.module:Class"})
    set: dict[str, Any] = field(default_factory=dict, metadata={"parse": _options, "append": True, "strategy": True,
                                "help": "strategy hyperparameter STRATEGY.PARAM=VALUE (repeatable)"})
    seed: int = field(default=0, metadata={"parse": at_least(whole_number, 0), "per_cell": True,
                                           "help": "seeds Python, NumPy, torch, the loaders and the strategy"})
    device: str = field(default="auto", metadata={"parse": _choice("auto", "cpu", "cuda"), "help": "auto = cuda if available"})
    data_root: str | None = field(default=None, metadata={"parse": _optional_str,
                                  "help": "dataset root; default: the synthetic benchmark, generated into the cache"})
    tasks: dict[str, str] = field(default_factory=lambda: {k: k for k in KINDS}, metadata={"parse": _tasks, "help": (
        "the tasks by name: NAME=KIND or NAME=KIND:FOLDER (default seg=seg,det=det,cls=cls, each in its kind's folder "
        "of the data root: mini_voc_seg, mini_coco_det, imagenette_160); two tasks may share a kind")})
    order: tuple[str, ...] = field(default=TASK_NAMES, metadata={"parse": _order, "help": "task order by name, e.g. seg,det,cls"})
    protocol: str | None = field(default=None, metadata={"parse": _optional_str, "help": (
        "a benchmark file (its path, or the name of one clbench ships: `clbench benchmarks`): the experiences in "
        "order, each training a task on the classes it introduces (class-incremental protocols such as "
        "voc-15-5-overlapped); its tasks and order replace --tasks and --order. Default: --tasks in --order, one "
        "experience each")})
    epochs: dict[str, int] = field(default_factory=dict, metadata={
        "parse": _per_task(_positive(whole_number)), "help": "N or per task NAME=N,... (a task not named: its kind's "
        "default, seg 4, det 6, cls 3)"})
    lr: dict[str, float] = field(default_factory=dict,
                                 metadata={"parse": _per_task(_positive(finite_float)), "help": "AdamW learning rate, per task"})
    batch_size: dict[str, int] = field(default_factory=dict,
                                       metadata={"parse": _per_task(_positive(whole_number)),
                                                 "help": "training batch size, per task"})
    augment: dict[str, bool] = field(default_factory=dict,
                                     metadata={"parse": _per_task(parse_bool), "help": "training augmentation per task: "
                                               "random resized crop, flip, colour jitter (true|false|seg=true,...)"})
    schedule: str = field(default="constant", metadata={"parse": _choice("constant", "cosine"), "help": (
        "the learning rate over each stage's optimizer steps (after the warm-up): constant, or cosine = half a cosine "
        "down towards 0; the joint bound follows it over its own steps")})
    warmup: float = field(default=0.0, metadata={"parse": _fraction, "help": (
        "linear learning-rate warm-up over this fraction of each stage's optimizer steps, e.g. 0.05 (0: none)")})
    weight_decay: float = field(default=1e-4, metadata={"parse": at_least(finite_float, 0), "help": "AdamW weight decay"})
    grad_clip: float = field(default=10.0, metadata={"parse": _positive(finite_float), "help": "max gradient norm"})
    image_size: int = field(default=128, metadata={"parse": at_least(whole_number, 32),
                            "help": "square input side (128 for the synthetic benchmark; 256-512 for real data)"})
    backbone: str = field(default=FIELDS_DEFAULT_BACKBONE, metadata={"parse": str, "help": "any timm model name"})
    pretrained: bool | str = field(default=False, metadata={"parse": _pretrained, "help": (
        "true: timm's pretrained weights (hub); lite0: ImageNet EfficientNet-Lite0 weights from the clbench[weights] "
        "extra, no network needed (backbone tf_efficientnet_lite0); false: random initialisation")})
    pretrained_file: str | None = field(default=None, metadata={"parse": _optional_str, "help": (
        "local weights: a timm checkpoint / backbone state_dict, or an EfficientNet checkpoint in the "
        "efficientnet_pytorch naming (mapped by structure onto --backbone)")})
    normalize: str = field(default="auto", metadata={"parse": parse_normalize, "help": (
        "input mean/std: auto (the pretrained weights' own, from timm's pretrained_cfg; ImageNet's without "
        "weights), imagenet, inception (0.5/0.5) or M,M,M/S,S,S; config.yaml records the values used")})
    anchors: str = field(default="default", metadata={"parse": parse_anchors, "help": (
        "detection anchors as (w, h) fractions of the input side: default, kmeans (fitted to the detection tasks' "
        "training boxes, YOLOv2's IoU k-means; config.yaml and the checkpoint keep the fitted values) or W,H;W,H;W,H")})
    assign: str = field(default="centre", metadata={"parse": _choice(*ASSIGNMENTS), "help": (
        "detection's target assignment: centre = one prediction per box (its centre's cell, best-matching anchor); "
        "yolov5 = every anchor within 4x of the box's sides, in the centre's cell and its two nearest neighbours")})
    head_channels: int = field(default=96, metadata={"parse": _positive(whole_number), "help": "width of the neck and head"})
    head_stride: int = field(default=8, metadata={"parse": lambda v: int(_choice("8", "16")(str(whole_number(v)))),
                                                  "help": "output stride of the head: 8 or 16"})
    amp: str = field(default="auto", metadata={"parse": _amp, "help": (
        "mixed precision for training: auto = bf16 on a CUDA device that supports it, fp16 on one that does not, "
        "off on the CPU; bf16; fp16 (with a GradScaler); off. Evaluation is always float32")})
    channels_last: bool = field(default=True, metadata={"parse": parse_bool,
                                "help": "NHWC memory format for weights and inputs (faster on CPUs and GPUs)"})
    compile: bool = field(default=False, metadata={"parse": parse_bool, "help": (
        "torch.compile the network for training and inference (compiling takes minutes on a CPU)")})
    deterministic: bool = field(default=False, metadata={"parse": parse_bool, "help": (
        "deterministic algorithms: cuDNN deterministic without benchmark mode, torch.use_deterministic_algorithms, "
        "CUBLAS_WORKSPACE_CONFIG; off: cuDNN benchmark mode on CUDA (same seed, close but not identical results)")})
    train_in_memory_mb: int = field(default=4096, metadata={"parse": at_least(whole_number, 0), "help": (
        "budget for training images decoded and resized once per run, kept as uint8 (pinned on CUDA) and "
        "augmented a whole batch at a time on the device; a task's set that does not fit what is left of it is "
        "read image by image (0: always image by image)")})
    workers: int = field(default=0, metadata={"parse": at_least(whole_number, 0), "help": "DataLoader worker processes"})
    bootstrap: int = field(default=1000, metadata={"parse": at_least(whole_number, 0), "output_only": True, "help": (
        "resamples of the test (and validation) images for each primary metric's 95%% interval (metrics.csv ci_low, "
        "ci_high; bootstrap.csv the resampled values, for paired drop intervals); 0: none")})
    val_fraction: float = field(default=0.0, metadata={"parse": _fraction, "help": (
        "hold out this fraction of each task's training images as its validation split (classification stratified "
        "by class), evaluated after every stage like the test set (metrics.csv's split column); grids pick on it. "
        "0: none")})
    val_seed: int = field(default=0, metadata={"parse": at_least(whole_number, 0), "help": (
        "seeds which images --val-fraction holds out (with the task's name), the same for every strategy and --seed")})
    synth_train: int = field(default=160, metadata={"parse": _positive(whole_number), "help": "synthetic images per task, train"})
    synth_val: int = field(default=40, metadata={"parse": _positive(whole_number), "help": "synthetic images per task, val"})
    synth_domain: str = field(default="distinct", metadata={"parse": _choice("distinct", "shared"), "help": (
        "the synthetic benchmark's images (without --data-root): distinct = each task its own image statistics, "
        "shared = one scene generator for all three tasks, only the annotations differ")})
    synth_variant: str | None = field(default=None, metadata={"parse": lambda v: None if v is None else
                                       _choice("default", "voc21")(v), "help": (
        "the synthetic segmentation classes (without --data-root): default = background + 5, voc21 = VOC's 21 "
        "classes; unset: the benchmark file's (its `synthetic:`), else default")})
    out: str = field(default="results", metadata={"parse": str, "output_only": True,
                                                  "help": "folder that receives <run_id>/"})
    run_id: str | None = field(default=None, metadata={"parse": run_id_name, "per_cell": True, "output_only": True,
                               "help": "name of the run folder (a plain name); default <strategy>-seed<N>-<time>"})
    label: str | None = field(default=None, metadata={"parse": _optional_str, "per_cell": True, "output_only": True,
                              "help": "the strategy's name in the results rows (default: its registered name; "
                              "`compare --grid` labels a cell lwf[lam=0.1])"})
    progress: bool = field(default=True, metadata={"parse": parse_bool, "output_only": True, "help": "tqdm progress bars"})
    eval_every: int = field(default=0, metadata={"parse": at_least(whole_number, 0), "output_only": True, "help": (
        "evaluate every task inside each stage (curve.csv): after each of the first K optimizer steps, then every K-th "
        "(0: off). Training is unchanged, bit for bit")})
    probe: int = field(default=0, metadata={"parse": at_least(whole_number, 0), "output_only": True, "help": (
        "test images per task for --eval-every: a fixed seeded subset, the same at every point and in every cell "
        "(0: the whole test set)")})
    latency_sizes: tuple[int, ...] = field(default=(256, 512), metadata={
        "parse": _sizes, "output_only": True, "help": "input sides at which resources.json times batch-1 inference "
        "(empty: none; the 150 ms budget is checked at 512)"})

    log: tuple[str, ...] = field(default=(), metadata={
        "parse": _trackers, "output_only": True, "help": "experiment trackers: tensorboard,mlflow (extras "
        "clbench[tensorboard], clbench[mlflow]; offline, nothing leaves the machine)"})
    mlflow_uri: str | None = field(default=None, metadata={
        "parse": _optional_str, "output_only": True, "help": "MLflow tracking URI (default: a local file store, "
        "mlruns/ beside the runs)"})

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = parse_field(f.name, getattr(self, f.name), f"RunConfig.{f.name}")
            object.__setattr__(self, f.name, _frozen(value))
        self._resolve_tasks()
        self._packaged_weights()

    def kind(self, task: str) -> str:
        return self.tasks[task].partition(":")[0]

    def folder(self, task: str) -> str | None:
        """The task's folder in the data root, when it is not its kind's own."""
        return self.tasks[task].partition(":")[2] or None

    def stream(self) -> list[tuple[str, str, str | None]]:
        """(name, kind, folder or None) of each task in ``order``: the tasks a run trains, in the order they start."""
        return [(t, self.kind(t), self.folder(t)) for t in self.order]

    def benchmark_file(self) -> Protocol:
        """The experiences this run trains: ``protocol``'s file, or one experience per task of ``order``."""
        return _protocol(self.protocol, tuple(self.tasks.items()), self.order)

    @property
    def synthetic_variant(self) -> str:
        """Which synthetic data stands in without --data-root: --synth-variant, else the benchmark file's."""
        return self.synth_variant or self.benchmark_file().synthetic

    @property
    def experiences(self) -> tuple[str, ...]:
        """The task each stage trains, stage by stage."""
        return tuple(e.task for e in self.benchmark_file().experiences)

    def _resolve_tasks(self) -> None:
        """``order`` names tasks of ``tasks`` (both from the benchmark file with ``protocol``); every per-task
        setting gets a value for every task: the one given for it, else the one given for all, else its kind's
        default."""
        if self.protocol is not None:
            protocol = _load_protocol(self.protocol)
            if dict(self.tasks) not in ({k: k for k in KINDS}, protocol.task_settings) or \
                    self.order not in (TASK_NAMES, protocol.order):
                raise ClbenchError(f"--protocol {self.protocol}: its file names the tasks and their order; leave "
                                   "--tasks and --order out (or use them without --protocol)")
            if self.eval_every and protocol.incremental:
                raise ClbenchError(f"--eval-every: not available with a class-incremental benchmark file yet "
                                   f"(--protocol {self.protocol}); its tasks are evaluated after each stage")
            object.__setattr__(self, "tasks", _frozen(protocol.task_settings))
            object.__setattr__(self, "order", protocol.order)
        unknown = [t for t in self.order if t not in self.tasks]
        if unknown:
            raise ClbenchError(f"order: {unknown[0]!r} is not a task (tasks: {', '.join(self.tasks)}; --tasks adds "
                               "one)")
        for name, defaults in KIND_DEFAULTS.items():
            given = dict(getattr(self, name))
            stray = sorted(set(given) - set(self.tasks) - {ALL})
            if stray:
                raise ClbenchError(f"--{name.replace('_', '-')}: unknown task {stray[0]!r}, expected some of "
                                   f"{', '.join(self.tasks)}")
            values = {t: given.get(t, given.get(ALL, defaults[self.kind(t)])) for t in self.tasks}
            object.__setattr__(self, name, _frozen(values))

    def _packaged_weights(self) -> None:
        """``pretrained: lite0`` picks its architecture (the default backbone gives way; another is an error)."""
        if not isinstance(self.pretrained, str):
            return
        arch = PACKAGED[self.pretrained].arch
        if self.pretrained_file:
            raise ClbenchError(f"--pretrained {self.pretrained} and --pretrained-file are exclusive: name one source "
                               "of weights")
        if self.backbone == FIELDS_DEFAULT_BACKBONE:
            object.__setattr__(self, "backbone", arch)
        elif self.backbone != arch:
            raise ClbenchError(f"--pretrained {self.pretrained} holds {arch} weights; --backbone {self.backbone} "
                               "conflicts with it (leave --backbone out)")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def without(self, *roles: str) -> dict[str, Any]:
        """``to_dict()`` without the fields of any of ``roles`` (see the field roles above)."""
        return {k: v for k, v in self.to_dict().items() if not any(FIELDS[k].metadata.get(r) for r in roles)}


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


@functools.lru_cache(maxsize=32)
def _protocol(name: str | None, tasks: tuple[tuple[str, str], ...], order: tuple[str, ...]) -> Protocol:
    return _load_protocol(name) if name is not None else one_per_task(dict(tasks), order)


@functools.lru_cache(maxsize=32)
def _load_protocol(name: str) -> Protocol:
    """A benchmark file read once per process (a comparison builds many configurations from one)."""
    return load_protocol(name)


def parse_field(name: str, value: Any, source: str) -> Any:
    try:
        return FIELDS[name].metadata["parse"](value)
    except (ValueError, TypeError) as exc:
        raise ClbenchError(f"{source}: {name} = {value!r}: {exc}") from None


def unknown_key_error(key: str, source: str, known: list[str]) -> ClbenchError:
    return ClbenchError(f"{source}: unknown key {key!r}" + did_you_mean(key, known))


def shipped_configs() -> dict[str, Path]:
    """The run configurations clbench ships (the repository's ``configs/``, installed as ``clbench.configs``):
    name -> file."""
    import clbench.configs
    return {p.stem: p for p in sorted(Path(clbench.configs.__file__).parent.glob("*.yaml"))}


def config_file(path: Path) -> Path:
    """``path`` when it exists; else a shipped configuration of that name (``real-mini`` or ``real-mini.yaml``)."""
    path = Path(path)
    if path.exists() or path.parent != Path("."):
        return path
    shipped = shipped_configs()
    name = path.name.removesuffix(".yaml")
    if name in shipped:
        return shipped[name]
    raise ClbenchError(f"{path}: config file not found, and clbench ships no configuration of that name (shipped: "
                       f"{', '.join(shipped) or 'none'})" + did_you_mean(name, shipped))


def load_yaml(path: Path) -> dict[str, Any]:
    path = config_file(path)
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ClbenchError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ClbenchError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ClbenchError(f"{path}: expected a mapping of keys to values at the top level")
    for key in data:
        if key not in FIELDS:
            raise unknown_key_error(str(key), str(path), list(FIELDS))
    return {key: parse_field(key, value, str(path)) for key, value in data.items()}


def resolve(yaml_path: Path | None, cli: dict[str, Any]) -> RunConfig:
    """defaults < YAML < CLI; ``cli`` holds only the flags actually given. Strategy options merge per key
    (YAML ``set: {lwf.temperature: 3}`` plus ``--set lwf.lam=2`` keeps both)."""
    values = load_yaml(yaml_path) if yaml_path else {}
    given = {key: parse_field(key, value, f"--{key.replace('_', '-')}") for key, value in cli.items()}
    options = {**values.get("set", {}), **given.pop("set", {})}
    merged = {**values, **given, "set": options}
    if isinstance(merged.get("pretrained"), str) and merged.get("backbone", merged["pretrained"]) == FIELDS_DEFAULT_BACKBONE:
        raise ClbenchError(f"--pretrained {merged['pretrained']} picks its own backbone; --backbone "
                           f"{FIELDS_DEFAULT_BACKBONE} conflicts with it (leave --backbone out)")
    return RunConfig(**merged)


def run_fields(values: Mapping[str, Any]) -> dict[str, Any]:
    """The RunConfig fields among parsed command-line values (the rest are the subcommand's own)."""
    return {k: v for k, v in values.items() if k in FIELDS}


def add_arguments(parser: argparse.ArgumentParser, *, skip_role: str | None = None) -> None:
    """One flag per RunConfig field (but those of ``skip_role``), defaulting to 'not given' so it never
    overrides YAML."""
    for name, f in FIELDS.items():
        if skip_role and f.metadata.get(skip_role):
            continue
        flag = f"--{name.replace('_', '-')}"
        if f.metadata.get("append"):
            parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, action="append", metavar="KEY=VALUE",
                                help=f.metadata["help"])
        elif f.metadata["parse"] is parse_bool:
            parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, nargs="?", const="true", metavar="BOOL",
                                help=f.metadata["help"])
        else:
            parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=f.metadata["help"])
