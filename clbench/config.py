"""RunConfig: one precedence chain, defaults < YAML < CLI; unknown keys are errors with a hint.

YAML keys mirror the CLI flags (``image_size`` ↔ ``--image-size``). Per-task settings (epochs, lr,
batch_size) take one value for every task or ``seg=3,det=6,cls=2`` (a mapping in YAML).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from clbench import ClbenchError

TASK_NAMES = ("seg", "det", "cls")


def _per_task(cast: Callable[[str], Any]) -> Callable[[Any], dict[str, Any]]:
    def parse(value: Any) -> dict[str, Any]:
        if isinstance(value, dict):
            items = value.items()
        elif isinstance(value, str) and "=" in value:
            items = (part.split("=", 1) for part in value.split(","))
        else:
            return {task: cast(value) for task in TASK_NAMES}
        parsed = {str(k).strip(): cast(v) for k, v in items}
        unknown = set(parsed) - set(TASK_NAMES)
        if unknown:
            raise ValueError(f"unknown task {sorted(unknown)[0]!r}, expected some of {', '.join(TASK_NAMES)}")
        missing = set(TASK_NAMES) - set(parsed)
        if missing:
            raise ValueError(f"no value for {', '.join(sorted(missing))}")
        return parsed
    return parse


def _order(value: Any) -> tuple[str, ...]:
    """The stages' tasks: a permutation of seg,det,cls (or a subset, as single-task reference runs use)."""
    order = tuple(value.split(",") if isinstance(value, str) else value)
    if not order or len(set(order)) != len(order) or not set(order) <= set(TASK_NAMES):
        raise ValueError(f"expected a permutation of {','.join(TASK_NAMES)} (or some of them, each once)")
    return order


def _choice(*options: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return value
    return parse


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes", "on"):
        return True
    if str(value).lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _positive(cast: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        out = cast(value)
        if out <= 0:
            raise ValueError("expected a positive number")
        return out
    return parse


def _options(value: Any) -> dict[str, Any]:
    """Strategy hyperparameters: ``--set lwf.lam=2`` (repeatable) or a YAML mapping {lwf.lam: 2}."""
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    items = [value] if isinstance(value, str) else list(value)
    out = {}
    for item in items:
        key, sep, val = str(item).partition("=")
        if not sep or not key:
            raise ValueError("expected STRATEGY.PARAM=VALUE, e.g. ewc.lam=5000")
        out[key.strip()] = val.strip()
    return out


def _optional_str(value: Any) -> str | None:
    return None if value in (None, "", "none", "None") else str(value)


@dataclass(frozen=True)
class RunConfig:
    strategy: str = field(default="naive", metadata={"parse": str, "help": "a strategy (see `clbench strategies`), "
                          "a combination a+b, or path/file.py:Class / package.module:Class"})
    set: dict[str, Any] = field(default_factory=dict, metadata={"parse": _options, "append": True,
                                "help": "strategy hyperparameter STRATEGY.PARAM=VALUE (repeatable)"})
    seed: int = field(default=0, metadata={"parse": int, "help": "seeds Python, NumPy, torch and the loaders"})
    device: str = field(default="auto", metadata={"parse": _choice("auto", "cpu", "cuda"), "help": "auto = cuda if available"})
    data_root: str | None = field(default=None, metadata={"parse": _optional_str,
                                  "help": "dataset root; default: the synthetic benchmark, generated into the cache"})
    order: tuple[str, ...] = field(default=TASK_NAMES, metadata={"parse": _order, "help": "task order, e.g. seg,det,cls"})
    epochs: dict[str, int] = field(default_factory=lambda: {"seg": 4, "det": 6, "cls": 3},
                                   metadata={"parse": _per_task(_positive(int)), "help": "N or seg=N,det=N,cls=N"})
    lr: dict[str, float] = field(default_factory=lambda: {"seg": 2e-3, "det": 2e-3, "cls": 2e-3},
                                 metadata={"parse": _per_task(_positive(float)), "help": "AdamW learning rate, per task"})
    batch_size: dict[str, int] = field(default_factory=lambda: {"seg": 16, "det": 16, "cls": 16},
                                       metadata={"parse": _per_task(_positive(int)), "help": "training batch size, per task"})
    augment: dict[str, bool] = field(default_factory=lambda: {"seg": False, "det": False, "cls": False},
                                     metadata={"parse": _per_task(parse_bool), "help": "training augmentation per task: "
                                               "random resized crop, flip, colour jitter (true|false|seg=true,...)"})
    weight_decay: float = field(default=1e-4, metadata={"parse": float, "help": "AdamW weight decay"})
    grad_clip: float = field(default=10.0, metadata={"parse": _positive(float), "help": "max gradient norm"})
    image_size: int = field(default=128, metadata={"parse": _positive(int),
                            "help": "square input side (128 for the synthetic benchmark; 256-512 for real data)"})
    backbone: str = field(default="efficientnet_b0", metadata={"parse": str, "help": "any timm model name"})
    pretrained: bool = field(default=False, metadata={"parse": parse_bool, "help": "timm's pretrained weights (hub)"})
    pretrained_file: str | None = field(default=None, metadata={"parse": _optional_str,
                                        "help": "local timm checkpoint / backbone state_dict"})
    head_channels: int = field(default=96, metadata={"parse": _positive(int), "help": "width of the neck and head"})
    head_stride: int = field(default=8, metadata={"parse": int, "help": "output stride of the head: 8 or 16"})
    amp: bool = field(default=True, metadata={"parse": parse_bool, "help": "mixed precision (CUDA only)"})
    workers: int = field(default=0, metadata={"parse": int, "help": "DataLoader worker processes"})
    synth_train: int = field(default=160, metadata={"parse": _positive(int), "help": "synthetic images per task, train"})
    synth_val: int = field(default=40, metadata={"parse": _positive(int), "help": "synthetic images per task, val"})
    out: str = field(default="results", metadata={"parse": str, "help": "folder that receives <run_id>/"})
    run_id: str | None = field(default=None, metadata={"parse": _optional_str,
                               "help": "name of the run folder; default <strategy>-seed<N>-<time>"})
    progress: bool = field(default=True, metadata={"parse": parse_bool, "help": "tqdm progress bars"})

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["order"] = list(self.order)
        return out


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def parse_field(name: str, value: Any, source: str) -> Any:
    try:
        return FIELDS[name].metadata["parse"](value)
    except (ValueError, TypeError) as exc:
        raise ClbenchError(f"{source}: {name} = {value!r}: {exc}") from None


def unknown_key_error(key: str, source: str, known: list[str]) -> ClbenchError:
    hint = difflib.get_close_matches(key, known, n=1)
    return ClbenchError(f"{source}: unknown key {key!r}" + (f"; did you mean {hint[0]!r}?" if hint else ""))


def load_yaml(path: Path) -> dict[str, Any]:
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
    """defaults < YAML < CLI; ``cli`` holds only the flags actually given."""
    values = load_yaml(yaml_path) if yaml_path else {}
    values.update({key: parse_field(key, value, f"--{key.replace('_', '-')}") for key, value in cli.items()})
    return RunConfig(**values)


def add_arguments(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One flag per RunConfig field, defaulting to 'not given' so it never overrides YAML."""
    for name, f in FIELDS.items():
        if name in exclude:
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
