"""Benchmark files (DESIGN.md §8): the experiences of a run, in order, each training one task on the classes it
introduces. A leaf: YAML in, a validated ``Protocol`` out; the data is read elsewhere (``clbench.benchmarks``).

A file::

    description: VOC 15-5, overlapped (MiB)
    synthetic: voc21                 # the synthetic variant that stands in for the data without --data-root
    tasks:
      seg: {kind: seg, mode: overlapped}        # folder: a folder of the data root (default: the kind's own)
    experiences:
      - {task: seg, classes: 0-15}              # indices (ranges) or class names; omitted: all the task's classes
      - {task: seg, classes: 16-20}

Class indices are the task's own: segmentation's label values (0 = background, which always belongs to the first
experience of its task), detection's and classification's class indices (detection's in category-id order).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from clbench import ClbenchError, did_you_mean
from clbench.incremental import BACKGROUND, SEG_MODES, ClassSteps

KINDS = ("seg", "det", "cls")
SYNTHETIC_VARIANTS = ("default", "voc21")
DEFAULT = "seg-det-cls"
_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")   # "16" or "16-20"


@dataclass(frozen=True)
class TaskEntry:
    name: str
    kind: str
    folder: str | None = None
    mode: str | None = None         # segmentation tasks trained by several experiences: a mode of SEG_MODES

    @property
    def setting(self) -> str:
        """As ``RunConfig.tasks`` writes a task: KIND or KIND:FOLDER."""
        return f"{self.kind}:{self.folder}" if self.folder else self.kind


@dataclass(frozen=True)
class ExperienceEntry:
    task: str
    classes: tuple[int | str, ...] | None = None   # None: every class of the task


@dataclass(frozen=True)
class Protocol:
    """A benchmark file, validated: its tasks and its experiences in order."""

    name: str
    tasks: tuple[TaskEntry, ...]
    experiences: tuple[ExperienceEntry, ...]
    description: str = ""
    synthetic: str = "default"
    source: str = "<built in>"

    @property
    def order(self) -> tuple[str, ...]:
        """The tasks in the order their first experience comes."""
        return tuple(dict.fromkeys(e.task for e in self.experiences))

    @property
    def task_settings(self) -> dict[str, str]:
        return {t.name: t.setting for t in self.tasks}

    def task(self, name: str) -> TaskEntry:
        return next(t for t in self.tasks if t.name == name)

    @property
    def incremental(self) -> bool:
        """Whether some task is trained by more than one experience."""
        return len(self.experiences) > len(self.order)

    def class_steps(self, task: str, class_names: tuple[str, ...]) -> ClassSteps:
        """How ``task``'s classes (``class_names``, its class list) arrive over its experiences; every class of the
        task exactly once, segmentation's background in the first experience."""
        entries = [(i, e) for i, e in enumerate(self.experiences) if e.task == task]
        kind = self.task(task).kind
        if len(entries) == 1 and entries[0][1].classes is None:
            return ClassSteps((tuple(range(len(class_names))),))
        steps, seen = [], set()
        for position, (index, entry) in enumerate(entries):
            where = f"{self.source}: experiences[{index}].classes"
            if entry.classes is None:
                raise ClbenchError(f"{where}: task {task!r} has several experiences; each must list its classes")
            step = set()
            for item in entry.classes:
                step |= _class_indices(item, class_names, where)
            if kind == "seg" and BACKGROUND in step and position > 0:
                raise ClbenchError(f"{where}: background (0) belongs to the first experience of {task!r}")
            if kind == "seg" and position == 0:
                step.add(BACKGROUND)
            if step & seen:
                raise ClbenchError(f"{where}: class {sorted(step & seen)[0]} is introduced twice")
            seen |= step
            steps.append(tuple(sorted(step)))
        missing = sorted(set(range(len(class_names))) - seen)
        if missing:
            raise ClbenchError(f"{self.source}: task {task!r}: classes {missing} are never introduced (its classes: "
                               f"0-{len(class_names) - 1}); every class must belong to one experience")
        return ClassSteps(tuple(steps))

    def to_dict(self) -> dict[str, Any]:
        """The file's content, normalised (what a run records)."""
        tasks = {t.name: {k: v for k, v in (("kind", t.kind), ("folder", t.folder), ("mode", t.mode)) if v}
                 for t in self.tasks}
        experiences = [{"task": e.task, **({"classes": list(e.classes)} if e.classes is not None else {})}
                       for e in self.experiences]
        return {"name": self.name, "description": self.description, "synthetic": self.synthetic, "tasks": tasks,
                "experiences": experiences}


def _class_indices(item: int | str, class_names: tuple[str, ...], where: str) -> set[int]:
    n = len(class_names)
    if isinstance(item, int):
        indices = {item}
    elif (match := _RANGE.match(item)) is not None:
        low, high = int(match[1]), int(match[2] or match[1])
        if low > high:
            raise ClbenchError(f"{where}: range {item!r} runs backwards")
        indices = set(range(low, high + 1))
    elif item in class_names:
        return {class_names.index(item)}
    else:
        raise ClbenchError(f"{where}: {item!r} is neither a class index, a range A-B nor a class name"
                           + did_you_mean(item, class_names))
    bad = sorted(i for i in indices if not 0 <= i < n)
    if bad:
        raise ClbenchError(f"{where}: class {bad[0]} out of range: the task has classes 0-{n - 1}")
    return indices


def one_per_task(tasks: dict[str, str], order: tuple[str, ...]) -> Protocol:
    """The protocol ``--tasks``/``--order`` stand for: one experience per task, every class at once."""
    entries = tuple(TaskEntry(name, *(setting.partition(":")[0], setting.partition(":")[2] or None))
                    for name, setting in tasks.items() if name in order)
    return Protocol("+".join(order), entries, tuple(ExperienceEntry(t) for t in order))


def shipped_protocols() -> dict[str, Path]:
    """The benchmark files clbench ships (the repository's ``configs/benchmarks/``): name -> file."""
    import clbench.configs
    return {p.stem: p for p in sorted((Path(clbench.configs.__file__).parent / "benchmarks").glob("*.yaml"))}


def protocol_file(value: str) -> Path:
    """A benchmark file by path, or by the name of one clbench ships."""
    path = Path(value)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    shipped = shipped_protocols()
    if value in shipped:
        return shipped[value]
    if path.exists():
        return path
    raise ClbenchError(f"--protocol {value}: no such file, and clbench ships no benchmark of that name (shipped: "
                       f"{', '.join(shipped)}; `clbench benchmarks` lists them)" + did_you_mean(value, shipped))


def load_protocol(value: str) -> Protocol:
    """The benchmark file ``value`` (a path or a shipped name), validated; every error one line naming the field."""
    path = protocol_file(value)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ClbenchError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise ClbenchError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return parse_protocol(data, path.stem, str(path))


def parse_protocol(data: Any, name: str, source: str) -> Protocol:
    if not isinstance(data, dict):
        raise ClbenchError(f"{source}: expected a mapping with 'tasks' and 'experiences' at the top level")
    unknown = sorted(set(data) - {"description", "synthetic", "tasks", "experiences"})
    if unknown:
        raise ClbenchError(f"{source}: unknown key {unknown[0]!r} (keys: description, synthetic, tasks, experiences)"
                           + did_you_mean(unknown[0], ["description", "synthetic", "tasks", "experiences"]))
    synthetic = data.get("synthetic", "default")
    if synthetic not in SYNTHETIC_VARIANTS:
        raise ClbenchError(f"{source}: synthetic: {synthetic!r}: expected one of {', '.join(SYNTHETIC_VARIANTS)}")
    tasks = _tasks(data.get("tasks"), source)
    experiences = _experiences(data.get("experiences"), {t.name for t in tasks}, source)
    for task in tasks:
        count = sum(e.task == task.name for e in experiences)
        if count == 0:
            raise ClbenchError(f"{source}: tasks.{task.name}: no experience trains it")
        if task.mode and count == 1:
            raise ClbenchError(f"{source}: tasks.{task.name}.mode: a mode applies to a task trained by several "
                               "experiences; this one has one")
        if task.kind == "seg" and count > 1 and not task.mode:
            raise ClbenchError(f"{source}: tasks.{task.name}.mode: a segmentation task trained by several experiences "
                               f"needs a mode ({', '.join(SEG_MODES)})")
    return Protocol(name, tasks, experiences, str(data.get("description", "")), synthetic, source)


def _tasks(value: Any, source: str) -> tuple[TaskEntry, ...]:
    if not isinstance(value, dict) or not value:
        raise ClbenchError(f"{source}: tasks: expected a mapping of task names to {{kind: seg|det|cls}}")
    entries = []
    for name, spec in value.items():
        where = f"{source}: tasks.{name}"
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
            raise ClbenchError(f"{where}: a task name is a letter then letters, digits or _")
        if not isinstance(spec, dict):
            raise ClbenchError(f"{where}: expected a mapping with kind (and folder, mode)")
        stray = sorted(set(spec) - {"kind", "folder", "mode"})
        if stray:
            raise ClbenchError(f"{where}: unknown key {stray[0]!r} (keys: kind, folder, mode)")
        kind, mode, folder = spec.get("kind"), spec.get("mode"), spec.get("folder")
        if kind not in KINDS:
            raise ClbenchError(f"{where}.kind: {kind!r}: expected one of {', '.join(KINDS)}")
        if mode is not None and (kind != "seg" or mode not in SEG_MODES):
            raise ClbenchError(f"{where}.mode: {mode!r}: " + (f"expected one of {', '.join(SEG_MODES)}" if kind == "seg"
                                                               else "modes are segmentation's"))
        if folder is not None and (not isinstance(folder, str) or not folder or "/" in folder):
            raise ClbenchError(f"{where}.folder: {folder!r}: expected the name of a folder of the data root")
        entries.append(TaskEntry(name, kind, folder, mode))
    return tuple(entries)


def _experiences(value: Any, names: set[str], source: str) -> tuple[ExperienceEntry, ...]:
    if not isinstance(value, list) or not value:
        raise ClbenchError(f"{source}: experiences: expected a list of {{task: NAME, classes: ...}}")
    out = []
    for index, entry in enumerate(value):
        where = f"{source}: experiences[{index}]"
        if not isinstance(entry, dict) or set(entry) - {"task", "classes"} or "task" not in entry:
            raise ClbenchError(f"{where}: expected {{task: NAME}} or {{task: NAME, classes: ...}}")
        if entry["task"] not in names:
            raise ClbenchError(f"{where}.task: {entry['task']!r} is not a task of the file (tasks: "
                               f"{', '.join(sorted(names))})" + did_you_mean(str(entry["task"]), names))
        classes = entry.get("classes")
        if classes is not None and classes != "all":
            items = classes if isinstance(classes, list) else [classes]
            if not items or not all(isinstance(c, (int, str)) and not isinstance(c, bool) for c in items):
                raise ClbenchError(f"{where}.classes: expected a class index, a range A-B, a class name, or a list "
                                   "of them")
            classes = tuple(items)
        else:
            classes = None
        out.append(ExperienceEntry(entry["task"], classes))
    return tuple(out)
